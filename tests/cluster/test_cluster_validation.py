"""Request validation without a server: the twin message, codes and field names."""

from __future__ import annotations

import grpc
import pytest

from cluster.validation import ModelLimits, RequestError, WireParseFailure, parse_generate_request, validate
from engine.tokenizer import ByteTokenizer
from protos import pdserve_pb2 as pb

LIMITS = ModelLimits(vocab_size=320, max_model_len=64)


def _validate(request: pb.GenerateRequest):
    wire = parse_generate_request(request.SerializeToString())
    assert not isinstance(wire, WireParseFailure)
    return validate(wire, ByteTokenizer().encode, LIMITS)


def test_a_good_request_keeps_every_field() -> None:
    request = pb.GenerateRequest(
        text="hi",
        max_tokens=5,
        temperature=0.7,
        top_p=0.9,
        top_k=40,
        seed=3,
        stop=["\n"],
        stop_token_ids=[257],
        tenant_id="t",
        request_id="r",
        ignore_eos=True,
    )
    valid = _validate(request)
    assert valid.prompt_token_ids == (256, 104, 105) and valid.request_id == "r" and valid.tenant == "t"
    sampling = valid.sampling
    assert (sampling.max_tokens, sampling.top_k, sampling.seed, sampling.stop, sampling.stop_token_ids) == (
        5,
        40,
        3,
        ("\n",),
        (257,),
    )
    assert sampling.temperature == pytest.approx(0.7) and sampling.top_p == pytest.approx(0.9)
    assert sampling.ignore_eos


def test_defaults_and_generated_request_id() -> None:
    valid = _validate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 2]), max_tokens=1))
    assert valid.sampling.temperature == 0.0 and valid.sampling.top_p == 1.0 and valid.sampling.top_k == 0
    assert valid.sampling.seed is None and len(valid.request_id) == 32


@pytest.mark.parametrize(
    ("request_", "code", "message"),
    [
        (pb.GenerateRequest(max_tokens=1), grpc.StatusCode.INVALID_ARGUMENT, "text: the prompt is empty"),
        (
            pb.GenerateRequest(token_ids=pb.TokenIds(ids=[65] * 64), max_tokens=1),
            grpc.StatusCode.INVALID_ARGUMENT,
            "token_ids: prompt has 64 tokens",
        ),
        (
            pb.GenerateRequest(token_ids=pb.TokenIds(ids=[65] * 60), max_tokens=5),
            grpc.StatusCode.INVALID_ARGUMENT,
            "max_tokens: prompt (60 tokens) + max_tokens (5)",
        ),
        (
            pb.GenerateRequest(text="x", max_tokens=1, temperature=float("nan")),
            grpc.StatusCode.INVALID_ARGUMENT,
            "temperature:",
        ),
        (
            pb.GenerateRequest(text="x", max_tokens=1, stop=[""]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "stop[0]: must not be empty",
        ),
        (
            pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 320]), max_tokens=1),
            grpc.StatusCode.INVALID_ARGUMENT,
            "token_ids[1]: 320 is outside the vocabulary [0, 320)",
        ),
    ],
)
def test_bad_requests(request_: pb.GenerateRequest, code: grpc.StatusCode, message: str) -> None:
    with pytest.raises(RequestError) as raised:
        _validate(request_)
    assert raised.value.code == code
    assert message in raised.value.message


def test_garbage_bytes_are_a_parse_failure() -> None:
    assert isinstance(parse_generate_request(b"\xff\xff\xff"), WireParseFailure)
