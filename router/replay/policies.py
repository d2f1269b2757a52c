"""The policies a replay compares, behind one small interface.

- ``round_robin``, ``least_loaded``, ``consistent_hash``, ``pdserve``: pdserve's own ``Router`` with
  that config policy (``pdserve`` = ``prefix_hash``: ring owner of the prefix key, load-watermark
  fallback). Before each decision every worker's current load report is fed to the router (reports
  are fresh; the time to ingest them is not counted as decision time).
- ``sglang_cache_aware``: SGLang's router ``cache_aware`` rule, written from its published
  description: if the load is imbalanced (``max - min > balance_abs_threshold`` and
  ``max > balance_rel_threshold * min``, load = in-flight requests) take the least-loaded worker;
  otherwise the worker whose approximate prefix tree matches the most of the prompt, if that match
  rate exceeds ``cache_threshold``, else the worker with the smallest tree. The router's tree per
  worker records what it routed there (no eviction at SGLang's default tree size); it is not the
  worker's real cache, exactly as in SGLang.
- ``dynamo_kv_cost``: NVIDIA Dynamo's KV-router cost, written from its published description:
  ``cost = prefill_load_scale * max(active_prefill_blocks + prompt_blocks - overlap_blocks, 0)
  + (active_decode_blocks + prompt_blocks)``, lowest cost wins (temperature 0; ties broken at
  random with a fixed seed). Overlap comes from the workers' real caches (Dynamo's KV events make its
  index exact); active prefill blocks are the queued prefill tokens in blocks, active decode blocks
  the blocks of the worker's unfinished requests.
"""

from __future__ import annotations

import random
import time
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Hashable

from engine.prefix_summary import PrefixSummary, SummaryBuilder, probe_keys
from router.config import RouterConfig
from router.load import LoadReport
from router.prefix import PrefixKeyer
from router.replay.simulator import PoolView, SimRequest
from router.router import Router


class ReplayPolicy(ABC):
    """Picks a worker index for each request; times its own decisions in thread CPU time."""

    name: str

    def __init__(self) -> None:
        self.decision_s = 0.0
        self.num_decisions = 0
        self.reasons: Counter[str] = Counter()

    def reset(self, view: PoolView) -> None:
        """Start a fresh replay on ``view``'s pool."""
        self.decision_s = 0.0
        self.num_decisions = 0
        self.reasons = Counter()

    @abstractmethod
    def choose(self, request: SimRequest, view: PoolView) -> int:
        """The worker index for ``request``."""


class RouterPolicy(ReplayPolicy):
    """pdserve's ``Router`` under a given config; the prefix key is the chain over the block ids."""

    def __init__(self, name: str, config: RouterConfig):
        super().__init__()
        self.name = name
        self.config = config

    def reset(self, view: PoolView) -> None:
        super().reset(view)
        self._router = Router(self.config)
        self._ids = [w.worker_id for w in view.workers]
        self._index = {worker_id: i for i, worker_id in enumerate(self._ids)}
        self._router.set_workers(self._ids, [])
        self._keyer = PrefixKeyer(self.config.block_size, self.config.prefix_depth_blocks)

    def choose(self, request: SimRequest, view: PoolView) -> int:
        for i, worker in enumerate(view.workers):
            capacity = worker.cache.capacity_blocks
            free = max(0, capacity - worker.active_blocks)
            report = LoadReport(
                worker.worker_id, view.queued_tokens(i), worker.num_running, free, capacity, view.now_s
            )
            self._router.update_load(report)
        start = time.thread_time()
        key = self._keyer.key_of_block_ids(request.block_ids)
        choice = self._router.choose_prefill_by_key(key, request.num_tokens)
        self.decision_s += time.thread_time() - start
        self.num_decisions += 1
        self.reasons[choice.reason.value] += 1
        return self._index[choice.worker_id]


class PdservePolicy(RouterPolicy):
    """pdserve's ``Router`` with the cache_aware policy, fed each worker's prefix summary.

    Each simulated worker keeps a ``engine.prefix_summary.SummaryBuilder`` over its own LRU cache (the
    anchor of a probe key is the block id at its depth) and rebuilds its summary every
    ``summary_period_s`` of simulated time; between rebuilds its reports carry the same summary
    (the router counts what it has itself sent since). Load reports are fresh at every decision, as
    for the other Router policies.
    """

    def __init__(self, name: str, config: RouterConfig, summary_period_s: float):
        super().__init__(name, config)
        self.summary_period_s = summary_period_s

    def reset(self, view: PoolView) -> None:
        super().reset(view)
        for worker in view.workers:
            worker.summary = SummaryBuilder(self.config.summary_max_keys)
        self._summaries: list[PrefixSummary | None] = [None for _ in view.workers]
        self._built_at = -float("inf")
        self.summary_keys_max = 0

    def choose(self, request: SimRequest, view: PoolView) -> int:
        rebuild = view.now_s - self._built_at >= self.summary_period_s
        if rebuild:
            self._built_at = view.now_s
        for i, worker in enumerate(view.workers):
            if rebuild and worker.summary is not None:
                self._summaries[i] = worker.summary.build(worker.cache.__contains__)
                self.summary_keys_max = max(self.summary_keys_max, len(self._summaries[i].keys))
            capacity = worker.cache.capacity_blocks
            free = max(0, capacity - worker.active_blocks)
            queued = view.queued_tokens(i)
            report = LoadReport(
                worker.worker_id, queued, worker.num_running, free, capacity, view.now_s,
                self._summaries[i], view.computed_tokens(i, queued),
            )
            self._router.update_load(report)
        start = time.thread_time()
        probes = probe_keys(request.block_ids, 1)
        choice = self._router.choose_prefill_by_probes(probes, request.num_tokens)
        self.decision_s += time.thread_time() - start
        self.num_decisions += 1
        self.reasons[choice.reason.value] += 1
        return self._index[choice.worker_id]


class SGLangCacheAware(ReplayPolicy):
    """SGLang's cache-aware rule (see the module docstring); defaults are SGLang's."""

    name = "sglang_cache_aware"

    def __init__(
        self,
        cache_threshold: float = 0.3,
        balance_abs_threshold: int = 64,
        balance_rel_threshold: float = 1.5,
    ):
        super().__init__()
        self.cache_threshold = cache_threshold
        self.balance_abs_threshold = balance_abs_threshold
        self.balance_rel_threshold = balance_rel_threshold

    def reset(self, view: PoolView) -> None:
        super().reset(view)
        self._trees: list[set[Hashable]] = [set() for _ in view.workers]

    def choose(self, request: SimRequest, view: PoolView) -> int:
        start = time.thread_time()
        loads = [w.num_running for w in view.workers]
        max_load, min_load = max(loads), min(loads)
        blocks = request.block_ids
        if (
            max_load - min_load > self.balance_abs_threshold
            and max_load > self.balance_rel_threshold * min_load
        ):
            index, reason = loads.index(min_load), "shortest_queue"
        else:
            best_index, best_match = 0, -1
            for i, tree in enumerate(self._trees):
                matched = 0
                for block_id in blocks:
                    if block_id not in tree:
                        break
                    matched += 1
                if matched > best_match or (matched == best_match and loads[i] < loads[best_index]):
                    best_index, best_match = i, matched
            if blocks and best_match / len(blocks) > self.cache_threshold:
                index, reason = best_index, "cache_match"
            else:
                sizes = [len(tree) for tree in self._trees]
                index, reason = min(range(len(sizes)), key=lambda i: (sizes[i], loads[i], i)), "smallest_tree"
        self._trees[index].update(blocks)
        self.decision_s += time.thread_time() - start
        self.num_decisions += 1
        self.reasons[reason] += 1
        return index


class DynamoKvCost(ReplayPolicy):
    """Dynamo's KV-router cost rule (see the module docstring)."""

    name = "dynamo_kv_cost"

    def __init__(self, prefill_load_scale: float = 1.0, seed: int = 0):
        super().__init__()
        self.prefill_load_scale = prefill_load_scale
        self.seed = seed

    def reset(self, view: PoolView) -> None:
        super().reset(view)
        self._rng = random.Random(self.seed)

    def choose(self, request: SimRequest, view: PoolView) -> int:
        start = time.thread_time()
        blocks = request.block_ids
        prompt_blocks = len(blocks)
        block_tokens = view.cost.block_tokens
        best_cost = float("inf")
        best: list[int] = []
        for i, worker in enumerate(view.workers):
            overlap = worker.cache.match(blocks)
            active_prefill_blocks = view.queued_tokens(i) / block_tokens
            prefill = max(active_prefill_blocks + prompt_blocks - overlap, 0.0)
            cost = self.prefill_load_scale * prefill + worker.active_blocks + prompt_blocks
            if cost < best_cost:
                best_cost, best = cost, [i]
            elif cost == best_cost:
                best.append(i)
        index = best[0] if len(best) == 1 else self._rng.choice(best)
        self.decision_s += time.thread_time() - start
        self.num_decisions += 1
        self.reasons["min_cost"] += 1
        return index


POLICY_NAMES = (
    "round_robin",
    "least_loaded",
    "consistent_hash",
    "prefix_hash",
    "pdserve",
    "sglang_cache_aware",
    "dynamo_kv_cost",
)


def make_replay_policy(
    name: str, pdserve_config: RouterConfig, summary_period_s: float = 1.0
) -> ReplayPolicy:
    """A replay policy by name; the Router-based ones share ``pdserve_config`` (policy replaced)."""
    if name == "pdserve":
        config = pdserve_config.model_copy(update={"policy": "cache_aware"})
        return PdservePolicy(name, config, summary_period_s)
    router_policies = {
        "round_robin": "round_robin",
        "least_loaded": "least_loaded",
        "consistent_hash": "consistent_hash",
        "prefix_hash": "prefix_hash",
    }
    if name in router_policies:
        config = pdserve_config.model_copy(update={"policy": router_policies[name]})
        return RouterPolicy(name, config)
    if name == "sglang_cache_aware":
        return SGLangCacheAware()
    if name == "dynamo_kv_cost":
        return DynamoKvCost()
    raise ValueError(f"unknown policy {name!r}; expected one of {', '.join(POLICY_NAMES)}")
