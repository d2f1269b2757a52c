"""The ingress's Prometheus metrics (docs/observability.md): one ``IngressMetrics`` per ingress replica.

Two kinds, in one ``CollectorRegistry`` owned here (never prometheus_client's global default registry,
so tests and several replicas in one process stay apart):

- per request, recorded by ``RequestPath`` when a request's final response is built (gRPC and HTTP
  alike): latency histograms (TTFT, ITL, TPOT, E2E, queue, prefill, KV transfer), token counters,
  finished requests by reason, router decisions by reason, KV bytes handed off and recomputes;
- per replica, filled at scrape time from the replicas' ``ReplicaLoad`` reports (``set_pool_loads``):
  running / waiting requests, KV blocks used / cached / free, the Gateway API Inference Extension's
  ``vllm:*`` gauges, and the engines' own totals (evicted blocks by victim and causing tenant, ...);
- per ingress replica, read at scrape time from its ``MigrationLog`` and ``KVAdmission``
  (``watch_reliability``): migrations by outcome, admission refusals by reason, the queue's depth.

Names follow vLLM's (``vllm:time_to_first_token_seconds`` -> ``pdserve:time_to_first_token_seconds``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from pydantic import BaseModel

from cluster.stats import ReplicaLoad
from engine.config import STRICT_FROZEN
from protos import pdserve_pb2 as pb

__all__ = ["IngressMetrics", "MetricsConfig", "PoolLoads", "RequestFacts", "route_decisions"]

PREFIX = "pdserve:"

# vLLM's buckets (vllm/v1/metrics/loggers.py), in seconds.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
# vLLM's ITL / TPOT buckets, with 1 ms and 5 ms added below (a small model's steps are that short).
TOKEN_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
                 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
# vLLM's request-phase buckets (E2E, queue, prefill), with 1-250 ms added below: queue waits, prefills and
# KV transfers are often milliseconds here.
PHASE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0,
                 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)

FINISH_REASON_NAMES = {
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_EOS: "eos",
    pb.FINISH_REASON_CONTEXT: "context",
}

PoolLoads = Sequence[tuple[str, Sequence[ReplicaLoad]]]  # (pool name, its replicas' loads)


class MetricsConfig(BaseModel):
    """The ``metrics:`` section. ``enabled: false`` stops recording the per-request series (they stay at
    0); ``/metrics`` still answers, with the replica gauges read at scrape time. For overhead runs
    (``cluster.bench.overhead``) and operators who scrape nothing."""

    model_config = STRICT_FROZEN

    enabled: bool = True


@dataclass(frozen=True)
class RequestFacts:
    """What the final response does not say about a request: its stream's shape and the KV it moved."""

    message_gaps: tuple[tuple[float, int], ...] = ()  # (seconds since the previous message, its tokens)
    kv_transfer_bytes: int = 0  # blocks handed off x block bytes (0: colocated or recomputed)
    has_prefill_phase: bool = False  # a prefill replica ran it (disaggregated): prefill time is known
    has_kv_transfer: bool = False  # a decode replica pulled (or recomputed) its KV


def route_decisions(reason: str) -> list[tuple[str, str]]:
    """``RouteInfo.reason`` ("prefill=ring_owner decode=kv_headroom") -> [(stage, reason), ...]."""
    decisions = []
    for part in reason.split():
        stage, _, why = part.partition("=")
        if why:
            decisions.append((stage, why))
    return decisions


def _histogram(registry: CollectorRegistry, name: str, doc: str, buckets: Sequence[float]) -> Histogram:
    return Histogram(PREFIX + name, doc, buckets=buckets, registry=registry)


def _counter(registry: CollectorRegistry, name: str, doc: str, labels: Sequence[str] = ()) -> Counter:
    return Counter(PREFIX + name, doc, labelnames=labels, registry=registry)


class IngressMetrics:
    """The registry of one ingress replica and the request metrics recorded into it."""

    def __init__(self, config: MetricsConfig | None = None) -> None:
        self.is_enabled = (config or MetricsConfig()).enabled
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = _histogram(r, "time_to_first_token_seconds", "Arrival to first token sent", TTFT_BUCKETS)
        self.itl = _histogram(
            r, "inter_token_latency_seconds",
            "Gap between streamed messages / tokens in the message, once per token after the first",
            TOKEN_BUCKETS,
        )
        self.tpot = _histogram(
            r, "request_time_per_output_token_seconds",
            "Per request: (last token - first token) / (output tokens - 1)", TOKEN_BUCKETS,
        )
        self.e2e = _histogram(r, "e2e_request_latency_seconds", "Arrival to last token sent", PHASE_BUCKETS)
        self.queue = _histogram(
            r, "request_queue_time_seconds", "Arrival to the start of its prefill (or of colocated work)",
            PHASE_BUCKETS,
        )
        self.prefill = _histogram(
            r, "request_prefill_time_seconds", "Prefill on a prefill replica (disaggregated)", PHASE_BUCKETS
        )
        self.kv_transfer = _histogram(
            r, "request_kv_transfer_time_seconds", "Decode side's pull of a request's KV", PHASE_BUCKETS
        )
        self.prompt_tokens = _counter(r, "prompt_tokens", "Prompt tokens of finished requests")
        self.cached_tokens = _counter(r, "cached_prompt_tokens", "Prompt tokens served from the prefix cache")
        self.generation_tokens = _counter(r, "generation_tokens", "Tokens generated for finished requests")
        self.request_success = _counter(
            r, "request_success", "Finished requests by finish reason", ["finished_reason"]
        )
        self.router_decisions = _counter(
            r, "router_decisions", "Replica choices by stage (prefill, decode, colocated) and reason",
            ["stage", "reason"],
        )
        self.kv_transfer_bytes = _counter(
            r, "kv_transfer_bytes", "KV bytes handed off to decode (blocks x block bytes)", ["transport"]
        )
        self.kv_recomputes = _counter(r, "kv_recomputes", "Pulls that failed and were recomputed on decode")
        self.replicas = ReplicaLoadCollector()
        r.register(self.replicas)

    def record(self, final: pb.GenerateResponse, facts: RequestFacts) -> None:
        """A finished request, from its final response (usage, timings, route) and the other facts."""
        if not self.is_enabled:
            return
        timings, usage = final.timings, final.usage
        self.ttft.observe(timings.ttft_ms / 1e3)
        self.e2e.observe(timings.e2e_ms / 1e3)
        self.queue.observe(timings.queue_ms / 1e3)
        if usage.completion_tokens > 1:
            self.tpot.observe(timings.mean_tpot_ms / 1e3)
        for gap_s, num_tokens in facts.message_gaps:
            for _ in range(num_tokens):
                self.itl.observe(gap_s / num_tokens)
        if facts.has_prefill_phase:
            self.prefill.observe(timings.prefill_ms / 1e3)
        if facts.has_kv_transfer:
            self.kv_transfer.observe(timings.kv_transfer_ms / 1e3)
        self.prompt_tokens.inc(usage.prompt_tokens)
        self.cached_tokens.inc(usage.cached_tokens)
        self.generation_tokens.inc(usage.completion_tokens)
        self.request_success.labels(FINISH_REASON_NAMES.get(final.finish_reason, "unknown")).inc()
        for stage, reason in route_decisions(final.route.reason):
            self.router_decisions.labels(stage, reason).inc()
        if final.route.kv_transport == "recompute":
            self.kv_recomputes.inc()
        elif facts.kv_transfer_bytes:
            self.kv_transfer_bytes.labels(final.route.kv_transport).inc(facts.kv_transfer_bytes)

    def set_pool_loads(self, pools: PoolLoads) -> None:
        """The replicas' latest reports, read by the next scrape."""
        self.replicas.pools = list(pools)

    def watch_reliability(self, migration: Any, admission: Any) -> None:
        """Serve this replica's migration and admission counters (``cluster.migration.MigrationLog``,
        ``cluster.admission.KVAdmission``: anything with their ``snapshot()``), read at scrape time."""
        self.registry.register(ReliabilityCollector(migration, admission))


# (metric name, help, ReplicaLoad field or property); every one labelled by pool and replica.
_GAUGES = (
    ("pdserve:num_requests_running", "Requests running on the replica", "running_requests"),
    ("pdserve:num_requests_waiting", "Requests queued on the replica", "queued_requests"),
    ("pdserve:num_requests_pinned", "Prefill: requests whose KV awaits its pull", "pinned_requests"),
    ("pdserve:num_queued_prefill_tokens", "Prompt tokens waiting for prefill", "queued_prefill_tokens"),
    ("pdserve:kv_blocks_total", "KV blocks of the replica", "kv_blocks_total"),
    ("pdserve:kv_blocks_used", "KV blocks referenced (running, pinned, reserved)", "kv_blocks_used"),
    ("pdserve:kv_blocks_cached", "KV blocks unreferenced but holding a reusable prefix", "kv_blocks_cached"),
    ("pdserve:kv_blocks_free", "KV blocks neither used nor cached", "kv_blocks_free"),
    ("pdserve:kv_cache_usage_perc", "KV blocks used / total (a fraction)", "kv_blocks_used_fraction"),
    # The Gateway API Inference Extension's model-server protocol reads these three names.
    ("vllm:num_requests_running", "Requests running (GIE model-server protocol)", "running_requests"),
    ("vllm:num_requests_waiting", "Requests queued (GIE model-server protocol)", "queued_requests"),
    ("vllm:kv_cache_usage_perc", "KV blocks used / total (GIE protocol)", "kv_blocks_used_fraction"),
)
_TOTALS = (
    ("pdserve:replica_preemptions", "Preemptions since the replica started", "preemptions"),
    ("pdserve:replica_leases_expired", "Prefill: pinned KV leases that ended unreleased", "leases_expired"),
    ("pdserve:replica_recomputed_requests", "Decode: failed pulls recomputed here", "recomputed_requests"),
)


# admission snapshot count -> the reason label of pdserve:admission_refused_total
_REFUSALS = (
    ("refused_queue_full", "queue_full"), ("refused_wait", "queue_wait"), ("never_fits", "never_fits")
)


class ReliabilityCollector(Collector):
    """Decode-stream migrations and admission control of one ingress replica, from their snapshots."""

    def __init__(self, migration: Any, admission: Any) -> None:
        self.migration = migration
        self.admission = admission

    def collect(self) -> Iterator[Metric]:
        moves = self.migration.snapshot()
        migrations = CounterMetricFamily(
            "pdserve:migrations",
            "Decode-replica losses of a stream: migrated (moved to another replica) or failed (UNAVAILABLE)",
            labels=["outcome"],
        )
        migrations.add_metric(["migrated"], float(moves["num_migrations"]))
        migrations.add_metric(["failed"], float(moves["num_failed"]))
        yield migrations
        books = self.admission.snapshot()
        refused = CounterMetricFamily(
            "pdserve:admission_refused", "Requests refused by admission control, by reason", labels=["reason"]
        )
        for key, reason in _REFUSALS:
            refused.add_metric([reason], float(books[key]))
        yield refused
        yield CounterMetricFamily(
            "pdserve:admission_admitted", "Requests admitted (KV reserved)", value=float(books["admitted"])
        )
        yield CounterMetricFamily(
            "pdserve:admission_queued", "Requests that waited in the queue", value=float(books["queued"])
        )
        yield GaugeMetricFamily(
            "pdserve:admission_queue_depth", "Requests waiting for KV budget now", value=books["queue_depth"]
        )
        yield GaugeMetricFamily(
            "pdserve:admission_queue_limit", "Queue bound (admission.max_queue)", value=books["max_queue"]
        )
        reserved = GaugeMetricFamily(
            "pdserve:admission_reserved_blocks", "KV blocks reserved by admitted requests", labels=["pool"]
        )
        for pool, blocks in books["reserved_blocks"].items():
            reserved.add_metric([pool], float(blocks))
        yield reserved


class ReplicaLoadCollector(Collector):
    """Per-replica gauges and totals from the last ``ReplicaLoad`` reports given to it."""

    def __init__(self) -> None:
        self.pools: list[tuple[str, Sequence[ReplicaLoad]]] = []

    def collect(self) -> Iterator[Metric]:
        pools = self.pools
        labels = ["pool", "replica"]
        num_replicas = GaugeMetricFamily("pdserve:pool_replicas", "Replicas answering", labels=["pool"])
        for pool, loads in pools:
            num_replicas.add_metric([pool], len(loads))
        yield num_replicas
        for family, specs in ((GaugeMetricFamily, _GAUGES), (CounterMetricFamily, _TOTALS)):
            for name, doc, attribute in specs:
                metric = family(name, doc, labels=labels)
                for pool, loads in pools:
                    for load in loads:
                        metric.add_metric([pool, load.replica_id], float(getattr(load, attribute)))
                yield metric
        yield self._evictions(pools)

    @staticmethod
    def _evictions(pools: list[tuple[str, Sequence[ReplicaLoad]]]) -> Metric:
        evictions = CounterMetricFamily(
            "pdserve:kv_evicted_blocks",
            "Cached KV blocks evicted since the replica started, by the tenant whose prefix was lost and "
            "the tenant whose allocation took the block",
            labels=["pool", "replica", "victim_tenant", "causing_tenant"],
        )
        for pool, loads in pools:
            for load in loads:
                for victim, causing, num_blocks in load.evictions:
                    evictions.add_metric([pool, load.replica_id, victim, causing], float(num_blocks))
        return evictions
