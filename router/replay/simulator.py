"""A simulated prefill pool for replaying traces through routing policies.

Cost model (deliberately simple; every policy sees the same one):

- Each worker is one FIFO server with an LRU prefix cache of ``capacity_blocks`` blocks.
- A request's cache hit is decided when it is routed (arrival order): the leading run of its blocks
  cached on the chosen worker. Its blocks are then cached there (see ``LRUPrefixCache``).
- Prefill service time is ``overhead_s + uncached_tokens / prefill_tokens_per_s``: linear in the
  tokens actually computed (attention's quadratic term and the cost of reading cached KV are left
  out), plus a fixed per-request overhead (scheduling, first-token sampling, KV hand-off).
- Queueing delay is the time from arrival to the start of service on the chosen worker.
- A worker's load report at time ``t``: queued prefill tokens = its remaining work in seconds times
  ``prefill_tokens_per_s``; running requests = requests not yet finished; free KV blocks = capacity
  minus the blocks of its unfinished requests.
- Load balance is each worker's total busy time; the table reports max/mean over workers.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from engine.prefix_summary import SummaryBuilder, probe_depths, probe_keys
from router.replay.cache import LRUPrefixCache
from router.traces import MOONCAKE_BLOCK_TOKENS, TraceRecord


@dataclass(frozen=True)
class SimRequest:
    """One replayed request: arrival time, prompt length and its prompt's block ids."""

    index: int
    arrival_s: float
    num_tokens: int
    block_ids: tuple[int, ...]


@dataclass(frozen=True)
class CostModel:
    """Service-time model of one prefill worker (see the module docstring)."""

    prefill_tokens_per_s: float
    overhead_s: float = 0.02
    block_tokens: int = MOONCAKE_BLOCK_TOKENS

    def __post_init__(self) -> None:
        if not self.prefill_tokens_per_s > 0:
            raise ValueError(f"prefill_tokens_per_s must be positive, got {self.prefill_tokens_per_s}")
        if self.overhead_s < 0:
            raise ValueError(f"overhead_s must be >= 0, got {self.overhead_s}")
        if self.block_tokens <= 0:
            raise ValueError(f"block_tokens must be positive, got {self.block_tokens}")

    def service_s(self, uncached_tokens: int) -> float:
        return self.overhead_s + uncached_tokens / self.prefill_tokens_per_s

    @classmethod
    def for_utilization(
        cls,
        requests: Sequence[SimRequest],
        num_workers: int,
        utilization: float,
        overhead_s: float,
        block_tokens: int,
    ) -> CostModel:
        """The prefill rate at which the pool would be ``utilization`` busy if nothing were cached."""
        if not 0 < utilization:
            raise ValueError(f"utilization must be positive, got {utilization}")
        duration = max(requests[-1].arrival_s - requests[0].arrival_s, 1e-9)
        total_tokens = sum(r.num_tokens for r in requests)
        budget_s = utilization * num_workers * duration - overhead_s * len(requests)
        if budget_s <= 0:
            raise ValueError("per-request overhead alone exceeds the utilization budget")
        return cls(total_tokens / budget_s, overhead_s, block_tokens)


def to_sim_requests(
    records: Sequence[TraceRecord], block_tokens: int = MOONCAKE_BLOCK_TOKENS
) -> list[SimRequest]:
    """Trace records to replay requests, in arrival order.

    Arrival times: records that share a timestamp (Mooncake's are in ~3 s steps) are spread evenly
    over the gap to the next distinct timestamp (the last group over the previous gap).
    Block ids: Mooncake ``hash_ids``; for records without them, fresh ids above every hash id (nothing
    is shared), one per ``block_tokens`` tokens. Ids are ints below 2**32 (they are hashed as tokens).
    """
    order = sorted(range(len(records)), key=lambda i: (records[i].timestamp_s, i))
    stamps = sorted({r.timestamp_s for r in records})
    next_stamp = dict(itertools.pairwise(stamps))
    last_gap = stamps[-1] - stamps[-2] if len(stamps) > 1 else 1.0
    group_size = Counter(r.timestamp_s for r in records)
    seen_in_group: Counter[float] = Counter()
    next_fresh_id = 1 + max((max(r.hash_ids) for r in records if r.hash_ids), default=-1)
    requests: list[SimRequest] = []
    for i in order:
        record = records[i]
        stamp = record.timestamp_s
        gap = next_stamp.get(stamp, stamp + last_gap) - stamp
        arrival = stamp + gap * seen_in_group[stamp] / group_size[stamp]
        seen_in_group[stamp] += 1
        if record.hash_ids is not None:
            block_ids: tuple[int, ...] = record.hash_ids
        else:
            num_blocks = max(1, math.ceil(record.input_length / block_tokens))
            block_ids = tuple(range(next_fresh_id, next_fresh_id + num_blocks))
            next_fresh_id += num_blocks
        requests.append(SimRequest(len(requests), arrival, record.input_length, block_ids))
    return requests


@dataclass
class SimWorker:
    """One simulated prefill worker: a FIFO server and its prefix cache."""

    worker_id: str
    cache: LRUPrefixCache
    free_at_s: float = 0.0
    inflight: deque[tuple[float, int]] = field(default_factory=deque)  # (finish time, blocks), FIFO
    active_blocks: int = 0
    busy_s: float = 0.0
    num_requests: int = 0
    assigned_tokens: int = 0  # uncached prompt tokens of every request sent here
    summary: SummaryBuilder | None = None  # set by a policy that reads prefix summaries

    def note_prefilled(self, block_ids: tuple[int, ...]) -> None:
        """The worker's own summary bookkeeping: the prompt's probe keys, anchored at their blocks."""
        if self.summary is not None:
            keys = probe_keys(block_ids, 1)
            self.summary.note(keys, [block_ids[d - 1] for d in probe_depths(len(block_ids))])

    def advance(self, now_s: float) -> None:
        """Retire requests finished by ``now_s``."""
        while self.inflight and self.inflight[0][0] <= now_s:
            _, num_blocks = self.inflight.popleft()
            self.active_blocks -= num_blocks

    @property
    def num_running(self) -> int:
        return len(self.inflight)


class PoolView:
    """What a policy may look at when it decides (read-only by convention)."""

    def __init__(self, workers: list[SimWorker], cost: CostModel):
        self.workers = workers
        self.cost = cost
        self.now_s = 0.0

    def queued_tokens(self, index: int) -> int:
        """Remaining work of worker ``index`` in token-equivalents."""
        remaining_s = max(0.0, self.workers[index].free_at_s - self.now_s)
        return int(remaining_s * self.cost.prefill_tokens_per_s)

    def computed_tokens(self, index: int, queued_tokens: int) -> int:
        """Prompt tokens worker ``index`` has computed by now (what it was sent, less what is queued)."""
        return max(0, self.workers[index].assigned_tokens - queued_tokens)


@dataclass
class PolicyResult:
    """Replay figures for one policy."""

    policy: str
    block_hit_rate: float
    ideal_hit_rate: float
    hit_rate_vs_ideal: float
    load_max_over_mean: float
    queue_delay_p50_s: float
    queue_delay_p99_s: float
    ttft_p99_s: float
    decisions_per_s: float
    requests_max_over_mean: float
    reasons: dict[str, int]


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile (0 for no values)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def ideal_hit_rate(requests: Sequence[SimRequest], capacity_blocks: int) -> float:
    """Block hit rate of one LRU cache of ``capacity_blocks`` serving every request in order."""
    cache = LRUPrefixCache(capacity_blocks)
    num_hit = num_total = 0
    for request in requests:
        num_hit += cache.match(request.block_ids)
        num_total += len(request.block_ids)
        cache.insert(request.block_ids)
    return num_hit / num_total if num_total else 0.0


def simulate(
    requests: Sequence[SimRequest],
    policy,  # router.replay.policies.ReplayPolicy (not imported: avoids a cycle)
    num_workers: int,
    capacity_blocks: int,
    cost: CostModel,
    ideal: float,
    on_request=None,
) -> PolicyResult:
    """Replay ``requests`` through ``policy`` on a fresh pool; ``on_request(request, index, hit_blocks,
    best_blocks (most any worker held), start_s, finish_s)`` after each placement (``diagnose``)."""
    workers = [SimWorker(f"prefill-{i}", LRUPrefixCache(capacity_blocks)) for i in range(num_workers)]
    view = PoolView(workers, cost)
    policy.reset(view)
    num_hit = num_total = 0
    queue_delays: list[float] = []
    ttfts: list[float] = []
    for request in requests:
        now = request.arrival_s
        view.now_s = now
        for worker in workers:
            worker.advance(now)
        index = policy.choose(request, view)
        worker = workers[index]
        hit_blocks = worker.cache.match(request.block_ids)
        if on_request is not None:
            best_blocks = max(w.cache.match(request.block_ids) for w in workers)
        worker.cache.insert(request.block_ids)
        worker.note_prefilled(request.block_ids)
        num_hit += hit_blocks
        num_total += len(request.block_ids)
        uncached_tokens = max(0, request.num_tokens - hit_blocks * cost.block_tokens)
        service = cost.service_s(uncached_tokens)
        start = max(now, worker.free_at_s)
        worker.free_at_s = start + service
        worker.inflight.append((worker.free_at_s, len(request.block_ids)))
        worker.active_blocks += len(request.block_ids)
        worker.busy_s += service
        worker.num_requests += 1
        worker.assigned_tokens += uncached_tokens
        queue_delays.append(start - now)
        ttfts.append(worker.free_at_s - now)
        if on_request is not None:
            on_request(request, index, hit_blocks, best_blocks, start, worker.free_at_s)
    hit_rate = num_hit / num_total if num_total else 0.0
    busy = [w.busy_s for w in workers]
    counts = [w.num_requests for w in workers]
    return PolicyResult(
        policy=policy.name,
        block_hit_rate=hit_rate,
        ideal_hit_rate=ideal,
        hit_rate_vs_ideal=hit_rate / ideal if ideal else 0.0,
        load_max_over_mean=max(busy) / (sum(busy) / len(busy)) if sum(busy) else 0.0,
        queue_delay_p50_s=percentile(queue_delays, 0.50),
        queue_delay_p99_s=percentile(queue_delays, 0.99),
        ttft_p99_s=percentile(ttfts, 0.99),
        decisions_per_s=policy.num_decisions / policy.decision_s if policy.decision_s > 0 else 0.0,
        requests_max_over_mean=max(counts) / (sum(counts) / len(counts)) if sum(counts) else 0.0,
        reasons=dict(sorted(policy.reasons.items())),
    )
