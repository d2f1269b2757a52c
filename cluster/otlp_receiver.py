"""A small OTLP/gRPC trace receiver: opentelemetry-proto's ``TraceService`` on grpcio, spans kept in memory.

What the tracing tests and the overhead bench (``cluster.bench.overhead``) export to: a real OTLP
endpoint, so spans cross the wire from every process of the cluster exactly as they would reach a
collector (Jaeger, Tempo, the OpenTelemetry Collector). Not a collector: no batching, no storage.

    with OtlpReceiver() as receiver:            # 127.0.0.1, a free port
        config.override({"tracing.otlp_endpoint": receiver.endpoint, ...})
        receiver.wait_for(lambda spans: len(spans) >= 7, timeout_s=10)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

__all__ = ["OtlpReceiver", "ReceivedSpan"]


@dataclass(frozen=True)
class ReceivedSpan:
    """One span as it arrived: ids in hex, times in ns, attributes and its process's resource."""

    trace_id: str
    span_id: str
    parent_span_id: str  # "" for a root
    name: str
    kind: int  # opentelemetry.proto.trace.v1.Span.SpanKind
    start_ns: int
    end_ns: int
    status_code: int  # 0 unset, 1 ok, 2 error
    attributes: dict[str, Any]
    resource: dict[str, Any]


def _value(value: Any) -> Any:
    """An OTLP ``AnyValue`` as Python (arrays as tuples)."""
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return tuple(_value(item) for item in value.array_value.values)
    return getattr(value, kind) if kind else None


def _attributes(pairs: Any) -> dict[str, Any]:
    return {pair.key: _value(pair.value) for pair in pairs}


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, sink: Callable[[list[ReceivedSpan], int], None]) -> None:
        self.sink = sink

    def Export(self, request: Any, context: Any) -> Any:  # the gRPC method's name
        spans = []
        for resource_spans in request.resource_spans:
            resource = _attributes(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    spans.append(ReceivedSpan(
                        span.trace_id.hex(), span.span_id.hex(), span.parent_span_id.hex(), span.name,
                        span.kind, span.start_time_unix_nano, span.end_time_unix_nano, span.status.code,
                        _attributes(span.attributes), resource,
                    ))
        self.sink(spans, request.ByteSize())
        return trace_service_pb2.ExportTraceServiceResponse()


class OtlpReceiver:
    """An OTLP/gRPC endpoint on ``host`` (port 0: a free one) that keeps every span it receives."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, keep_spans: bool = True) -> None:
        self.keep_spans = keep_spans  # False: count only (the overhead bench)
        self.spans: list[ReceivedSpan] = []
        self.num_spans = 0
        self.num_bytes = 0  # serialized ExportTraceServiceRequest bytes received
        self.num_exports = 0
        self._changed = threading.Condition()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceService(self._add), self.server)
        self.port = self.server.add_insecure_port(f"{host}:{port}")
        if self.port == 0:
            raise RuntimeError(f"otlp receiver: cannot bind {host}:{port}")
        self.endpoint = f"http://{host}:{self.port}"

    def _add(self, spans: list[ReceivedSpan], num_bytes: int) -> None:
        with self._changed:
            if self.keep_spans:
                self.spans.extend(spans)
            self.num_spans += len(spans)
            self.num_bytes += num_bytes
            self.num_exports += 1
            self._changed.notify_all()

    def wait_for(self, done: Callable[[list[ReceivedSpan]], bool], timeout_s: float) -> list[ReceivedSpan]:
        """Block until ``done(spans so far)`` holds (or ``timeout_s`` passed); a copy of the spans."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while not done(self.spans):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._changed.wait(left)
            return list(self.spans)

    def trace(self, trace_id: str) -> list[ReceivedSpan]:
        """The spans received so far of one trace."""
        with self._changed:
            return [span for span in self.spans if span.trace_id == trace_id]

    def start(self) -> OtlpReceiver:
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop(grace=0.5).wait()

    def __enter__(self) -> OtlpReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
