"""OpenTelemetry tracing of requests (docs/observability.md, "Tracing"): one trace per request.

Every process builds its own tracer from the ``tracing:`` config it was given (``make_tracer``): the
ingress replica in ``RequestPath``, each prefill and decode replica in its deployment. Spans of one
request (names and parents)::

    chat <model> | text_completion <model>    ingress (SERVER; child of the caller's ``traceparent``)
    ├── pdserve.route                          ingress: the prefill (colocated: decode) replica choice
    ├── pdserve.prefill.queue                  prefill replica: arrival -> the engine thread takes it
    ├── pdserve.prefill                        prefill replica: -> first token, blocks pinned
    ├── pdserve.kv_transfer                    decode replica: reserve local blocks + pull the KV
    ├── pdserve.decode.queue                   decode replica: -> the engine thread takes the request
    └── pdserve.decode                         decode replica: -> last token

The ingress span's context crosses Ray inside ``WorkerRequest.trace_context`` (W3C ``traceparent``,
injected and extracted with opentelemetry's ``TraceContextTextMapPropagator``). Worker spans are built
from the workers' own timestamps (``PrefillResult.queue_ms`` / ``prefill_ms``, ``DecodeChunk``'s
transfer report) anchored at the wall clock where the replica received the call.

Off (the default) costs nothing on the hot path: ``make_tracer`` returns ``NULL_TRACER`` without
importing the SDK, its spans are the ``NULL_SPAN`` singleton, and the workers see an empty
``trace_context`` and pass their results and streams through untouched.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, Field

from engine.config import STRICT_FROZEN

if TYPE_CHECKING:
    from cluster.validation import ValidRequest
    from protos import pdserve_pb2 as pb
    from worker_common.messages import DecodeChunk, DecodeRequest, PrefillResult, WorkerRequest

logger = logging.getLogger(__name__)

__all__ = [
    "NULL_SPAN",
    "NULL_TRACER",
    "RequestSpan",
    "TraceParent",
    "Tracer",
    "TracingConfig",
    "cache_attributes",
    "grpc_parent",
    "http_parent",
    "make_tracer",
]

Exporter = Literal["none", "console", "otlp", "memory"]
AttributeValue = str | bool | int | float | tuple[str, ...]
TRACE_HEADERS = ("traceparent", "tracestate")  # W3C trace context: what is read from gRPC / HTTP


class TracingConfig(BaseModel):
    """The ``tracing:`` section. Off by default; ``exporter``: where every process sends its spans
    (``otlp``: OTLP/gRPC to ``otlp_endpoint``; ``console``: JSON lines on stdout, for debugging;
    ``memory``: kept in the process, for tests of one process; ``none``: made and dropped)."""

    model_config = STRICT_FROZEN

    enabled: bool = False
    exporter: Exporter = "otlp"
    otlp_endpoint: str = Field("http://127.0.0.1:4317", min_length=1)  # an OTLP/gRPC collector
    service_name: str = Field("pdserve", min_length=1)
    sample_ratio: float = Field(1.0, ge=0.0, le=1.0)  # of new traces; a caller's sampled flag wins
    export_delay_ms: int = Field(1000, ge=1)  # the batch processor sends at least this often


@dataclass(frozen=True)
class TraceParent:
    """Where a request's trace comes from: the caller's W3C headers (maybe none) and its GenAI operation."""

    carrier: Mapping[str, str]
    operation: str = "text_completion"  # gen_ai.operation.name: "chat" for a messages prompt


def cache_attributes(attribution: Any) -> dict[str, AttributeValue]:
    """A ``CacheAttribution`` (any dataclass) as ``pdserve.cache.<field>`` span attributes; pairs such
    as ``evicted_by`` become "tenant=blocks" strings."""
    attributes: dict[str, AttributeValue] = {}
    if attribution is None or not dataclasses.is_dataclass(attribution):
        return attributes
    for item in dataclasses.fields(attribution):
        value = getattr(attribution, item.name)
        if isinstance(value, (str, bool, int, float)):
            attributes[f"pdserve.cache.{item.name}"] = value
        elif isinstance(value, tuple):
            attributes[f"pdserve.cache.{item.name}"] = tuple(
                "=".join(map(str, v)) if isinstance(v, tuple) else str(v) for v in value
            )
    return attributes


def grpc_parent(tracer: Tracer | _NullTracer, context: Any, wire: Any) -> TraceParent | None:
    """The trace parent of a gRPC ``Generate`` call: its metadata's ``traceparent`` / ``tracestate`` and
    its operation ("chat" for a ``messages`` prompt); None, without reading anything, when tracing is off."""
    if not tracer.is_enabled:
        return None
    operation = "chat" if wire.WhichOneof("prompt") == "messages" else "text_completion"
    return tracer.parent_from(context.invocation_metadata(), operation)


def http_parent(tracer: Tracer | _NullTracer, headers: Any, is_chat: bool) -> TraceParent | None:
    """The trace parent of an HTTP request (its headers); None when tracing is off."""
    if not tracer.is_enabled:
        return None
    return tracer.parent_from(headers.items(), "chat" if is_chat else "text_completion")


def message_attributes(message: Any, prefix: str) -> dict[str, AttributeValue]:
    """A protobuf message's fields (the final response's ``cache``) as ``prefix + name`` attributes;
    repeated sub-messages as "a=b" strings of their fields' values (``evicted_by``: "tenant=blocks")."""
    if message is None or not hasattr(message, "DESCRIPTOR"):
        return {}
    attributes: dict[str, AttributeValue] = {}
    for item in message.DESCRIPTOR.fields:
        value = getattr(message, item.name)
        if isinstance(value, (str, bool, int, float)):
            attributes[prefix + item.name] = value
        elif not hasattr(value, "DESCRIPTOR"):  # repeated: scalars or messages
            attributes[prefix + item.name] = tuple(
                "=".join(str(getattr(v, f.name)) for f in v.DESCRIPTOR.fields) if hasattr(v, "DESCRIPTOR")
                else str(v)
                for v in value
            )
    return attributes


# ---- off: null objects -------------------------------------------------------------------------


class _NullSpan:
    """The ingress span of a request when tracing is off: every method does nothing."""

    context: dict[str, str] = {}  # noqa: RUF012  (never written: WorkerRequest.trace_context stays empty)

    def routed(self, stage: str, replica_id: str, reason: str) -> None:
        pass

    def annotate(self, attributes: Mapping[str, AttributeValue]) -> None:
        pass

    def finish(self, response: pb.GenerateResponse) -> None:
        pass

    def end(self) -> None:
        pass


NULL_SPAN = _NullSpan()


class _NullTracer:
    """A process's tracer when tracing is off: no SDK object, results and streams pass through."""

    is_enabled = False

    def parent_from(self, pairs: Iterable[tuple[str, str]] | None, operation: str) -> TraceParent | None:
        return None

    def start_request(
        self, request: ValidRequest, parent: TraceParent | None, internal_id: str = ""
    ) -> RequestSpan | _NullSpan:
        return NULL_SPAN

    async def prefill(self, request: WorkerRequest, work: Awaitable[PrefillResult]) -> PrefillResult:
        return await work

    def decode(self, work: DecodeRequest, stream: AsyncIterator[DecodeChunk]) -> AsyncIterator[DecodeChunk]:
        return stream

    def shutdown(self) -> None:
        pass


NULL_TRACER = _NullTracer()


def make_tracer(
    config: TracingConfig, role: str, instance_id: str = "", model: str = ""
) -> Tracer | _NullTracer:
    """This process's tracer for ``role`` ("ingress", "prefill", "decode"; ``instance_id``: the replica,
    ``model``: the served model's name, for the ingress span); ``NULL_TRACER`` when off."""
    if not config.enabled:
        return NULL_TRACER
    return Tracer(config, role, instance_id, model)


# ---- on -----------------------------------------------------------------------------------------


def _exporter(config: TracingConfig) -> Any:
    if config.exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter(endpoint=config.otlp_endpoint, insecure=True)
    if config.exporter == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if config.exporter == "memory":
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        return InMemorySpanExporter()
    return None


class Tracer:
    """One process's tracer provider (never the global one: no module state) and the request spans."""

    is_enabled = True

    def __init__(self, config: TracingConfig, role: str, instance_id: str = "", model: str = "") -> None:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.config = config
        self.role = role
        self.instance_id = instance_id or f"{role}-{os.getpid()}"
        self.model = model
        resource = Resource.create({
            "service.name": config.service_name, "service.instance.id": self.instance_id, "pdserve.role": role
        })
        sampler = ParentBased(TraceIdRatioBased(config.sample_ratio))
        self.provider = TracerProvider(resource=resource, sampler=sampler)
        self.exporter = _exporter(config)  # InMemorySpanExporter.get_finished_spans() when "memory"
        if self.exporter is not None:
            processor = (
                SimpleSpanProcessor(self.exporter)
                if config.exporter == "memory"
                else BatchSpanProcessor(self.exporter, schedule_delay_millis=config.export_delay_ms)
            )
            self.provider.add_span_processor(processor)
        self.tracer = self.provider.get_tracer("pdserve")
        self.propagator = TraceContextTextMapPropagator()

    # ---- propagation ----------------------------------------------------------------------------

    def parent_from(self, pairs: Iterable[tuple[str, str]] | None, operation: str) -> TraceParent:
        """The caller's W3C trace headers from gRPC metadata or HTTP headers (key/value pairs)."""
        carrier = {key.lower(): value for key, value in pairs or () if key.lower() in TRACE_HEADERS}
        return TraceParent(carrier, operation)

    def extract(self, carrier: Mapping[str, str]) -> Any:
        return self.propagator.extract(carrier)

    def inject(self, span: Any) -> dict[str, str]:
        from opentelemetry.trace import set_span_in_context

        carrier: dict[str, str] = {}
        self.propagator.inject(carrier, context=set_span_in_context(span))
        return carrier

    def span(
        self, name: str, parent: Any, start_ns: int, attributes: Mapping[str, Any], kind: Any = None
    ) -> Any:
        """A span started at ``start_ns`` (wall clock, ns) under ``parent`` (an extracted context)."""
        from opentelemetry.trace import SpanKind

        return self.tracer.start_span(
            name, context=parent, kind=kind or SpanKind.INTERNAL, attributes=attributes, start_time=start_ns
        )

    # ---- ingress ----------------------------------------------------------------------------------

    def start_request(
        self, request: ValidRequest, parent: TraceParent | None, internal_id: str = ""
    ) -> RequestSpan:
        """The ingress span of ``request`` (a child of the caller's trace when it sent one) and its
        route span, both started now."""
        return RequestSpan(self, request, parent or TraceParent({}), internal_id)

    # ---- workers ----------------------------------------------------------------------------------

    async def prefill(self, request: WorkerRequest, work: Awaitable[PrefillResult]) -> PrefillResult:
        """Await the prefill ``work`` and add its queue and prefill spans to the request's trace."""
        started_ns = time.time_ns()
        if not request.trace_context:
            return await work
        try:
            result = await work
        except BaseException as error:
            self._failed("pdserve.prefill", request, started_ns, error)
            raise
        self._prefill_spans(request, started_ns, result)
        return result

    def _prefill_spans(self, request: WorkerRequest, started_ns: int, result: PrefillResult) -> None:
        parent = self.extract(request.trace_context)
        replica = {"pdserve.replica": result.replica_id}
        queued_ns = started_ns + int(result.queue_ms * 1e6)
        done_ns = queued_ns + int(result.prefill_ms * 1e6)
        self.span("pdserve.prefill.queue", parent, started_ns, replica).end(end_time=queued_ns)
        attributes: dict[str, AttributeValue] = {
            **replica,
            "gen_ai.usage.input_tokens": result.num_prompt_tokens,
            "gen_ai.usage.cache_read.input_tokens": result.num_cached_tokens,
            "pdserve.finish_reason": result.finish_reason,
            **cache_attributes(getattr(result, "cache", None)),
        }
        if result.handle is not None:
            num_blocks = len(result.handle.block_ids)
            attributes["pdserve.kv.blocks"] = num_blocks
            attributes["pdserve.kv.bytes"] = _block_bytes(result.handle) * num_blocks
        self.span("pdserve.prefill", parent, queued_ns, attributes).end(end_time=done_ns)

    def decode(
        self, work: DecodeRequest, stream: AsyncGenerator[DecodeChunk, None]
    ) -> AsyncIterator[DecodeChunk]:
        """``stream`` as is when the request carries no trace; else the same chunks, and at its end the
        request's KV transfer, decode queue and decode spans."""
        if not work.request.trace_context:
            return stream
        return self._traced_decode(work, stream)

    async def _traced_decode(
        self, work: DecodeRequest, stream: AsyncGenerator[DecodeChunk, None]
    ) -> AsyncIterator[DecodeChunk]:
        record = _DecodeRecord(time.time_ns())
        try:
            async for chunk in stream:
                record.add(chunk)
                yield chunk
        finally:
            await stream.aclose()  # the worker's own clean-up (abort on its engine) runs now
            self._decode_spans(work, record, record.finished_ns or time.time_ns())

    def _decode_spans(self, work: DecodeRequest, record: _DecodeRecord, end_ns: int) -> None:
        parent = self.extract(work.request.trace_context)
        report = record.report
        replica = {"pdserve.replica": report.replica_id if report is not None else self.instance_id}
        queue_start_ns = record.started_ns
        if work.handle is not None and report is not None:
            queue_start_ns = record.started_ns + int(report.kv_transfer_ms * 1e6)
            attributes = {**replica, **_transfer_attributes(work.handle, report.kv_transport)}
            transfer = self.span("pdserve.kv_transfer", parent, record.started_ns, attributes)
            if report.error:
                _set_error(transfer, "kv_transfer_failed", report.error)
            transfer.end(end_time=queue_start_ns)
        admitted_ns = record.report_ns or end_ns
        self.span("pdserve.decode.queue", parent, queue_start_ns, replica).end(end_time=admitted_ns)
        attributes = {**replica, "pdserve.decode.tokens": record.num_tokens}
        if work.handle is None:
            attributes["pdserve.colocated"] = True  # this replica prefilled the prompt itself
        if record.finish_reason is not None:
            attributes["gen_ai.response.finish_reasons"] = (record.finish_reason,)
        span = self.span("pdserve.decode", parent, admitted_ns, attributes)
        if record.finish_reason is None:
            _set_error(span, "incomplete", "stream ended before its last token (cancelled or failed)")
        span.end(end_time=end_ns)

    def _failed(self, name: str, request: WorkerRequest, started_ns: int, error: BaseException) -> None:
        parent = self.extract(request.trace_context)
        span = self.span(name, parent, started_ns, {"pdserve.replica": self.instance_id})
        _set_error(span, type(error).__name__, str(error))
        span.end()

    def shutdown(self) -> None:
        """Flush and stop the exporter (a replica's last act; spans still buffered are sent)."""
        self.provider.shutdown()


@dataclass
class _DecodeRecord:
    """What a decode stream showed, for its spans."""

    started_ns: int
    report: DecodeChunk | None = None
    report_ns: int = 0
    num_tokens: int = 0
    finish_reason: str | None = None
    finished_ns: int = 0

    def add(self, chunk: DecodeChunk) -> None:
        if chunk.is_transfer_report:
            self.report, self.report_ns = chunk, time.time_ns()
            return
        self.num_tokens += len(chunk.token_ids)
        if chunk.finished:  # the span ends here, before the ingress can see the chunk
            self.finish_reason, self.finished_ns = chunk.finish_reason or "length", time.time_ns()


class RequestSpan:
    """The ingress side of one request's trace: its span, the route span, and what crosses to workers."""

    def __init__(self, tracer: Tracer, request: ValidRequest, parent: TraceParent, internal_id: str) -> None:
        from opentelemetry.trace import SpanKind

        self.tracer = tracer
        self.start_ns = time.time_ns()
        self.is_ended = False
        sampling = request.sampling
        attributes: dict[str, AttributeValue] = {
            "gen_ai.operation.name": parent.operation,
            "gen_ai.provider.name": "pdserve",
            "gen_ai.request.model": tracer.model,
            "gen_ai.response.model": tracer.model,
            "gen_ai.request.max_tokens": sampling.max_tokens,
            "gen_ai.request.temperature": sampling.temperature,
            "gen_ai.request.top_p": sampling.top_p,
            "gen_ai.request.top_k": sampling.top_k,
            "pdserve.request.id": request.request_id,
            "pdserve.request.internal_id": internal_id,
            "pdserve.tenant": request.tenant,
            "pdserve.replica": tracer.instance_id,
        }
        if sampling.seed is not None:
            attributes["gen_ai.request.seed"] = sampling.seed
        name = f"{parent.operation} {tracer.model}".strip()  # GenAI: "{operation} {model}"
        caller = tracer.extract(parent.carrier)
        self.span = tracer.span(name, caller, self.start_ns, attributes, SpanKind.SERVER)
        self.route = tracer.span("pdserve.route", self._context(), self.start_ns, {})
        self.context: dict[str, str] = tracer.inject(self.span)  # goes in WorkerRequest.trace_context

    def _context(self) -> Any:
        from opentelemetry.trace import set_span_in_context

        return set_span_in_context(self.span)

    def routed(self, stage: str, replica_id: str, reason: str) -> None:
        """The route span ends: ``stage`` ("prefill", "colocated") went to ``replica_id`` for ``reason``."""
        self.route.set_attributes({
            "pdserve.route.stage": stage, "pdserve.route.replica": replica_id, "pdserve.route.reason": reason
        })
        self.route.end()

    def annotate(self, attributes: Mapping[str, AttributeValue]) -> None:
        """More attributes on the ingress span (e.g. ``cache_attributes(attribution)`` after the route)."""
        self.span.set_attributes(dict(attributes))

    def finish(self, response: pb.GenerateResponse) -> None:
        """The final response is built: usage, timings and route go on the span, which ends now."""
        from protos import pdserve_pb2 as pb

        usage, timings, route = response.usage, response.timings, response.route
        reason = pb.FinishReason.Name(response.finish_reason).removeprefix("FINISH_REASON_").lower()
        self.span.set_attributes({
            "gen_ai.response.id": response.request_id,
            "gen_ai.response.finish_reasons": (reason,),
            "gen_ai.usage.input_tokens": usage.prompt_tokens,
            "gen_ai.usage.output_tokens": usage.completion_tokens,
            "gen_ai.usage.cache_read.input_tokens": usage.cached_tokens,
            "pdserve.route.reason": route.reason,
            "pdserve.prefill.replica": route.prefill_replica,
            "pdserve.decode.replica": route.decode_replica,
            "pdserve.kv.transport": route.kv_transport,
            "pdserve.queue_ms": timings.queue_ms,
            "pdserve.prefill_ms": timings.prefill_ms,
            "pdserve.kv_transfer_ms": timings.kv_transfer_ms,
            "pdserve.ttft_ms": timings.ttft_ms,
            "pdserve.mean_tpot_ms": timings.mean_tpot_ms,
            "pdserve.e2e_ms": timings.e2e_ms,
        })
        self.span.set_attributes(message_attributes(getattr(response, "cache", None), "pdserve.cache."))
        self.span.add_event("pdserve.first_token", timestamp=self.start_ns + int(timings.ttft_ms * 1e6))
        self._end()

    def end(self) -> None:
        """Called when the request's path is left, however: a span not finished by a final response ends
        with an error status (refused, failed or cancelled)."""
        if not self.is_ended:
            _set_error(self.span, "incomplete", "ended without a final response (failed or cancelled)")
            self._end()

    def _end(self) -> None:
        if self.route.is_recording():
            self.route.end()
        self.span.end()
        self.is_ended = True


def _block_bytes(handle: Any) -> int:
    return int(handle.layout.bytes_per_token * handle.layout.block_size)


def _transfer_attributes(handle: Any, transport: str) -> dict[str, AttributeValue]:
    """The blocks a decode pull moves: the prompt's (``ceil(num_tokens / block_size)``), not a tail block."""
    num_blocks = -(-handle.num_tokens // handle.layout.block_size)
    return {
        "pdserve.kv.transport": transport,
        "pdserve.kv.source_replica": handle.endpoint.worker_id,
        "pdserve.kv.blocks": num_blocks,
        "pdserve.kv.bytes": num_blocks * _block_bytes(handle),
        "pdserve.kv.tokens": handle.num_tokens,
    }


def _set_error(span: Any, error_type: str, message: str) -> None:
    from opentelemetry.trace import Status, StatusCode

    span.set_attribute("error.type", error_type)
    span.set_status(Status(StatusCode.ERROR, message[:500]))
