"""Issue 14, acceptance 1 and 2: OpenTelemetry traces from a running cluster, received over OTLP/gRPC.

The test process runs an OTLP/gRPC receiver (``cluster.otlp_receiver``: opentelemetry-proto's
TraceService on grpcio, a free port); the cluster (1 prefill + 1 decode replica, the random built-in
model, ``tracing.exporter: otlp``) exports to it from every process: the ingress replica, the prefill
replica and the decode replica each have their own tracer. Acceptance 1 uses the receiver too (an
in-memory exporter lives inside one process; tests/cluster/test_tracing.py covers it without Ray).

- one request sent with a W3C ``traceparent`` (gRPC metadata; and one over HTTP, a header) yields one
  trace, that trace id, the ingress span a child of the caller's span id, the seven spans ingress ->
  route -> prefill queue -> prefill -> KV transfer -> decode queue -> decode parented on the ingress
  span, from three processes, with the GenAI and pdserve attributes equal to what the client received
  (the built-in model has no chat template: the "chat" operation name is checked in the unit test);
- 16 concurrent requests without a parent: 16 traces of seven spans each arrive over the wire.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
from collections.abc import Iterator

import grpc
import openai
import pytest

from cluster.otlp_receiver import OtlpReceiver, ReceivedSpan
from engine.builtin import BUILTIN_MODEL_ID
from protos import pdserve_pb2 as pb
from protos import pdserve_pb2_grpc
from tests.integration.int_helpers import StreamResult, cluster_config, make_prompts, run_many

pytestmark = pytest.mark.integration

SPAN_NAMES = ("pdserve.route", "pdserve.prefill.queue", "pdserve.prefill", "pdserve.kv_transfer",
              "pdserve.decode.queue", "pdserve.decode")
NUM_SPANS = 1 + len(SPAN_NAMES)
NUM_NEW = 5
SERVER_KIND = 2  # opentelemetry.proto.trace.v1.Span.SPAN_KIND_SERVER


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as started:
        yield started


@pytest.fixture(scope="module")
def cluster(pd_cluster, receiver):
    changes = {"tracing.enabled": True, "tracing.exporter": "otlp",
               "tracing.otlp_endpoint": receiver.endpoint, "tracing.export_delay_ms": 100}
    return pd_cluster.ensure(cluster_config(changes=changes))


def _traceparent() -> tuple[str, str, str]:
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def _complete_trace(receiver: OtlpReceiver, trace_id: str) -> dict[str, ReceivedSpan]:
    spans = receiver.wait_for(
        lambda spans: sum(span.trace_id == trace_id for span in spans) >= NUM_SPANS, timeout_s=20.0
    )
    mine = [span for span in spans if span.trace_id == trace_id]
    by_name = {span.name: span for span in mine}
    assert len(by_name) == len(mine) == NUM_SPANS, sorted(span.name for span in mine)
    return by_name


def _check_tree(spans: dict[str, ReceivedSpan], operation: str) -> ReceivedSpan:
    """The ingress span and its six children, the workers' spans in order; returns the ingress span."""
    root = spans[f"{operation} {BUILTIN_MODEL_ID}"]
    assert root.kind == SERVER_KIND and root.resource["pdserve.role"] == "ingress"
    for name in SPAN_NAMES:
        assert spans[name].parent_span_id == root.span_id, name
        assert root.start_ns <= spans[name].start_ns <= spans[name].end_ns <= root.end_ns, name
    roles = {name: spans[name].resource["pdserve.role"] for name in SPAN_NAMES}
    assert roles == dict(zip(SPAN_NAMES, ["ingress", *["prefill"] * 2, *["decode"] * 3], strict=True))
    assert len({span.resource["service.instance.id"] for span in spans.values()}) == 3  # three processes
    ordered = [spans[name] for name in SPAN_NAMES[1:]]
    for before, after in itertools.pairwise(ordered):
        assert before.end_ns <= after.start_ns, (before.name, after.name)
    assert all(span.status_code != 2 for span in spans.values())
    return root


def _check_attributes(spans: dict[str, ReceivedSpan], usage: pb.Usage, route: pb.RouteInfo) -> None:
    root = spans[next(name for name in spans if name.endswith(BUILTIN_MODEL_ID))]
    attributes = root.attributes
    assert attributes["gen_ai.request.model"] == BUILTIN_MODEL_ID
    assert attributes["gen_ai.usage.input_tokens"] == usage.prompt_tokens
    assert attributes["gen_ai.usage.output_tokens"] == usage.completion_tokens == NUM_NEW
    assert attributes["gen_ai.usage.cache_read.input_tokens"] == usage.cached_tokens
    assert attributes["gen_ai.response.finish_reasons"] == ("length",)
    assert attributes["pdserve.route.reason"] == route.reason
    assert attributes["pdserve.prefill.replica"] == route.prefill_replica
    assert attributes["pdserve.decode.replica"] == route.decode_replica
    if "cache" in pb.GenerateResponse.DESCRIPTOR.fields_by_name:  # the response's cache attribution
        assert attributes["pdserve.cache.cached_tokens"] == usage.cached_tokens
        assert prefill_cache_tokens(spans) == usage.cached_tokens
    prefill, transfer = spans["pdserve.prefill"], spans["pdserve.kv_transfer"]
    assert prefill.attributes["pdserve.replica"] == route.prefill_replica
    assert prefill.attributes["gen_ai.usage.input_tokens"] == usage.prompt_tokens
    assert prefill.attributes["gen_ai.usage.cache_read.input_tokens"] == usage.cached_tokens
    assert transfer.attributes["pdserve.replica"] == route.decode_replica
    assert transfer.attributes["pdserve.kv.source_replica"] == route.prefill_replica
    assert transfer.attributes["pdserve.kv.transport"] == route.kv_transport == "shm"
    num_blocks = -(-usage.prompt_tokens // 16)
    assert transfer.attributes["pdserve.kv.blocks"] == num_blocks
    assert transfer.attributes["pdserve.kv.bytes"] > 0
    assert spans["pdserve.route"].attributes["pdserve.route.reason"] == route.reason.split()[0].split("=")[1]
    # the first token is prefill's
    assert spans["pdserve.decode"].attributes["pdserve.decode.tokens"] == NUM_NEW - 1


def prefill_cache_tokens(spans: dict[str, ReceivedSpan]) -> int:
    """The prefill replica's own attribution on its span (PrefillResult.cache)."""
    return spans["pdserve.prefill"].attributes["pdserve.cache.cached_tokens"]


def _generate(address: str, prompt: tuple[int, ...], traceparent: str) -> StreamResult:
    async def one() -> StreamResult:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pdserve_pb2_grpc.PDServeStub(channel)
            request = pb.GenerateRequest(request_id="traced-1", max_tokens=NUM_NEW, ignore_eos=True)
            request.token_ids.ids.extend(prompt)
            result = StreamResult()
            call = stub.Generate(request, metadata=(("traceparent", traceparent),), timeout=60)
            async for response in call:
                result.token_ids.extend(response.token_ids)
                result.last = response
            return result

    return asyncio.run(one())


def test_a_grpc_request_with_a_traceparent_continues_that_trace(cluster, receiver) -> None:
    traceparent, trace_id, parent_span_id = _traceparent()
    result = _generate(cluster.grpc_address, make_prompts(1, seed=5)[0], traceparent)
    assert result.last is not None and len(result.token_ids) == NUM_NEW
    spans = _complete_trace(receiver, trace_id)
    root = _check_tree(spans, "text_completion")
    assert root.parent_span_id == parent_span_id  # the caller's span, in another process
    assert root.attributes["pdserve.request.id"] == "traced-1"
    _check_attributes(spans, result.last.usage, result.last.route)


def test_an_http_request_with_a_traceparent_header_continues_that_trace(cluster, receiver) -> None:
    traceparent, trace_id, parent_span_id = _traceparent()
    client = openai.OpenAI(base_url=f"http://{cluster.http_address}/v1", api_key="none", max_retries=0)
    response = client.completions.create(  # the built-in model has no chat template: a plain completion
        model=BUILTIN_MODEL_ID, prompt="trace this request", max_tokens=NUM_NEW,
        extra_body={"ignore_eos": True}, extra_headers={"traceparent": traceparent},
    )
    assert response.usage is not None and response.usage.completion_tokens == NUM_NEW
    spans = _complete_trace(receiver, trace_id)
    root = _check_tree(spans, "text_completion")
    assert root.parent_span_id == parent_span_id
    assert root.attributes["gen_ai.operation.name"] == "text_completion"
    assert root.attributes["gen_ai.usage.input_tokens"] == response.usage.prompt_tokens
    assert root.attributes["gen_ai.usage.output_tokens"] == NUM_NEW


def test_sixteen_requests_arrive_as_sixteen_complete_traces(cluster, receiver) -> None:
    already = {span.trace_id for span in receiver.spans}
    requests = []
    for index, prompt in enumerate(make_prompts(16, seed=11)):
        request = pb.GenerateRequest(request_id=f"many-{index}", max_tokens=NUM_NEW, ignore_eos=True)
        request.token_ids.ids.extend(prompt)
        requests.append(request)
    results = asyncio.run(run_many(cluster.grpc_address, requests))
    assert all(result.code == grpc.StatusCode.OK and len(result.token_ids) == NUM_NEW for result in results)

    def roots(spans: list[ReceivedSpan]) -> dict[str, ReceivedSpan]:
        return {span.attributes.get("pdserve.request.id"): span for span in spans
                if span.trace_id not in already and span.kind == SERVER_KIND}

    def complete(spans: list[ReceivedSpan]) -> bool:
        new = [span for span in spans if span.trace_id not in already]
        return len(roots(spans)) == 16 and len(new) >= 16 * NUM_SPANS

    spans = receiver.wait_for(complete, timeout_s=30.0)
    by_request = roots(spans)
    assert sorted(by_request) == sorted(f"many-{index}" for index in range(16))
    for index, result in enumerate(results):
        root = by_request[f"many-{index}"]
        assert root.parent_span_id == ""  # no traceparent sent: the ingress span starts the trace
        trace = {span.name: span for span in spans if span.trace_id == root.trace_id}
        assert len(trace) == NUM_SPANS and _check_tree(trace, "text_completion") == root
        assert result.last is not None
        _check_attributes(trace, result.last.usage, result.last.route)
    assert len({root.trace_id for root in by_request.values()}) == 16
