"""cluster.tracing without Ray: the null objects when off, and one request's spans from three tracers
(ingress, prefill, decode, as three processes would have them) with in-memory exporters: one trace, the
parents, the times from the workers' own timestamps, the GenAI / pdserve attributes, and a caller's
``traceparent`` continued."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from opentelemetry.trace import SpanKind, StatusCode

from cluster.config import ClusterConfig
from cluster.tracing import (
    NULL_SPAN,
    NULL_TRACER,
    TraceParent,
    Tracer,
    TracingConfig,
    cache_attributes,
    grpc_parent,
    http_parent,
    make_tracer,
)
from cluster.validation import ValidRequest
from kv_transfer.base import KVHandle, LayoutSignature, TransferEndpoint
from protos import pdserve_pb2 as pb
from worker_common.messages import (
    CacheAttribution,
    DecodeChunk,
    DecodeRequest,
    PrefillResult,
    SamplingSpec,
    WorkerRequest,
)

CALLER_TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{CALLER_TRACE_ID}-{CALLER_SPAN_ID}-01"
MEMORY = TracingConfig(enabled=True, exporter="memory")
LAYOUT = LayoutSignature("tiny@x", "float32", 16, 2, 2, 8)  # 2 x 2 x 2 x 8 x 4 bytes = 256 B per token


def _valid(prompt_len: int = 40) -> ValidRequest:
    return ValidRequest("client-1", tuple(range(prompt_len)), SamplingSpec(max_tokens=4, seed=7), "tenant-a")


def _handle(num_tokens: int, num_blocks: int) -> KVHandle:
    endpoint = TransferEndpoint("shm", "prefill-r1", "inc", b"", LAYOUT)
    return KVHandle("client-1#ab", endpoint, tuple(range(num_blocks)), num_tokens, 0.0)


def _final(request: ValidRequest) -> pb.GenerateResponse:
    response = pb.GenerateResponse(request_id=request.request_id, finish_reason=pb.FINISH_REASON_LENGTH)
    response.usage.prompt_tokens, response.usage.cached_tokens, response.usage.completion_tokens = 40, 32, 4
    response.timings.ttft_ms, response.timings.e2e_ms = 5.0, 9.0
    response.route.reason = "prefill=ring_owner decode=kv_headroom"
    response.route.prefill_replica, response.route.decode_replica = "prefill-r1", "decode-r1"
    response.route.kv_transport = "shm"
    return response


def test_off_is_the_null_objects_and_passes_everything_through() -> None:
    config = ClusterConfig().tracing
    assert not config.enabled
    tracer = make_tracer(config, "ingress")
    assert tracer is NULL_TRACER
    assert tracer.start_request(_valid(), None) is NULL_SPAN and NULL_SPAN.context == {}
    work = WorkerRequest("r#1", (1, 2), SamplingSpec(max_tokens=2))
    assert work.trace_context == {}

    async def stream() -> AsyncIterator[DecodeChunk]:
        yield DecodeChunk([1])

    generator = stream()
    assert tracer.decode(DecodeRequest(work, 1, None), generator) is generator  # not wrapped at all
    result = PrefillResult("r#1", "p", 1, "prefilled", None, 2, 0, 0.0, 0.0)

    async def prefill() -> PrefillResult:
        return result

    assert asyncio.run(tracer.prefill(work, prefill())) is result


def _run_request(ingress: Tracer, prefill: Tracer, decode: Tracer, carrier: dict[str, str]) -> None:
    """One disaggregated request through the three tracers, as RequestPath and the deployments call them."""
    request = _valid()
    span = ingress.start_request(request, ingress.parent_from(carrier.items(), "chat"), "client-1#ab")
    span.routed("prefill", "prefill-r1", "ring_owner")
    work = WorkerRequest(
        "client-1#ab", request.prompt_token_ids, request.sampling, "tenant-a", 0.0, span.context
    )
    attribution = CacheAttribution(cached_tokens=32, cacheable_tokens=32, evicted_by=(("tenant-b", 2),))
    result = PrefillResult(
        "client-1#ab", "prefill-r1", 9, "prefilled", _handle(40, 3), 40, 32, 2.0, 3.0, "x", attribution
    )

    async def prefill_work() -> PrefillResult:
        return result

    assert asyncio.run(prefill.prefill(work, prefill_work())) is result

    async def chunks() -> AsyncIterator[DecodeChunk]:
        yield DecodeChunk([], replica_id="decode-r1", kv_transport="shm", kv_transfer_ms=1.5,
                          is_transfer_report=True)
        yield DecodeChunk([5, 6], replica_id="decode-r1")
        yield DecodeChunk([7], replica_id="decode-r1", finished=True, finish_reason="length")

    async def consume() -> list[DecodeChunk]:
        return [chunk async for chunk in decode.decode(DecodeRequest(work, 9, result.handle, 1), chunks())]

    assert len(asyncio.run(consume())) == 3
    span.finish(_final(request))
    span.end()  # after finish: a no-op


def test_one_request_is_one_trace_parented_across_the_tracers() -> None:
    tracers = [Tracer(MEMORY, role, f"{role}-r1", model="tiny") for role in ("ingress", "prefill", "decode")]
    _run_request(*tracers, {"traceparent": TRACEPARENT, "x-other": "ignored"})
    spans = {s.name: s for tracer in tracers for s in tracer.exporter.get_finished_spans()}
    names = ["chat tiny", "pdserve.route", "pdserve.prefill.queue", "pdserve.prefill", "pdserve.kv_transfer",
             "pdserve.decode.queue", "pdserve.decode"]
    assert sorted(spans) == sorted(names)
    root = spans["chat tiny"]
    assert {format(s.context.trace_id, "032x") for s in spans.values()} == {CALLER_TRACE_ID}
    assert format(root.parent.span_id, "016x") == CALLER_SPAN_ID and root.parent.is_remote
    assert root.kind is SpanKind.SERVER
    for name in names[1:]:
        assert spans[name].parent.span_id == root.context.span_id, name
    # worker spans follow each other on the workers' own clocks: queue 2 ms, prefill 3 ms, pull 1.5 ms
    queue, prefill = spans["pdserve.prefill.queue"], spans["pdserve.prefill"]
    assert queue.end_time == prefill.start_time and prefill.end_time - prefill.start_time == 3_000_000
    assert queue.end_time - queue.start_time == 2_000_000
    transfer, decode_queue = spans["pdserve.kv_transfer"], spans["pdserve.decode.queue"]
    assert transfer.end_time - transfer.start_time == 1_500_000
    assert transfer.end_time == decode_queue.start_time
    assert decode_queue.end_time == spans["pdserve.decode"].start_time
    attributes = root.attributes
    assert attributes["gen_ai.operation.name"] == "chat" and attributes["gen_ai.request.model"] == "tiny"
    assert (attributes["gen_ai.usage.input_tokens"], attributes["gen_ai.usage.output_tokens"]) == (40, 4)
    assert attributes["gen_ai.usage.cache_read.input_tokens"] == 32
    assert attributes["gen_ai.response.finish_reasons"] == ("length",)
    assert attributes["gen_ai.request.seed"] == 7 and attributes["pdserve.tenant"] == "tenant-a"
    assert attributes["pdserve.route.reason"] == "prefill=ring_owner decode=kv_headroom"
    assert spans["pdserve.route"].attributes["pdserve.route.reason"] == "ring_owner"
    assert prefill.attributes["pdserve.kv.blocks"] == 3
    assert prefill.attributes["pdserve.kv.bytes"] == 3 * 16 * 256
    assert prefill.attributes["pdserve.cache.evicted_by"] == ("tenant-b=2",)
    assert transfer.attributes["pdserve.kv.blocks"] == 3
    assert transfer.attributes["pdserve.kv.transport"] == "shm"
    assert spans["pdserve.decode"].attributes["pdserve.decode.tokens"] == 3
    assert all(s.status.status_code is not StatusCode.ERROR for s in spans.values())


def test_without_a_traceparent_the_ingress_span_starts_the_trace() -> None:
    tracers = [Tracer(MEMORY, role, model="tiny") for role in ("ingress", "prefill", "decode")]
    _run_request(*tracers, {"traceparent": "not-a-traceparent"})
    spans = [s for tracer in tracers for s in tracer.exporter.get_finished_spans()]
    (root,) = [s for s in spans if s.parent is None]
    assert len({s.context.trace_id for s in spans}) == 1 and root.name == "chat tiny"


def test_a_request_that_ends_without_a_final_response_is_an_error_span() -> None:
    tracer = Tracer(MEMORY, "ingress", model="tiny")
    tracer.start_request(_valid(), None).end()
    spans = {s.name: s for s in tracer.exporter.get_finished_spans()}
    assert set(spans) == {"text_completion tiny", "pdserve.route"}
    assert spans["text_completion tiny"].status.status_code is StatusCode.ERROR


def test_cache_attributes_flatten_a_dataclass() -> None:
    attribution = CacheAttribution(cached_tokens=0, cacheable_tokens=48, cause="evicted", evicted_blocks=3,
                                   evicted_by=(("b", 2), ("c", 1)))
    attributes = cache_attributes(attribution)
    assert attributes["pdserve.cache.cause"] == "evicted" and attributes["pdserve.cache.evicted_blocks"] == 3
    assert attributes["pdserve.cache.evicted_by"] == ("b=2", "c=1")
    assert cache_attributes(None) == {}


def test_a_sampled_out_request_records_nothing() -> None:
    tracer = Tracer(TracingConfig(enabled=True, exporter="memory", sample_ratio=0.0), "ingress")
    span = tracer.start_request(_valid(), None)
    flags = span.context["traceparent"].rsplit("-", 1)[1]
    assert int(flags, 16) & 1 == 0  # not sampled: the workers record nothing either
    span.end()
    assert tracer.exporter.get_finished_spans() == ()


class _Context:
    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", "Bearer x"), ("traceparent", TRACEPARENT), ("TraceState", "k=v"))


class _Wire:
    def __init__(self, prompt: str) -> None:
        self.prompt = prompt

    def WhichOneof(self, name: str) -> str:  # the protobuf method's name
        assert name == "prompt"
        return self.prompt


def test_the_parent_comes_from_grpc_metadata_and_http_headers_only_when_on() -> None:
    assert grpc_parent(NULL_TRACER, None, None) is None and http_parent(NULL_TRACER, None, True) is None
    tracer = Tracer(MEMORY, "ingress")
    parent = grpc_parent(tracer, _Context(), _Wire("messages"))
    assert parent == TraceParent({"traceparent": TRACEPARENT, "tracestate": "k=v"}, "chat")
    assert grpc_parent(tracer, _Context(), _Wire("token_ids")).operation == "text_completion"
    headers = {"content-type": "application/json", "traceparent": TRACEPARENT}
    assert http_parent(tracer, headers, is_chat=False) == TraceParent({"traceparent": TRACEPARENT})
