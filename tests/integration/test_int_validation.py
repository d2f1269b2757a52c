"""Acceptance 3: every bad input gets its own status code and a message naming the field, and the
server then serves the next request normally. Bytes no Python client can put in a proto ``string``
(invalid UTF-8) or a ``uint32`` (a negative number) go through a channel whose request serializer sends
raw bytes of the server's private twin message."""

from __future__ import annotations

import grpc
import pytest

from protos import pdserve_pb2 as pb
from protos import pdserve_pb2_grpc, pdserve_wire_pb2
from tests.integration.int_helpers import cluster_config

pytestmark = pytest.mark.integration

GENERATE = "/pdserve.v1.PDServe/Generate"

BAD_REQUESTS = [
    ("empty text", pb.GenerateRequest(text="", max_tokens=4), grpc.StatusCode.INVALID_ARGUMENT, "text:"),
    ("no prompt", pb.GenerateRequest(max_tokens=4), grpc.StatusCode.INVALID_ARGUMENT, "text:"),
    (
        "empty token ids",
        pb.GenerateRequest(token_ids=pb.TokenIds(ids=[]), max_tokens=4),
        grpc.StatusCode.INVALID_ARGUMENT,
        "token_ids:",
    ),
    (
        "prompt over the context",
        pb.GenerateRequest(token_ids=pb.TokenIds(ids=[65] * 5000), max_tokens=4),
        grpc.StatusCode.INVALID_ARGUMENT,
        "token_ids:",
    ),
    (
        "max_tokens 0",
        pb.GenerateRequest(text="hi", max_tokens=0),
        grpc.StatusCode.INVALID_ARGUMENT,
        "max_tokens: must be > 0, got 0",
    ),
    (
        "max_tokens past the context",
        pb.GenerateRequest(text="hi", max_tokens=5000),
        grpc.StatusCode.INVALID_ARGUMENT,
        "max_tokens:",
    ),
    (
        "temperature < 0",
        pb.GenerateRequest(text="hi", max_tokens=4, temperature=-0.5),
        grpc.StatusCode.INVALID_ARGUMENT,
        "temperature:",
    ),
    (
        "top_p 0",
        pb.GenerateRequest(text="hi", max_tokens=4, top_p=0.0),
        grpc.StatusCode.INVALID_ARGUMENT,
        "top_p:",
    ),
    (
        "top_p > 1",
        pb.GenerateRequest(text="hi", max_tokens=4, top_p=1.5),
        grpc.StatusCode.INVALID_ARGUMENT,
        "top_p:",
    ),
    (
        "top_k < 0",
        pb.GenerateRequest(text="hi", max_tokens=4, top_k=-1),
        grpc.StatusCode.INVALID_ARGUMENT,
        "top_k:",
    ),
    (
        "token id outside the vocabulary",
        pb.GenerateRequest(token_ids=pb.TokenIds(ids=[256, 99999]), max_tokens=4),
        grpc.StatusCode.INVALID_ARGUMENT,
        "token_ids[1]: 99999 is outside the vocabulary",
    ),
    (
        "stop token id outside the vocabulary",
        pb.GenerateRequest(text="hi", max_tokens=4, stop_token_ids=[70000]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "stop_token_ids[0]:",
    ),
]

RAW_BAD_REQUESTS = [
    (
        "invalid UTF-8",
        pdserve_wire_pb2.GenerateRequestWire(text=b"ab\xffcd", max_tokens=4),
        grpc.StatusCode.INVALID_ARGUMENT,
        "text: invalid UTF-8 at byte 2",
    ),
    (
        "negative max_tokens",
        pdserve_wire_pb2.GenerateRequestWire(text=b"hi", max_tokens=-3),
        grpc.StatusCode.INVALID_ARGUMENT,
        "max_tokens: must be > 0, got -3",
    ),
    (
        "invalid UTF-8 in a stop string",
        pdserve_wire_pb2.GenerateRequestWire(text=b"hi", max_tokens=4, stop=[b"\xc3"]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "stop[0]: invalid UTF-8 at byte 0",
    ),
    ("not a GenerateRequest", b"\xff\xff\xff", grpc.StatusCode.INVALID_ARGUMENT, "request:"),
]

GOOD = pb.GenerateRequest(text="hello", max_tokens=3, ignore_eos=True)


def _expect_ok(stub: pdserve_pb2_grpc.PDServeStub) -> None:
    responses = list(stub.Generate(GOOD, timeout=60))
    assert sum(len(r.token_ids) for r in responses) == 3
    assert responses[-1].finish_reason == pb.FINISH_REASON_LENGTH


@pytest.fixture(scope="module")
def address(pd_cluster) -> str:
    """Whatever cluster the session already runs (validation is the ingress's job in every shape)."""
    return (pd_cluster.cluster or pd_cluster.ensure(cluster_config(1, 1))).grpc_address


@pytest.mark.parametrize(
    ("name", "request_", "code", "message"), BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS]
)
def test_bad_request_is_refused_by_field(
    address: str, name: str, request_: pb.GenerateRequest, code: grpc.StatusCode, message: str
) -> None:
    with grpc.insecure_channel(address) as channel:
        stub = pdserve_pb2_grpc.PDServeStub(channel)
        with pytest.raises(grpc.RpcError) as raised:
            list(stub.Generate(request_, timeout=60))
        assert raised.value.code() == code, raised.value.details()
        assert message in raised.value.details()
        _expect_ok(stub)


@pytest.mark.parametrize(
    ("name", "wire", "code", "message"), RAW_BAD_REQUESTS, ids=[c[0] for c in RAW_BAD_REQUESTS]
)
def test_raw_bad_request_is_refused_by_field(
    address: str, name: str, wire: object, code: grpc.StatusCode, message: str
) -> None:
    raw = wire if isinstance(wire, bytes) else wire.SerializeToString()  # type: ignore[attr-defined]
    with grpc.insecure_channel(address) as channel:
        generate = channel.unary_stream(
            GENERATE,
            request_serializer=lambda data: data,
            response_deserializer=pb.GenerateResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as raised:
            list(generate(raw, timeout=60))
        assert raised.value.code() == code, raised.value.details()
        assert message in raised.value.details()
        _expect_ok(pdserve_pb2_grpc.PDServeStub(channel))
