"""The HTTP API's Prometheus metrics: counts it knows exactly (the full metric set comes with the
observability work). One registry per server, so two servers in one process never share counters."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.exposition import choose_encoder
from prometheus_client.openmetrics import exposition as openmetrics

from protos import pdserve_pb2 as pb

__all__ = ["HttpMetrics"]


class HttpMetrics:
    """Requests by endpoint and status, tokens of finished requests, streams open now."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        """``registry``: the ingress's (``cluster.metrics.IngressMetrics``), else one of its own."""
        self.registry = registry if registry is not None else CollectorRegistry()
        self.requests = Counter(
            "pdserve_http_requests",
            "HTTP requests answered, by endpoint and status code (streams count when their headers go out)",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "pdserve_http_prompt_tokens", "Prompt tokens of finished requests", registry=self.registry
        )
        self.cached_tokens = Counter(
            "pdserve_http_cached_prompt_tokens",
            "Prompt tokens of finished requests served from the prefix cache",
            registry=self.registry,
        )
        self.completion_tokens = Counter(
            "pdserve_http_completion_tokens", "Tokens generated for finished requests", registry=self.registry
        )
        self.open_streams = Gauge(
            "pdserve_http_open_streams", "Streaming responses in progress", registry=self.registry
        )

    def count_request(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()

    def count_usage(self, last: pb.GenerateResponse) -> None:
        """Add a finished request's usage (its last message)."""
        self.prompt_tokens.inc(last.usage.prompt_tokens)
        self.cached_tokens.inc(last.usage.cached_tokens)
        self.completion_tokens.inc(last.usage.completion_tokens)

    def render(self, accept: str) -> tuple[bytes, str]:
        """Every metric in the format the scraper's ``Accept`` header asks for (Prometheus text 0.0.4
        by default, OpenMetrics on request), and its content type."""
        encoder, content_type = choose_encoder(accept)
        if content_type.startswith("application/openmetrics-text"):
            # prometheus_client's OpenMetrics encoder escapes ":" to "_" by default, so a real Prometheus
            # (it asks for OpenMetrics first) stored pdserve_* and vllm_num_requests_waiting, not the
            # names documented and read by the Gateway API Inference Extension; allow-utf-8 writes
            # legacy-valid names, colons included, as they are (docs/observability.md).
            return openmetrics.generate_latest(self.registry, escaping=openmetrics.ALLOWUTF8), content_type
        return encoder(self.registry), content_type
