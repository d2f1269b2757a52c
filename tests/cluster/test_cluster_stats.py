"""``cluster.stats.ReplicaLoad``: one typed load report from the engine's stats to the router, the
autoscaling metrics and ClusterInfo; "free" and "allocatable" KV blocks kept apart."""

from __future__ import annotations

import pickle

from cluster.replica_directory import ReplicaView
from cluster.route_policy import _load_report
from cluster.stats import ReplicaLoad
from engine.outputs import EngineStats

STATS = EngineStats(
    num_blocks_total=100,
    num_blocks_used=30,
    num_blocks_cached=20,
    num_blocks_free=50,
    num_blocks_allocatable=70,
    num_running=3,
    num_waiting=2,
    num_pinned=1,
    num_queued_prefill_tokens=400,
    num_prompt_tokens=1000,
    num_cached_tokens=250,
    num_generated_tokens=77,
    num_preemptions=1,
    num_requests_added=9,
)


def test_from_engine_keeps_free_and_allocatable_apart() -> None:
    load = ReplicaLoad.from_engine("r1", STATS, recomputed_requests=2)
    assert load.kv_blocks_free == 50 and load.kv_blocks_cached == 20 and load.kv_blocks_allocatable == 70
    assert load.kv_blocks_used + load.kv_blocks_cached + load.kv_blocks_free == load.kv_blocks_total
    assert load.prefix_hit_rate == 0.25 and load.kv_blocks_used_fraction == 0.3
    assert load.load == 5 and load.recomputed_requests == 2 and load.reported_at > 0


def test_it_survives_ray_pickling_and_serves_routing_stats_round_trip() -> None:
    load = ReplicaLoad.from_engine("r1", STATS, pinned_requests=1, leases_expired=0)
    assert pickle.loads(pickle.dumps(load)) == load
    assert ReplicaLoad.from_routing_stats(load.to_routing_stats()) == load
    assert ReplicaLoad.from_routing_stats({}) is None and ReplicaLoad.from_routing_stats(None) is None


def test_the_router_gets_allocatable_blocks_as_its_headroom() -> None:
    load = ReplicaLoad.from_engine("r1", STATS)
    report = _load_report(ReplicaView("r1", load))
    assert report is not None
    assert report.free_kv_blocks == 70 and report.total_kv_blocks == 100
    assert report.queued_prefill_tokens == 400 and report.running_requests == 5
    assert report.reported_at == load.reported_at
    assert load.requests_received == report.requests_received == 9  # the charges it has seen
    assert _load_report(ReplicaView("r2", None)) is None  # before the replica's first report
