"""cluster.tracing's OTLP exporter into cluster.otlp_receiver over a real gRPC connection (no Ray)."""

from __future__ import annotations

from cluster.otlp_receiver import OtlpReceiver
from cluster.tracing import Tracer, TracingConfig
from cluster.validation import ValidRequest
from worker_common.messages import SamplingSpec


def test_spans_cross_the_wire_with_their_attributes_and_resource() -> None:
    with OtlpReceiver() as receiver:
        config = TracingConfig(enabled=True, exporter="otlp", otlp_endpoint=receiver.endpoint)
        tracer = Tracer(config, "ingress", "ingress-r1", model="tiny")
        request = ValidRequest("client-9", (1, 2, 3), SamplingSpec(max_tokens=3), "t")
        span = tracer.start_request(request, tracer.parent_from((), "chat"))
        span.routed("prefill", "p1", "ring_owner")
        span.end()
        tracer.shutdown()  # flushes the batch processor
        spans = receiver.wait_for(lambda spans: len(spans) >= 2, timeout_s=10.0)
    by_name = {span.name: span for span in spans}
    assert set(by_name) == {"chat tiny", "pdserve.route"}
    root, route = by_name["chat tiny"], by_name["pdserve.route"]
    assert root.parent_span_id == "" and route.parent_span_id == root.span_id
    assert route.trace_id == root.trace_id and len(root.trace_id) == 32
    assert root.attributes["pdserve.request.id"] == "client-9"
    assert root.attributes["gen_ai.request.max_tokens"] == 3
    assert route.attributes["pdserve.route.replica"] == "p1"
    assert root.resource["service.name"] == "pdserve" and root.resource["pdserve.role"] == "ingress"
    assert root.resource["service.instance.id"] == "ingress-r1"
    assert root.status_code == 2  # ended without a final response: an error
    assert receiver.num_bytes > 0
