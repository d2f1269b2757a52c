"""The OpenAI HTTP API's pure logic: bodies -> the gRPC wire request -> validation, SSE framing, errors."""

from __future__ import annotations

import json

import grpc
import pytest

from cluster.openai_api.errors import ApiError, from_grpc
from cluster.openai_api.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    chat_wire,
    completion_wire,
    ignored_fields,
    parse_body,
    validated,
)
from cluster.openai_api.responses import DONE_EVENT, ResponseBuilder, sse_event
from cluster.validation import ModelLimits
from engine.tokenizer import ByteTokenizer
from protos import pdserve_pb2 as pb

LIMITS = ModelLimits(vocab_size=259, max_model_len=64)


def _completion(body: dict) -> object:
    parsed = parse_body(CompletionRequest, body)
    return validated(completion_wire(parsed), parsed, ByteTokenizer(), LIMITS, "cmpl-1")


def test_completion_prompt_forms_give_the_same_ids() -> None:
    ids = ByteTokenizer().encode("hi")
    forms = ["hi", ["hi"], ids, [ids]]
    requests = [_completion({"prompt": form, "max_tokens": 3}) for form in forms]
    assert {r.prompt_token_ids for r in requests} == {tuple(ids)}
    assert all(r.sampling.max_tokens == 3 and r.request_id == "cmpl-1" for r in requests)


def test_sampling_fields_reach_the_sampling_spec() -> None:
    request = _completion(
        {
            "prompt": "hi",
            "max_tokens": 5,
            "temperature": 0.5,
            "top_p": 0.9,
            "top_k": 4,
            "seed": 7,
            "stop": "x",
            "user": "tenant-a",
            "ignore_eos": True,
            "stop_token_ids": [10],
        }
    )
    spec = request.sampling
    assert (spec.temperature, round(spec.top_p, 5), spec.top_k, spec.seed) == (0.5, 0.9, 4, 7)
    assert spec.stop == ("x",) and spec.stop_token_ids == (10,) and spec.ignore_eos
    assert request.tenant == "tenant-a"
    assert _completion({"prompt": "hi", "max_tokens": 1, "stop": ["a", "b"], "top_k": -1}).sampling.top_k == 0


def test_missing_max_tokens_is_what_the_context_leaves() -> None:
    request = _completion({"prompt": "hello"})  # 6 tokens with BOS
    assert request.sampling.max_tokens == LIMITS.max_model_len - 6


def test_chat_max_completion_tokens_wins() -> None:
    body = parse_body(
        ChatCompletionRequest,
        {
            "messages": [{"role": "user", "content": [{"type": "text", "text": t} for t in "ab"]}],
            "max_tokens": 9,
            "max_completion_tokens": 4,
        },
    )
    wire = chat_wire(body)
    assert wire.max_tokens == 4 and wire.messages.messages[0].content == b"ab"


@pytest.mark.parametrize(
    ("body", "status", "param", "words"),
    [
        ({"prompt": "hi", "n": 2}, 400, "n", "n=1"),
        ({"prompt": "hi", "logprobs": 1}, 400, "logprobs", "logprobs"),
        ({"prompt": "hi", "presence_penalty": 0.5}, 400, "presence_penalty", "presence_penalty"),
        ({"prompt": "hi", "stop": 3}, 400, "stop", "stop"),
        ({"prompt": "hi", "stop": [""]}, 400, "stop", "stop[0]"),
        ({"prompt": "hi", "max_tokens": 0}, 400, "max_tokens", "must be > 0"),
        ({"prompt": "hi", "max_tokens": 10**30}, 400, "max_tokens", "exceeds the model's context of 64"),
        ({"prompt": "hello", "max_tokens": 60}, 400, "max_tokens", "prompt (6 tokens) + max_tokens (60)"),
        ({"prompt": "x" * 70}, 400, "prompt", "prompt has 71 tokens"),
        ({"prompt": [1, 300]}, 400, "prompt", "prompt[1]: 300 is outside the vocabulary"),
        ({"prompt": [-1]}, 400, "prompt", "prompt[0]: must be a token id >= 0, got -1"),
        ({"prompt": [[1, "a"]]}, 400, "prompt", "prompt[0][1]: must be a token id"),
        ({"prompt": 5}, 400, "prompt", "prompt: must be a string"),
        ({"prompt": ""}, 400, "prompt", "prompt: the prompt is empty"),
        ({"prompt": []}, 400, "prompt", "prompt: the prompt is empty"),
        ({"prompt": ["a", "b"]}, 400, "prompt", "one prompt per request"),
        ({"prompt": "a\ud800"}, 400, "prompt", "invalid Unicode"),
        ({"prompt": "hi", "temperature": "hot"}, 400, "temperature", "temperature"),
        ({"prompt": "hi", "user": "u" * 300}, 400, "user", "at most 256"),
        ({"max_tokens": 3}, 400, "prompt", "prompt: Field required"),
        ({"prompt": "hi", "stop": 5}, 400, "stop", "stop: Input should be a valid string"),
    ],
)
def test_refusals_name_the_field(body: dict, status: int, param: str, words: str) -> None:
    with pytest.raises(ApiError) as caught:
        _completion(body)
    error = caught.value
    assert (error.status, error.param) == (status, param), error
    assert words in error.message, error.message


def test_a_request_that_can_never_fit_is_invalid_argument_naming_both_numbers() -> None:
    """Issue 15: prompt + max_tokens beyond the context (one replica's KV pool caps it) -> 400 with
    OpenAI's error shape, code invalid_argument (gRPC INVALID_ARGUMENT), the prompt and max_tokens named."""
    for body, numbers in [
        ({"prompt": "hello", "max_tokens": 60}, ("prompt (6 tokens)", "max_tokens (60)")),
        ({"prompt": "x" * 70, "max_tokens": 2}, ("prompt has 71 tokens", "max_tokens 2")),
    ]:
        with pytest.raises(ApiError) as caught:
            _completion(body)
        error = caught.value.body()["error"]
        assert caught.value.status == 400 and error["code"] == "invalid_argument", error
        assert error["type"] == "invalid_request_error" and all(n in error["message"] for n in numbers), error


def test_chat_refusals() -> None:
    def refuse(body: dict) -> ApiError:
        parsed = parse_body(ChatCompletionRequest, {"max_tokens": 3, **body})
        with pytest.raises(ApiError) as caught:
            validated(chat_wire(parsed), parsed, ByteTokenizer(), LIMITS, "chatcmpl-1")
        return caught.value

    no_template = refuse({"messages": [{"role": "user", "content": "hi"}]})
    assert no_template.param == "messages" and "chat template" in no_template.message
    bad_role = refuse({"messages": [{"role": "robot", "content": "hi"}]})
    assert bad_role.param == "messages" and bad_role.message.startswith("messages[0].role")
    assert refuse({"messages": [{"role": "user", "content": "x"}], "logprobs": True}).param == "logprobs"
    assert refuse({"messages": [{"role": "user", "content": "x"}], "tools": [{}]}).param == "tools"


def test_unknown_fields_are_accepted_and_named() -> None:
    body = parse_body(CompletionRequest, {"prompt": "hi", "max_tokens": 2, "frobnicate": 1, "metadata": {}})
    assert ignored_fields(body) == ["frobnicate", "metadata"]
    assert _completion({"prompt": "hi", "max_tokens": 2, "frobnicate": 1}).sampling.max_tokens == 2


def test_body_must_be_an_object() -> None:
    with pytest.raises(ApiError) as caught:
        parse_body(CompletionRequest, [1])
    assert caught.value.status == 400 and "JSON object" in caught.value.message


@pytest.mark.parametrize(
    ("code", "status", "retry_after"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, 400, False),
        (grpc.StatusCode.OUT_OF_RANGE, 400, False),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, 429, True),
        (grpc.StatusCode.UNAVAILABLE, 503, True),
        (grpc.StatusCode.DEADLINE_EXCEEDED, 504, False),
        (grpc.StatusCode.INTERNAL, 500, False),
    ],
)
def test_grpc_codes_map_to_http(code: grpc.StatusCode, status: int, retry_after: bool) -> None:
    error = from_grpc(code, "NoKVSpaceError: no room")
    assert error.status == status
    assert ("Retry-After" in error.headers()) == retry_after
    body = error.body()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == code.name.lower()


def test_prompt_fields_are_renamed() -> None:
    error = from_grpc(grpc.StatusCode.INVALID_ARGUMENT, "token_ids[2]: 9 is outside", "messages")
    assert (error.param, error.message) == ("messages", "messages[2]: 9 is outside")
    assert from_grpc(grpc.StatusCode.INVALID_ARGUMENT, "tenant_id: bad").param == "user"


def _final(text: str, reason: int = pb.FINISH_REASON_EOS) -> pb.GenerateResponse:
    response = pb.GenerateResponse(text=text, finish_reason=reason)
    response.usage.prompt_tokens, response.usage.cached_tokens, response.usage.completion_tokens = 10, 4, 3
    return response


def _decode(events: list[bytes]) -> list:
    assert all(e.startswith(b"data: ") and e.endswith(b"\n\n") for e in events)
    return [e[6:-2].decode() if e == DONE_EVENT else json.loads(e[6:-2]) for e in events]


def test_chat_stream_framing() -> None:
    builder = ResponseBuilder("chatcmpl-1", "m", is_chat=True, include_usage=True)
    events = builder.first_events()
    events += builder.events(pb.GenerateResponse(text="He"))
    events += builder.events(pb.GenerateResponse(text=""))  # held back (a stop string may start): no event
    events += builder.events(_final("llo"))
    role, first, last, usage, done = _decode(events)
    assert role["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert first["choices"][0]["delta"] == {"content": "He"} and first["choices"][0]["finish_reason"] is None
    assert last["choices"][0] == {
        "index": 0,
        "logprobs": None,
        "finish_reason": "stop",
        "delta": {"content": "llo"},
    }
    assert first["usage"] is None and last["object"] == "chat.completion.chunk"
    assert usage["choices"] == [] and usage["usage"] == {
        "prompt_tokens": 10,
        "completion_tokens": 3,
        "total_tokens": 13,
        "prompt_tokens_details": {"cached_tokens": 4},
    }
    assert done == "[DONE]"


def test_completion_stream_without_usage_and_full_bodies() -> None:
    builder = ResponseBuilder("cmpl-1", "m", is_chat=False)
    assert builder.first_events() == []
    chunk, done = _decode(builder.events(_final("x", pb.FINISH_REASON_CONTEXT)))
    assert chunk["choices"][0]["text"] == "x" and chunk["choices"][0]["finish_reason"] == "length"
    assert "usage" not in chunk and done == "[DONE]"
    full = builder.full("abc", _final("c", pb.FINISH_REASON_STOP))
    assert full["object"] == "text_completion" and full["choices"][0]["text"] == "abc"
    assert full["usage"]["prompt_tokens_details"]["cached_tokens"] == 4
    chat = ResponseBuilder("chatcmpl-1", "m", is_chat=True).full("abc", _final("c"))
    assert chat["choices"][0]["message"] == {"role": "assistant", "content": "abc"}


def test_sse_event_is_compact_utf8() -> None:
    assert sse_event({"text": "é"}) == 'data: {"text":"é"}\n\n'.encode()


def test_return_token_ids_extension() -> None:
    builder = ResponseBuilder("cmpl-1", "m", is_chat=False, return_token_ids=True)
    held_back = pb.GenerateResponse(token_ids=[1, 2], text="")  # no text yet, but tokens were asked for
    (chunk,) = _decode(builder.events(held_back))
    assert chunk["choices"][0]["token_ids"] == [1, 2] and chunk["choices"][0]["text"] == ""
    assert builder.full("ab", _final("b"), [1, 2, 3])["choices"][0]["token_ids"] == [1, 2, 3]
