"""A discrete-event simulation of a pdserve cluster: prefill and decode workers, or colocated ones.

Events are engine steps, KV transfers, arrivals, load reports and autoscaling ticks (a ``heapq``;
never one event per token). What runs is the project's own code, not a copy of it:

* routing: ``router.Router`` (``choose_prefill`` on the prompt's leading tokens, ``choose_decode``
  with the prompt's block count, as ``cluster.request_path`` does), fed ``LoadReport``s from every
  worker each ``load_report_period_s``;
* each worker's step: ``engine.scheduling_rules`` (running sequences first, chunks cut to the token
  budget, new sequences admitted while budget, batch slots and free blocks allow);
* autoscaling: ``cluster.autoscaling.decide_num_replicas`` with the pools' ``PrefillPolicyConfig`` /
  ``DecodePolicyConfig`` targets and bands, and ``hold_decode_while_prefill_backlogged``.

Simplifications (each one named, see docs/capacity.md): a decode worker reserves a request's blocks
for its prompt plus its whole answer when it admits it (no preemption); prefix caches are LRUs of
prefix units (``router.replay.cache.LRUPrefixCache``) whose hits are decided at admission; a step's
duration is the cost model's for the step's shape.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from capacity.costs import CostModel, Step, prefill_step
from capacity.metrics import SimMetrics
from capacity.workload import SimRequest
from engine.prefix_summary import SummaryBuilder, probe_depths, probe_keys
from engine.scheduling_rules import admits, blocks_for, chunk_tokens, max_prefix_blocks, may_admit
from router import LoadReport, Router, RouterConfig
from router.replay.cache import LRUPrefixCache


@dataclass(frozen=True)
class PoolShape:
    """One pool's workers: how many, and each one's engine limits and KV blocks."""

    num_workers: int
    kv_blocks: int
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 64


@dataclass(frozen=True)
class Autoscale:
    """Drive pool sizes with the real policy functions every ``tick_s``; new workers serve after
    ``startup_s``; removed ones take no new work and leave once empty."""

    tick_s: float = 10.0
    startup_s: float = 60.0
    prefill_kwargs: dict = field(default_factory=dict)  # PrefillPolicyConfig fields
    decode_kwargs: dict = field(default_factory=dict)  # DecodePolicyConfig fields
    min_replicas: int = 1
    max_replicas: int = 10_000


@dataclass(frozen=True)
class SimConfig:
    prefill: PoolShape | None  # None: colocated (the decode pool's workers run both)
    decode: PoolShape
    block_size: int = 16
    unit_tokens: int = 512  # tokens per prefix unit of the requests (scaled like the prompts)
    router: RouterConfig = field(default_factory=RouterConfig)
    autoscale: Autoscale | None = None
    concurrency: int | None = None  # closed loop: this many requests in flight (arrival times ignored)
    sample_period_s: float = 1.0  # pool sizes and utilization samples
    # cells: the cluster split into this many independent routing domains (each its own Router over
    # its share of both pools; a request goes to the cell of its leading prefix units), as a large
    # deployment puts ingress groups in front of node groups. 1 = one router over every worker.
    num_cells: int = 1
    # every worker on one machine's cores (the validation's 1P + 1D on 2 cores): a prefill step that
    # starts while a decode worker is busy takes (1 + cost.prefill_shared) x its cost, a decode step
    # while a prefill step runs (1 + cost.decode_shared) x (runs in progress are re-planned when a
    # prefill step starts or ends). A small cluster's knob: it scans the workers at every step.
    shared_cores: bool = False
    seed: int = 0  # draws of a served cost's step noise


class PromptView:
    """A prompt's token ids as the router reads them: tokens of block ``b`` of unit ``u`` are derived
    from the unit's id, so equal leading units give equal prefix keys (and nothing else is built)."""

    __slots__ = ("length", "prefix_ids", "unit")

    def __init__(self, request: SimRequest, unit_tokens: int) -> None:
        self.length, self.prefix_ids, self.unit = request.input_len, request.prefix_ids, unit_tokens

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: slice) -> list[int]:
        start, stop = index.start, index.stop  # the prefix_hash keyer reads whole blocks by slice
        unit_id = self.prefix_ids[start // self.unit] if self.prefix_ids else 0
        return [(unit_id * 2654435761 + position) & 0xFFFFFFFF for position in range(start, stop)]


class Job:
    """A request's state in the simulation."""

    __slots__ = (
        "blocks",
        "cached",
        "decode_blocks",
        "decode_id",
        "done",
        "finish_step",
        "first_token_s",
        "last_token_s",
        "prefill_id",
        "probes",
        "req",
    )

    def __init__(self, req: SimRequest) -> None:
        self.req = req
        self.cached = 0
        self.done = 0
        self.blocks = 0
        self.first_token_s = math.nan
        self.last_token_s = math.nan
        self.decode_blocks = 0
        self.finish_step = 0
        self.decode_id = ""
        self.prefill_id = ""
        self.probes: list[int] = []  # cache_aware: the prompt's probe keys (computed once, at arrival)


class Worker:
    """One simulated engine: a prefill queue (chunked, budgeted), a decode batch, or both (colocated)."""

    def __init__(self, worker_id: str, shape: PoolShape, cache_units: int) -> None:
        self.id = worker_id
        self.shape = shape
        self.waiting: deque[Job] = deque()  # prefill: not yet admitted
        self.prefilling: list[Job] = []
        self.decode_waiting: deque[Job] = deque()  # decode: KV arrived, not yet admitted
        self.batch = 0
        self.ctx_sum = 0.0
        self.finishing: list[tuple[int, int, Job]] = []  # (finish step, seq, job) heap
        self.step_index = 0
        self.used_blocks = 0
        self.pinned_blocks = 0  # prefill blocks lent to a KV transfer
        self.cache = LRUPrefixCache(max(1, cache_units))
        self.summary: SummaryBuilder | None = None  # cache_aware routing: the prefixes it holds
        self.summary_tuple: tuple[int, ...] = ()
        self.summary_due_s = 0.0
        self.summary_period_s = 1.0
        self.busy = False
        self.busy_s = 0.0
        self.draining = False
        self.serving_from_s = 0.0
        self.cell = 0
        self.run: tuple[float, list[float]] | None = None  # a decode-only run in progress: (start, durations)
        self.version = 0  # bumps when a step event is (re)scheduled; stale events are ignored
        self.joined: list[Job] = []
        self.computed_tokens = 0  # prompt tokens prefilled here, cache hits not counted (load reports)

    @property
    def queued_prefill_tokens(self) -> int:
        return sum(j.req.input_len - j.cached for j in self.waiting) + sum(
            j.req.input_len - j.done for j in self.prefilling
        )

    @property
    def running_requests(self) -> int:
        return len(self.waiting) + len(self.prefilling) + self.batch + len(self.decode_waiting)

    @property
    def free_blocks(self) -> int:
        return max(0, self.shape.kv_blocks - self.used_blocks)

    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.batch or self.decode_waiting)

    def report(self, now: float) -> LoadReport:
        total = self.shape.kv_blocks
        summary = None
        if self.summary is not None:  # rebuilt every summary_period_s, the same tuple re-sent between
            if now >= self.summary_due_s:
                self.summary_tuple = self.summary.build(self.cache.__contains__)
                self.summary_due_s = now + self.summary_period_s
            summary = self.summary_tuple
        return LoadReport(
            self.id,
            self.queued_prefill_tokens,
            self.running_requests,
            min(total, self.free_blocks),
            total,
            now,
            prefix_summary=summary,
            **({"computed_prompt_tokens": self.computed_tokens} if _REPORTS_COMPUTED else {}),
        )


class Simulation:
    """Runs one cluster over a request stream; :meth:`run` returns the metrics."""

    def __init__(self, config: SimConfig, cost: CostModel) -> None:
        self.config = config
        self.cost = cost
        self.routers = [Router(config.router) for _ in range(config.num_cells)]
        self.created = {"prefill": 0, "decode": 0}
        self.events: list[tuple[float, int, int, object]] = []
        self.seq = itertools.count()
        self.now = 0.0
        self.workers: dict[str, Worker] = {}
        self._cell_members: dict[int, tuple[tuple[str, ...], tuple[str, ...]]] = {}
        self.pools: dict[str, list[str]] = {"prefill": [], "decode": []}
        self.starting: dict[str, int] = {"prefill": 0, "decode": 0}
        self.counter = itertools.count()
        self.metrics = SimMetrics()
        # a served cost's noise (capacity.served): each step x a draw from its observed / fitted ratios
        self._noise = tuple(getattr(cost, "noise", ()))
        self._noise_period_s = getattr(cost, "noise_period_s", 1.0)
        self._noise_at: dict[int, float] = {}  # period index -> its factor (drawn on first use)
        self._rng = random.Random(config.seed)
        self.metrics.path_s = getattr(cost, "path_s", 0.0)  # a served cost's per-request path (ingress, RPCs)
        self.colocated = config.prefill is None
        # cache_aware routes on probe keys of the prompt's prefix units (engine.prefix_summary: a replay of
        # per-block ids passes the ids with block size 1, and the router's block is then one unit)
        self.cache_aware = config.router.policy == "cache_aware"
        if self.cache_aware and config.router.block_size != config.unit_tokens:
            raise ValueError("cache_aware simulation: router.block_size must equal unit_tokens")
        self.unit_tokens = config.unit_tokens
        for pool, shape in (("prefill", config.prefill), ("decode", config.decode)):
            for _ in range(shape.num_workers if shape else 0):
                self._add_worker(pool, ready=True)
        self._sync_router()

    # -- membership ---------------------------------------------------------------------------------
    def _shape(self, pool: str) -> PoolShape:
        shape = self.config.prefill if pool == "prefill" else self.config.decode
        assert shape is not None
        return shape

    def _add_worker(self, pool: str, ready: bool) -> None:
        shape = self._shape(pool)
        worker_id = f"{pool[0]}{next(self.counter)}"
        does_prefill = pool == "prefill" or self.colocated
        cache_units = shape.kv_blocks * self.config.block_size // self.unit_tokens if does_prefill else 1
        worker = Worker(worker_id, shape, cache_units)
        worker.cell = self.created[pool] % self.config.num_cells
        self.created[pool] += 1
        if does_prefill and self.cache_aware:
            worker.summary = SummaryBuilder(self.config.router.summary_max_keys)
            worker.summary_period_s = self.config.router.summary_period_s
        if ready:
            worker.serving_from_s = self.now
            self.workers[worker_id] = worker
            self.pools[pool].append(worker_id)
        else:
            self.starting[pool] += 1
            self._push(self.now + self._autoscale().startup_s, READY, (pool, worker))

    def _sync_router(self) -> None:
        for cell, router in enumerate(self.routers):
            live = {
                pool: [w for w in ids if not self.workers[w].draining and self.workers[w].cell == cell]
                for pool, ids in self.pools.items()
            }
            prefill = live["decode"] if self.colocated else live["prefill"]
            members = (tuple(prefill), tuple(live["decode"]))
            if self._cell_members.get(cell) != members:  # a ring rebuild costs O(points x workers)
                self._cell_members[cell] = members
                router.set_workers(prefill, live["decode"])

    def _autoscale(self) -> Autoscale:
        assert self.config.autoscale is not None
        return self.config.autoscale

    # -- the event loop -----------------------------------------------------------------------------
    def _push(self, when: float, kind: int, payload: object) -> None:
        heapq.heappush(self.events, (when, next(self.seq), kind, payload))

    def run(self, requests: Iterable[SimRequest], until_s: float | None = None) -> SimMetrics:
        """Simulate until every request finished (or ``until_s`` of simulated time)."""
        source: Iterator[SimRequest] = iter(requests)
        if self.config.concurrency:
            for _ in range(self.config.concurrency):
                self._issue_next(source, 0.0)
        else:
            self._schedule_arrival(source)
        self._push(0.0, REPORT, None)
        self._push(0.0, SAMPLE, None)
        if self.config.autoscale:
            self._push(self.config.autoscale.tick_s, AUTOSCALE, None)
        self.source = source
        handlers = {
            ARRIVAL: self._on_arrival,
            STEP_END: self._on_step_end,
            TRANSFER: self._on_transfer,
            REPORT: self._on_report,
            SAMPLE: self._on_sample,
            AUTOSCALE: self._on_autoscale,
            READY: self._on_ready,
        }
        events = self.events
        while (events and self.metrics.num_open > 0) or self._pending_arrival:
            when, _, kind, payload = heapq.heappop(events)
            if until_s is not None and when > until_s:
                break
            self.now = when
            handlers[kind](payload)
        self.metrics.finish(self.now, self)
        return self.metrics

    _pending_arrival = False

    def _schedule_arrival(self, source: Iterator[SimRequest]) -> None:
        request = next(source, None)
        self._pending_arrival = request is not None
        if request is not None:
            self.metrics.num_open += 1
            self._push(request.arrival_s, ARRIVAL, request)

    def _issue_next(self, source: Iterator[SimRequest], when: float) -> None:
        request = next(source, None)
        if request is not None:
            self.metrics.num_open += 1
            self._push(
                when,
                ARRIVAL,
                SimRequest(request.index, when, request.input_len, request.output_len, request.prefix_ids),
            )

    def _on_arrival(self, request: SimRequest) -> None:
        if not self.config.concurrency:
            self._schedule_arrival(self.source)
        job = Job(request)
        router = self.routers[
            hash(request.prefix_ids[:4]) % len(self.routers) if len(self.routers) > 1 else 0
        ]
        if self.cache_aware:
            job.probes = probe_keys(request.prefix_ids, 1)
            choice = router.choose_prefill_by_probes(job.probes, request.input_len)
        else:
            choice = router.choose_prefill(PromptView(request, self.unit_tokens))
        job.prefill_id = choice.worker_id
        worker = self.workers[choice.worker_id]
        worker.waiting.append(job)
        self._kick(worker)

    def _kick(self, worker: Worker) -> None:
        if not worker.busy:
            if worker.has_work():
                self._start_step(worker)
        elif worker.run is not None and len(worker.run[1]) > 1:
            self._cut_run(worker)

    def _decode_run(self, worker: Worker) -> list[float]:
        """Durations of the decode-only steps until the batch next changes (its first finish), at most
        MAX_RUN_STEPS: one event for the run instead of one per step. A request arriving meanwhile cuts
        the run at the step in progress (:meth:`_cut_run`), so it joins at the next step boundary as in
        the engine."""
        num_steps = 1
        if worker.finishing and not worker.decode_waiting:
            num_steps = min(MAX_RUN_STEPS, max(1, worker.finishing[0][0] - worker.step_index))
        return self.cost.decode_durations(worker.batch, worker.ctx_sum, num_steps)

    def _cut_run(self, worker: Worker) -> None:
        assert worker.run is not None
        start, durations = worker.run
        elapsed, keep = start, 0
        while keep < len(durations) and elapsed <= self.now:
            elapsed += durations[keep]
            keep += 1
        if keep >= len(durations):
            return
        worker.busy_s -= sum(durations[keep:])
        kept = durations[:keep]
        worker.run = (start, kept)
        worker.version += 1
        self._push(elapsed, STEP_END, (worker, (), kept, worker.joined, worker.version))

    # -- one engine step (engine.scheduling_rules) ---------------------------------------------------
    def _start_step(self, worker: Worker) -> None:
        shape = worker.shape
        budget = shape.max_num_batched_tokens
        joined = self._admit_decodes(worker, budget) if worker.decode_waiting else []
        budget -= worker.batch
        if not (worker.prefilling or worker.waiting):  # a decode-only step (the common one)
            if not worker.batch:
                worker.busy = False
                return
            durations = self._decode_run(worker)
            if self._noise:
                factor = self._noise_now()
                durations = [d * factor for d in durations]
            if self.config.shared_cores and self._others_busy(worker, prefill=True):
                factor = 1.0 + getattr(self.cost, "decode_shared", 0.0)
                durations = [d * factor for d in durations]
            worker.busy = True
            worker.busy_s += sum(durations)
            worker.run = (self.now, durations)
            worker.joined = joined
            worker.version += 1
            self._push(self.now + sum(durations), STEP_END, (worker, (), durations, joined, worker.version))
            return
        chunks: list[tuple[Job, int]] = []
        for job in worker.prefilling:  # running chunked prefills first
            if budget <= 0:
                break
            n = chunk_tokens(job.req.input_len - job.done, budget)
            chunks.append((job, n))
            budget -= n
        self._admit_prefills(worker, budget, chunks)
        if not chunks and not worker.batch:
            worker.busy = False
            return
        shape_of = prefill_step([(job.done, n) for job, n in chunks])
        step = Step(
            shape_of.num_tokens + worker.batch,
            shape_of.num_seqs + worker.batch,
            shape_of.attn_pairs + worker.ctx_sum,
            shape_of.kv_tokens + worker.ctx_sum,
            shape_of.num_prefills,
        )
        duration = self.cost.step_s(step)
        if self._noise:
            duration *= self._noise_now()
        if self.config.shared_cores and self._others_busy(worker, prefill=False):
            duration *= 1.0 + getattr(self.cost, "prefill_shared", 0.0)
        worker.busy = True
        worker.busy_s += duration
        worker.run = None
        worker.version += 1
        self._push(self.now + duration, STEP_END, (worker, chunks, [duration], joined, worker.version))
        if self.config.shared_cores:
            self._replan_others(worker)

    def _noise_now(self) -> float:
        """A served cost's load noise: the factor of the period ``now`` falls in."""
        period = int(self.now // self._noise_period_s)
        factor = self._noise_at.get(period)
        if factor is None:
            factor = self._noise_at[period] = self._rng.choice(self._noise)
        return factor

    def _others_busy(self, worker: Worker, prefill: bool) -> bool:
        """shared_cores: whether another worker is in a prefill step (``prefill``) or a decode run."""
        return any(w is not worker and w.busy and (w.run is None) == prefill for w in self.workers.values())

    def _replan_others(self, worker: Worker) -> None:
        """shared_cores: cut the other workers' decode runs at the step in progress (their next steps
        are planned with the cores' new sharing)."""
        for other in self.workers.values():
            if other is not worker and other.run is not None and len(other.run[1]) > 1:
                self._cut_run(other)

    def _admit_prefills(self, worker: Worker, budget: int, chunks: list[tuple[Job, int]]) -> None:
        shape, block_size = worker.shape, self.config.block_size
        while may_admit(
            len(worker.waiting), budget, len(worker.prefilling) + worker.batch, shape.max_num_seqs
        ):
            job = worker.waiting[0]
            units = worker.cache.match(job.req.prefix_ids)
            cached = min(
                units * self.unit_tokens, max_prefix_blocks(job.req.input_len, block_size) * block_size
            )
            cached_blocks = cached // block_size
            n = chunk_tokens(job.req.input_len - cached, budget)
            new_blocks = blocks_for(cached + n, block_size) - cached_blocks
            if not admits(cached_blocks, new_blocks, worker.free_blocks):
                break
            worker.waiting.popleft()
            job.cached = job.done = cached
            job.blocks = cached_blocks + new_blocks
            worker.used_blocks += job.blocks
            worker.prefilling.append(job)
            chunks.append((job, n))
            budget -= n

    def _admit_decodes(self, worker: Worker, budget: int) -> list[Job]:
        shape = worker.shape
        joined: list[Job] = []
        while worker.decode_waiting and may_admit(
            1, budget - worker.batch, worker.batch + len(worker.prefilling), shape.max_num_seqs
        ):
            job = worker.decode_waiting[0]
            need = blocks_for(job.req.input_len + job.req.output_len, self.config.block_size)
            extra = need - job.blocks if job.decode_id == job.prefill_id and self.colocated else need
            if not admits(0, extra, worker.free_blocks):
                break
            worker.decode_waiting.popleft()
            worker.used_blocks += extra
            job.decode_blocks = job.blocks + extra if self.colocated else need
            job.finish_step = worker.step_index + job.req.output_len - 1
            worker.batch += 1
            worker.ctx_sum += job.req.input_len + 1
            heapq.heappush(worker.finishing, (job.finish_step, next(self.seq), job))
            joined.append(job)
        return joined

    # -- after a step, a transfer ---------------------------------------------------------------------
    def _on_step_end(
        self, payload: tuple[Worker, list[tuple[Job, int]], list[float], list[Job], int]
    ) -> None:
        worker, chunks, durations, joined, version = payload
        if version != worker.version:
            return  # a decode run that was cut short: its replacement event stands
        worker.run = None
        for job, n in chunks:  # () for a decode-only step
            job.done += n
            if job.done >= job.req.input_len:
                worker.prefilling.remove(job)
                self._prefilled(worker, job)
        if worker.batch:
            self._decoded(worker, durations, joined)
        worker.busy = False
        self._kick(worker)
        if chunks and self.config.shared_cores and not worker.busy:
            self._replan_others(worker)  # the prefill worker went idle
        if worker.draining and not worker.has_work():
            self._retire(worker)

    def _prefilled(self, worker: Worker, job: Job) -> None:
        job.first_token_s = job.last_token_s = self.now
        worker.computed_tokens += job.req.input_len - job.cached
        worker.cache.insert(job.req.prefix_ids)
        if worker.summary is not None:
            ids = job.req.prefix_ids
            worker.summary.note(job.probes, [ids[d - 1] for d in probe_depths(len(ids))])
        self.metrics.on_first_token(job)
        if job.req.output_len <= 1:
            worker.used_blocks -= job.blocks
            self._finished(job)
            return
        if self.colocated:
            job.decode_id = worker.id
            worker.decode_waiting.append(job)
            return
        router = self.routers[worker.cell]
        choice = router.choose_decode(blocks_for(job.req.input_len, self.config.block_size))
        job.decode_id = choice.worker_id
        num_bytes = job.req.input_len * self.cost.kv_bytes_per_token
        self._push(self.now + self.cost.transfer_s(num_bytes), TRANSFER, (job, worker))

    def _decoded(self, worker: Worker, durations: list[float], joined: list[Job]) -> None:
        now = self.now
        worker.step_index += len(durations)
        worker.ctx_sum += worker.batch * len(durations)
        metrics = self.metrics
        first_step_end = now - sum(durations[1:])
        for job in joined:
            metrics.on_token_gap(first_step_end - job.last_token_s, 1)
        metrics.on_token_gap(durations[0], worker.batch - len(joined))
        if len(durations) > 1:
            metrics.itl.add_run(durations[1:], worker.batch, sorted_run=True)
        metrics.decode_tokens += worker.batch * len(durations)
        finishing = worker.finishing
        while finishing and finishing[0][0] <= worker.step_index:
            _, _, job = heapq.heappop(finishing)
            worker.batch -= 1
            worker.ctx_sum -= job.req.input_len + job.req.output_len
            worker.used_blocks -= job.decode_blocks
            job.last_token_s = now
            self._finished(job)

    def _finished(self, job: Job) -> None:
        self.metrics.on_finish(job, self.now)
        if self.config.concurrency:
            self._issue_next(self.source, self.now)

    def _on_transfer(self, payload: tuple[Job, Worker]) -> None:
        job, prefill = payload
        prefill.used_blocks -= job.blocks  # the prefill worker unpins the lent blocks
        self._kick(prefill)
        if prefill.draining and not prefill.has_work():
            self._retire(prefill)
        decode = self.workers[job.decode_id]
        decode.decode_waiting.append(job)
        self._kick(decode)

    # -- load reports, samples, autoscaling ---------------------------------------------------------
    def _on_report(self, _: object) -> None:
        now = self.now
        for worker in self.workers.values():
            if not worker.draining:
                self.routers[worker.cell].update_load(worker.report(now))
        self._push(now + self.config.router.load_report_period_s, REPORT, None)

    def _on_sample(self, _: object) -> None:
        self.metrics.on_sample(self)
        self._push(self.now + self.config.sample_period_s, SAMPLE, None)

    def _on_ready(self, payload: tuple[str, Worker]) -> None:
        pool, worker = payload
        self.starting[pool] -= 1
        worker.serving_from_s = self.now
        self.workers[worker.id] = worker
        self.pools[pool].append(worker.id)
        self._sync_router()

    def _on_autoscale(self, _: object) -> None:
        from capacity.scaling import decide_pools

        targets = decide_pools(self)
        for pool, target in targets.items():
            live = [w for w in self.pools[pool] if not self.workers[w].draining]
            current = len(live) + self.starting[pool]
            for _ in range(target - current):
                self._add_worker(pool, ready=False)
            if target < current:
                victims = sorted(live, key=lambda w: self.workers[w].running_requests)[: current - target]
                for worker_id in victims:
                    self.workers[worker_id].draining = True
                self._sync_router()
                for worker_id in victims:
                    if not self.workers[worker_id].has_work() and not self._holds_pinned(worker_id):
                        self._retire(self.workers[worker_id])
        self._push(self.now + self._autoscale().tick_s, AUTOSCALE, None)

    def _holds_pinned(self, worker_id: str) -> bool:
        return self.workers[worker_id].used_blocks > 0

    def _retire(self, worker: Worker) -> None:
        if worker.used_blocks > 0 or worker.id not in self.workers:
            return
        for ids in self.pools.values():
            if worker.id in ids:
                ids.remove(worker.id)
        self.metrics.retired_busy_s += worker.busy_s
        del self.workers[worker.id]


ARRIVAL, STEP_END, TRANSFER, REPORT, SAMPLE, AUTOSCALE, READY = range(7)
# the router's load reports carry the worker's computed prompt tokens (the cache_aware policy's work
# balance) once router.LoadReport has the field; the simulator reports what the workers would
_REPORTS_COMPUTED = "computed_prompt_tokens" in LoadReport.__dataclass_fields__
MAX_RUN_STEPS = 64
