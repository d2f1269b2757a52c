"""The optimized cache_aware policy and decode choice against plain restatements of their rules.

``reference_choose`` is ``router/cache_aware.py``'s docstring written out the slow, obvious way (a
cost dict over every worker, the holder walk over the whole ring order): the policy's fast path
(costs kept as queued - saved, a single holder skipping the walk) must pick the same worker, reason
and cached tokens in every state. Random states cover every branch: nobody holds the prompt, everyone
holds a shared preamble, one or several deepest holders, splits and replication.
"""

from __future__ import annotations

import random

from engine.prefix_summary import PrefixSummary, depth_tokens
from router.cache_aware import CacheAwarePolicy
from router.config import RouterConfig
from router.decisions import RouteReason
from router.load import LoadReport, LoadTable
from router.ring import HashRing, int_key_position

WORKERS = [f"prefill-{i}" for i in range(6)]
RING = HashRing(WORKERS)


def first_within(walk, costs: dict[str, int], limit: int) -> str:
    return next(w for w in walk if costs[w] <= limit)


def reference_choose(config: RouterConfig, probes, depths, num_tokens, loads: LoadTable, computed=None):
    """``computed``: each worker's reported computed prompt tokens (its work = that + queued)."""
    cap = max(0, num_tokens - 1)
    costs, matched = {}, {}
    for worker_id in loads.worker_ids:
        held = loads.held[worker_id]
        depth = 0
        while depth < len(probes) and probes[depth] in held:
            depth += 1
        if depth:
            matched[worker_id] = depth
        cached = min(depths[depth - 1], cap) if depth else 0
        costs[worker_id] = loads.queued_tokens(worker_id) + num_tokens - cached
    cheapest = min(costs.values())
    if not probes:
        return first_within(RING.walk_from_position(0), costs, cheapest), RouteReason.LEAST_LOADED, 0
    deepest = max(matched.values(), default=0)
    caching = [w for w in loads.worker_ids if loads.held[w]]  # a worker holding nothing shares nothing
    shallowest = min(matched.values()) if len(matched) == len(caching) > 1 else 0
    ring_key = probes[deepest] if deepest < len(probes) else probes[-1]
    walk = RING.walk_from_position(int_key_position(ring_key))
    if deepest > shallowest or deepest == len(probes):
        holders = [w for w in walk if matched.get(w) == deepest]
        primary, best = holders[0], min(holders, key=lambda w: (costs[w], holders.index(w)))
        if costs[best] < costs[primary] - config.split_margin_tokens:
            chosen, reason = best, RouteReason.CACHE_SPLIT
        else:
            chosen, reason = primary, RouteReason.PREFIX_CACHE
        margin = config.replicate_margin_tokens
        if config.replicate_margin_factor:
            margin = min(margin, int(config.replicate_margin_factor * depths[deepest - 1]))
        if costs[chosen] > cheapest + margin:
            chosen, reason = first_within(walk, costs, cheapest + margin), RouteReason.REPLICATE
    else:
        limit = cheapest + config.new_prefix_slack_tokens
        within = [w for w in walk if costs[w] <= limit]
        if config.new_prefix_work_factor:  # bounded work: skip workers above the bound if any is under
            work = {w: (computed or {}).get(w, 0) + loads.queued_tokens(w) for w in walk}
            mean_bound = config.new_prefix_work_factor * sum(work.values()) / len(work)
            bound = max(config.new_prefix_work_floor_tokens, mean_bound)
            within = [w for w in within if work[w] <= bound] or within
        chosen = within[0]
        reason = RouteReason.RING_OWNER if chosen == walk[0] else RouteReason.RING_WALK
    return chosen, reason, depths[matched[chosen] - 1] if chosen in matched else 0


def test_fast_path_matches_the_reference_rule_in_random_states() -> None:
    rng = random.Random(7)
    depths = depth_tokens(16, 64)
    reasons = set()
    work_walks = 0
    for trial in range(3000):
        config = RouterConfig(
            block_size=16,
            replicate_margin_tokens=rng.choice([0, 500, 3000, 49152]),
            split_margin_tokens=rng.choice([0, 100, 4096]),
            replicate_margin_factor=rng.choice([0.0, 0.5, 2.0]),
            new_prefix_slack_tokens=rng.choice([0, 200, 5000]),
            new_prefix_work_factor=rng.choice([0.0, 0.0, 1.0, 1.1, 1.5]),
            new_prefix_work_floor_tokens=rng.choice([0, 0, 5000]),
        )
        loads = LoadTable(config, WORKERS)
        computed = {w: rng.choice([0, rng.randrange(0, 20000)]) for w in WORKERS}
        num_probes = rng.randrange(0, 9)
        probes = [rng.randrange(1 << 60) for _ in range(num_probes)]
        preamble = rng.randrange(0, num_probes + 1) if rng.random() < 0.3 else 0  # held by everyone
        for worker_id in WORKERS:
            held = rng.randrange(0, num_probes + 1) if rng.random() < 0.5 else 0
            keys = tuple(probes[: max(held, preamble)]) + tuple(rng.randrange(1 << 60) for _ in range(5))
            if rng.random() < 0.15:
                keys = ()  # a worker that has cached nothing yet
            summary = PrefixSummary(1, keys)
            queued = rng.randrange(0, 8000)
            report = LoadReport(worker_id, queued, 0, 10, 10, 1.0, summary, computed[worker_id])
            loads.update(report)
            if rng.random() < 0.3:
                loads.debit(worker_id, queued_tokens=rng.randrange(0, 3000))
        num_tokens = rng.choice([0, 1, 16, 300, 4096, 9000])
        expected = reference_choose(config, probes, depths, num_tokens, loads, computed)
        assert CacheAwarePolicy(config).choose(probes, depths, num_tokens, RING, loads) == expected, trial
        reasons.add(expected[1])
        if config.new_prefix_work_factor and expected[1] == RouteReason.RING_WALK:
            work_walks += 1
    assert work_walks > 50  # the work bound moved some new prefixes along the ring
    assert reasons == {
        RouteReason.LEAST_LOADED, RouteReason.RING_OWNER, RouteReason.RING_WALK, RouteReason.PREFIX_CACHE,
        RouteReason.CACHE_SPLIT, RouteReason.REPLICATE,
    }  # fmt: skip


def test_most_free_kv_matches_the_per_worker_reads() -> None:
    rng = random.Random(3)
    for _ in range(500):
        workers = [f"decode-{i}" for i in range(rng.randrange(1, 6))]
        loads = LoadTable(RouterConfig(), workers)
        for worker_id in workers:
            if rng.random() < 0.7:
                free = rng.randrange(0, 5)
                loads.update(LoadReport(worker_id, 0, rng.randrange(0, 3), free, 10, 1.0))
            if rng.random() < 0.5:
                loads.debit(worker_id, running_requests=rng.randrange(0, 3), kv_blocks=rng.randrange(0, 3))
        reported = [w for w in sorted(workers) if loads.free_kv_blocks(w) is not None]
        order = {w: (loads.free_kv_blocks(w), -loads.running_requests(w), -i) for i, w in enumerate(reported)}
        best = max(reported, key=order.__getitem__, default=None)
        unreported = [w for w in sorted(workers) if loads.free_kv_blocks(w) is None]
        free = loads.free_kv_blocks(best) if best is not None else 0
        assert loads.most_free_kv() == (best, free, unreported)
