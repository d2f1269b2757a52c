"""cluster.metrics without a cluster: recording a final response, the replica gauges, the parsed scrape."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from cluster.admission import AdmissionConfig, AdmissionRefused, KVAdmission, NeverFits
from cluster.metrics import IngressMetrics, MetricsConfig, RequestFacts, route_decisions
from cluster.migration import (
    DecodeReplicaLost,
    MigrationConfig,
    MigrationFailed,
    MigrationLog,
    StreamProgress,
)
from cluster.openai_api.metrics import HttpMetrics
from cluster.stats import ReplicaLoad
from protos import pdserve_pb2 as pb


def _samples(metrics: IngressMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(metrics.registry).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _final(
    reason: str = "prefill=ring_owner decode=kv_headroom", transport: str = "nixl"
) -> pb.GenerateResponse:
    response = pb.GenerateResponse(finish_reason=pb.FINISH_REASON_LENGTH)
    response.usage.prompt_tokens, response.usage.cached_tokens, response.usage.completion_tokens = 40, 32, 5
    timings = response.timings
    timings.ttft_ms, timings.e2e_ms, timings.queue_ms = 30.0, 70.0, 2.0
    timings.prefill_ms, timings.kv_transfer_ms, timings.mean_tpot_ms = 20.0, 3.0, 10.0
    response.route.reason, response.route.kv_transport = reason, transport
    return response


def _load(replica_id: str, used: int, cached: int, **fields: object) -> ReplicaLoad:
    values: dict[str, object] = dict(
        replica_id=replica_id, running_requests=2, queued_requests=1, queued_prefill_tokens=7,
        kv_blocks_total=100, kv_blocks_used=used, kv_blocks_cached=cached, kv_blocks_free=100 - used - cached,
        kv_blocks_allocatable=100 - used, prompt_tokens=0, cached_tokens=0, generated_tokens=0,
        preemptions=3, reported_at=0.0,
    )
    values.update(fields)
    return ReplicaLoad(**values)  # type: ignore[arg-type]


def test_route_decisions_parses_the_route_reason() -> None:
    assert route_decisions("prefill=ring_walk decode=kv_headroom") == [
        ("prefill", "ring_walk"), ("decode", "kv_headroom")
    ]
    assert route_decisions("colocated=least_loaded") == [("colocated", "least_loaded")]
    assert route_decisions("") == []


def test_record_fills_histograms_and_counters() -> None:
    metrics = IngressMetrics()
    facts = RequestFacts(((0.02, 2), (0.01, 1), (0.03, 1)), 4096, True, True)
    metrics.record(_final(), facts)
    metrics.record(_final("colocated=least_loaded", ""), RequestFacts())
    s = _samples(metrics)
    assert s[("pdserve:time_to_first_token_seconds_count", ())] == 2
    assert s[("pdserve:time_to_first_token_seconds_sum", ())] == 0.06
    assert s[("pdserve:e2e_request_latency_seconds_count", ())] == 2
    assert s[("pdserve:request_prefill_time_seconds_count", ())] == 1  # colocated: no prefill phase
    assert s[("pdserve:request_kv_transfer_time_seconds_count", ())] == 1
    assert s[("pdserve:inter_token_latency_seconds_count", ())] == 4  # one per token after the first
    assert abs(s[("pdserve:inter_token_latency_seconds_sum", ())] - 0.06) < 1e-9
    assert s[("pdserve:request_time_per_output_token_seconds_count", ())] == 2
    assert s[("pdserve:prompt_tokens_total", ())] == 80
    assert s[("pdserve:cached_prompt_tokens_total", ())] == 64
    assert s[("pdserve:generation_tokens_total", ())] == 10
    assert s[("pdserve:request_success_total", (("finished_reason", "length"),))] == 2
    assert s[("pdserve:router_decisions_total", (("reason", "ring_owner"), ("stage", "prefill")))] == 1
    assert s[("pdserve:router_decisions_total", (("reason", "least_loaded"), ("stage", "colocated")))] == 1
    assert s[("pdserve:kv_transfer_bytes_total", (("transport", "nixl"),))] == 4096
    assert s[("pdserve:kv_recomputes_total", ())] == 0


def test_disabled_metrics_record_nothing_but_still_render() -> None:
    metrics = IngressMetrics(MetricsConfig(enabled=False))
    metrics.record(_final(), RequestFacts(((0.02, 2),), 4096, True, True))
    s = _samples(metrics)
    assert s[("pdserve:time_to_first_token_seconds_count", ())] == 0
    assert s[("pdserve:generation_tokens_total", ())] == 0
    assert ("pdserve:pool_replicas", ()) not in s  # no pools given yet; the gauges render once they are


def test_a_recompute_counts_no_transfer_bytes() -> None:
    metrics = IngressMetrics()
    metrics.record(_final(transport="recompute"), RequestFacts((), 4096, True, True))
    s = _samples(metrics)
    assert s[("pdserve:kv_recomputes_total", ())] == 1
    assert not any(name == "pdserve:kv_transfer_bytes_total" for name, _ in s)


def test_replica_gauges_and_evictions_come_from_the_loads() -> None:
    metrics = IngressMetrics()
    prefill = _load("p1", used=10, cached=30, pinned_requests=1)
    decode = _load("d1", used=25, cached=5, evictions=(("alice", "bob", 12),))
    metrics.set_pool_loads([("prefill", [prefill]), ("decode", [decode])])
    s = _samples(metrics)
    d1 = (("pool", "decode"), ("replica", "d1"))
    assert s[("vllm:num_requests_running", d1)] == 2
    assert s[("vllm:num_requests_waiting", d1)] == 1
    assert s[("vllm:kv_cache_usage_perc", d1)] == 0.25
    assert s[("pdserve:kv_blocks_used", d1)] == 25
    assert s[("pdserve:kv_blocks_cached", d1)] == 5
    assert s[("pdserve:kv_blocks_free", d1)] == 70
    assert s[("pdserve:num_requests_pinned", (("pool", "prefill"), ("replica", "p1")))] == 1
    assert s[("pdserve:replica_preemptions_total", d1)] == 3
    assert s[("pdserve:pool_replicas", (("pool", "prefill"),))] == 1
    victim = (*d1, ("causing_tenant", "bob"), ("victim_tenant", "alice"))
    assert s[("pdserve:kv_evicted_blocks_total", tuple(sorted(victim)))] == 12
    metrics.set_pool_loads([])  # a replica that stopped answering disappears from the next scrape
    assert ("vllm:num_requests_running", d1) not in _samples(metrics)


def test_registries_stay_apart_and_share_with_the_http_counters() -> None:
    first, second = IngressMetrics(), IngressMetrics()
    first.record(_final(), RequestFacts())
    http = HttpMetrics(first.registry)
    http.count_request("/v1/completions", 200)
    assert _samples(second)[("pdserve:time_to_first_token_seconds_count", ())] == 0
    text = generate_latest(first.registry).decode()
    assert 'pdserve_http_requests_total{endpoint="/v1/completions",status="200"} 1.0' in text
    assert "pdserve:time_to_first_token_seconds" not in generate_latest(REGISTRY).decode()


def test_replica_load_carries_engine_evictions() -> None:
    from engine.outputs import EngineStats

    stats = EngineStats(100, 10, 20, 70, 90, 1, 0, 0, 0, 0, 0, 0, 0, evictions={("a", "b"): 3, ("", "a"): 1})
    load = ReplicaLoad.from_engine("r", stats)
    assert load.evictions == (("", "a", 1), ("a", "b", 3))
    assert ReplicaLoad.from_routing_stats(load.to_routing_stats()) == load


def test_openmetrics_keeps_the_colon_names() -> None:
    """A real Prometheus asks for OpenMetrics first; prometheus_client's encoder would write pdserve_*."""
    metrics = IngressMetrics()
    metrics.generation_tokens.inc(3)
    http = HttpMetrics(metrics.registry)
    text, content_type = http.render("application/openmetrics-text;version=1.0.0,text/plain;q=0.5")
    assert content_type.startswith("application/openmetrics-text")
    assert "\npdserve:generation_tokens_total 3.0\n" in text.decode()
    plain, plain_type = http.render("")
    assert plain_type.startswith("text/plain") and "\npdserve:generation_tokens_total 3.0\n" in plain.decode()


def test_migration_and_admission_counters_come_from_their_books() -> None:
    """pdserve:migrations_total{outcome}, pdserve:admission_refused_total{reason} and the queue gauges
    read the ingress's real MigrationLog and KVAdmission at scrape time."""
    migration = MigrationLog(MigrationConfig(max_migrations=1))
    config = AdmissionConfig(max_queue=1, max_queue_wait_s=5.0)
    admission = KVAdmission(config, 16, ("decode",), lambda _: [10])
    metrics = IngressMetrics()
    metrics.watch_reliability(migration, admission)
    loss = DecodeReplicaLost("d1", "the stream broke", 0.0)
    migration.on_loss("r1", loss, StreamProgress(), 1)  # moves
    with pytest.raises(MigrationFailed):
        migration.on_loss("r1", loss, StreamProgress(), 2)  # past max_migrations: fails

    async def fill() -> None:
        held = await admission.admit(100, 60)  # 10 blocks: the whole budget
        waiting = asyncio.ensure_future(admission.admit(100, 60))
        await asyncio.sleep(0)
        assert _samples(metrics)[("pdserve:admission_queue_depth", ())] == 1
        with pytest.raises(AdmissionRefused):
            await admission.admit(1, 1)  # the queue (1) is full
        with pytest.raises(NeverFits):
            await admission.admit(100, 200)  # 19 blocks > the replica's 10
        held.release()
        (await waiting).release()

    asyncio.run(fill())
    s = _samples(metrics)
    assert s[("pdserve:migrations_total", (("outcome", "migrated"),))] == 1
    assert s[("pdserve:migrations_total", (("outcome", "failed"),))] == 1
    assert s[("pdserve:admission_refused_total", (("reason", "queue_full"),))] == 1
    assert s[("pdserve:admission_refused_total", (("reason", "never_fits"),))] == 1
    assert s[("pdserve:admission_refused_total", (("reason", "queue_wait"),))] == 0
    assert s[("pdserve:admission_admitted_total", ())] == 2 and s[("pdserve:admission_queued_total", ())] == 1
    assert s[("pdserve:admission_queue_depth", ())] == 0 and s[("pdserve:admission_queue_limit", ())] == 1
    assert s[("pdserve:admission_reserved_blocks", (("pool", "decode"),))] == 0
