"""cluster.attribution without Ray: the response's cache attribution, the hit-rate warning, the KV review."""

from __future__ import annotations

import asyncio
import logging

from prometheus_client import CollectorRegistry

from cluster.attribution import (
    AttributionConfig,
    CacheAttributionRecorder,
    HitRateMonitor,
    cache_usage_extension,
    tenant_kv_infos,
    tenant_loads,
)
from cluster.stats import ReplicaLoad, TenantLoad
from engine.config import EngineConfig
from engine.eviction_log import PrefixMiss
from engine.llm_engine import LLMEngine
from engine.sampling import SamplingParams
from protos import pdserve_pb2 as pb
from worker_common.engine_loop import EngineLoop
from worker_common.messages import CacheAttribution


def _cache(cached: int, route: str = "ring_owner", cause: str = "", cacheable: int = 64) -> CacheAttribution:
    return CacheAttribution(cached, cacheable, cause, route_reason=route)


def test_from_miss_and_the_route_decide_the_cause() -> None:
    evicted = PrefixMiss(4, 1, True, 3, (("b", 2), ("c", 1)), 10.0, 12.0)
    cache = CacheAttribution.from_miss(evicted, 16, "p0")
    assert (cache.cached_tokens, cache.cacheable_tokens, cache.cause) == (16, 64, "evicted")
    assert cache.evicted_by_tenant == "b" and cache.replica_id == "p0"
    assert cache.with_route("ring_owner").cause == "evicted"
    assert cache.with_route("ring_walk").cause == "ring_walk"  # walked off the owner: that is the cause
    assert cache.with_route("replicate").cause == "ring_walk"  # cache_aware: every holder too loaded
    assert CacheAttribution.from_miss(PrefixMiss(4, 0), 16).cause == "never_cached"
    full = CacheAttribution.from_miss(PrefixMiss(4, 4), 16)
    assert full.cause == "" and full.with_route("ring_walk").cause == ""  # nothing lost, nothing to blame
    assert CacheAttribution.from_miss(None, 16).cacheable_tokens == 0


def test_recorder_fills_the_response_and_the_http_extension() -> None:
    registry = CollectorRegistry()
    recorder = CacheAttributionRecorder(AttributionConfig(), registry)
    cache = CacheAttribution(16, 64, "evicted", 3, (("b", 3),), 10.0, 12.5, "ring_owner", "p0")
    response = pb.GenerateResponse()
    response.usage.cached_tokens = 16
    recorder.record(response, cache)
    got = response.cache
    assert (got.cached_tokens, got.cacheable_tokens, got.cause, got.evicted_blocks) == (16, 64, "evicted", 3)
    assert [(s.tenant, s.blocks) for s in got.evicted_by] == [("b", 3)] and got.replica == "p0"
    assert registry.get_sample_value("pdserve:prefix_cache_short_requests_total", {"cause": "evicted"}) == 1
    assert registry.get_sample_value("pdserve:prefix_cache_lost_tokens_total", {"cause": "evicted"}) == 48
    extension = cache_usage_extension(got)
    assert extension["evicted_by"] == [{"tenant": "b", "blocks": 3}] and extension["last_evicted_at"] == 12.5
    wire = pb.GenerateResponse.FromString(response.SerializeToString())
    assert wire.cache == got
    colocated = pb.GenerateResponse()
    colocated.usage.cached_tokens = 32
    recorder.record(colocated, None)
    assert colocated.cache.cached_tokens == 32 and colocated.cache.cause == ""


def test_hit_rate_monitor_stays_quiet_for_prompts_that_never_repeat() -> None:
    monitor = HitRateMonitor(AttributionConfig(window_requests=8, baseline_requests=32))
    verdicts = [monitor.observe(_cache(0, cause="never_cached")) for _ in range(40)]
    assert all(v is not None and not v.is_low for v in verdicts)  # expected ~0: nothing to fall from
    assert monitor.observe(CacheAttribution(0, 0)) is None  # nothing cacheable says nothing


def test_hit_rate_warning_when_everything_goes_by_fallback(caplog) -> None:
    now = [0.0]
    registry = CollectorRegistry()
    config = AttributionConfig(window_requests=8, baseline_requests=64, warn_interval_s=10.0)
    recorder = CacheAttributionRecorder(config, registry, clock=lambda: now[0])
    for _ in range(32):  # steady state: ring owners serve 3/4 of the cacheable tokens
        recorder.record(pb.GenerateResponse(), _cache(48))
    assert registry.get_sample_value("pdserve:prefix_hit_rate_low") == 0
    assert registry.get_sample_value("pdserve:prefix_hit_rate_expected") == 0.75
    with caplog.at_level(logging.WARNING, logger="cluster.attribution"):
        for _ in range(8):  # then every request walks the ring and misses
            recorder.record(pb.GenerateResponse(), _cache(0, "ring_walk", "ring_walk"))
            now[0] += 1.0
    verdict = recorder.monitor.verdict()
    assert verdict.is_low and verdict.realized == 0.0 and verdict.owner_fraction == 0.0
    assert verdict.causes == (("ring_walk", 8),)
    assert registry.get_sample_value("pdserve:prefix_hit_rate_low") == 1
    warnings = [r for r in caplog.records if "prefix hit rate" in r.getMessage()]
    assert len(warnings) == 1 and "ring_walk" in warnings[0].getMessage()  # rate-limited: one per 10 s
    assert registry.get_sample_value("pdserve:prefix_hit_rate_warnings_total") == 1
    for _ in range(8):  # the owners serve again: the window recovers
        recorder.record(pb.GenerateResponse(), _cache(64))
    assert not recorder.monitor.verdict().is_low


def test_hit_rate_warning_when_a_prefix_stops_repeating() -> None:
    monitor = HitRateMonitor(AttributionConfig(window_requests=8, baseline_requests=256))
    for _ in range(64):
        monitor.observe(_cache(64))
    for _ in range(8):  # same routing, but the prompts no longer share their prefix
        verdict = monitor.observe(_cache(0, cause="never_cached"))
    assert verdict is not None and verdict.is_low and verdict.expected > 0.8 and verdict.owner_fraction == 1


def _tenant(tenant: str, active: int, tokens: int, max_tokens: int, cached: int) -> TenantLoad:
    return TenantLoad(tenant, active, tokens, max_tokens, 1, cached, 10, 10 * cached, 2, 0, 3, 4)


def test_tenant_kv_infos_sums_a_pool_per_tenant() -> None:
    def load(replica: str, *tenants: TenantLoad) -> ReplicaLoad:
        return ReplicaLoad(replica, 0, 0, 0, 8, 0, 0, 8, 8, 0, 0, 0, 0, 0.0, tenants=tenants)

    loads = [
        load("r0", _tenant("a", 2, 100, 60, 3)),
        load("r1", _tenant("a", 1, 20, 20, 1), _tenant("b", 0, 0, 0, 5)),
    ]
    a, b = tenant_kv_infos(loads)
    assert (a.tenant, a.active_requests, a.mean_active_tokens, a.max_active_tokens) == ("a", 3, 40.0, 60)
    assert (a.kv_blocks_cached, a.kv_bytes_cached, a.allocation_failures, a.evicted_blocks) == (4, 40, 4, 6)
    assert (b.tenant, b.active_requests, b.mean_active_tokens, b.kv_blocks_cached) == ("b", 0, 0.0, 5)
    assert [t.tenant for t in tenant_kv_infos(loads, only_tenant="b")] == ["b"]


class _Worker:
    """What ``tenant_loads`` reads of a worker: its engine, engine loop and live callers."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.engine_loop = EngineLoop(engine, lambda outputs: None)
        self.live: set[str] = set()

    def live_request_ids(self) -> set[str]:
        return set(self.live)


def test_tenant_loads_counts_requests_and_orphans_from_a_real_engine() -> None:
    engine = LLMEngine(EngineConfig(kv_cache_bytes=64 * 2**16, max_num_seqs=1, num_threads=1))  # 64 blocks
    worker = _Worker(engine)
    params = SamplingParams(max_tokens=200, ignore_eos=True)
    engine.add_request("a-live", [1] * 40, params, tenant="a")
    engine.add_request("a-gone", [2] * 100, params, tenant="a")  # waits (max_num_seqs=1): still active
    engine.add_request("b-live", [3] * 20, params, tenant="b")
    worker.live = {"a-live", "b-live"}  # a-gone's client left, its abort not run yet
    engine.step()  # a-live admitted and prefilled: 3 blocks
    worker.engine_loop.start()
    try:
        loads = {t.tenant: t for t in asyncio.run(tenant_loads(worker))}
    finally:
        worker.engine_loop.stop()
    a, b = loads["a"], loads["b"]
    assert (a.active_requests, a.orphaned_requests, b.active_requests, b.orphaned_requests) == (2, 1, 1, 0)
    assert a.max_active_tokens >= 100 and a.active_tokens >= 140
    assert a.kv_blocks_used >= 3 and a.kv_bytes_used == a.kv_blocks_used * engine.kv_layout.block_bytes
    for request_id in ("a-live", "a-gone", "b-live"):
        engine.abort_request(request_id)
    assert engine.pool.num_used_blocks == 0
