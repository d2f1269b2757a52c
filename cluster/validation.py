"""Checking a ``Generate`` request before any worker sees it.

The gRPC server parses the request bytes into the private twin ``GenerateRequestWire``
(protos/pdserve_wire.proto: strings as bytes, signed integers) with ``parse_generate_request``, so
invalid UTF-8 and negative numbers are reported by field instead of failing deserialization.
``validate`` turns the twin into a ``ValidRequest`` or raises ``RequestError`` carrying the gRPC status
code and a message that starts with the field name (``"max_tokens: must be > 0, got 0"``).

A ``messages`` prompt (a conversation) is rendered with the model's chat template by ``encode_chat``
(``engine.tokenizer``: ``add_generation_prompt``); ``chat_prompt_ids`` is the one place its rules live
(roles, a model without a template), for the gRPC API and any other front end. Its requests also stop at
the template's end-of-turn token (``ModelLimits.chat_stop_token_ids``) when that is not the EOS token.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import grpc

from protos import pdserve_wire_pb2
from worker_common.messages import SamplingSpec

MAX_STOP_STRINGS = 16
MAX_ID_LENGTH = 256
CHAT_ROLES = ("system", "user", "assistant")
MAX_CHAT_MESSAGES = 1024

EncodeChat = Callable[[Sequence[Mapping[str, str]]], list[int]]


class RequestError(Exception):
    """A request the server refuses: a gRPC status code and a message naming the field."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class WireParseFailure:
    """What the request deserializer returns for bytes that are not a GenerateRequest at all."""

    message: str


@dataclass(frozen=True)
class ValidRequest:
    """A checked request: token ids in the vocabulary, prompt + max_tokens within the context."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingSpec
    tenant: str


@dataclass(frozen=True)
class ModelLimits:
    """What validation needs to know about the served model."""

    vocab_size: int
    max_model_len: int  # context length: prompt + generated tokens
    # a chat request's extra stop tokens: the template's end-of-turn token where it is not EOS
    chat_stop_token_ids: tuple[int, ...] = ()


def parse_generate_request(data: bytes) -> pdserve_wire_pb2.GenerateRequestWire | WireParseFailure:
    """gRPC request deserializer: wire bytes -> the twin message (never raises)."""
    try:
        return pdserve_wire_pb2.GenerateRequestWire.FromString(data)
    except Exception as error:  # a DecodeError, whatever the protobuf runtime calls it
        return WireParseFailure(f"request: not a valid GenerateRequest ({error})")


def _utf8(field: str, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT, f"{field}: invalid UTF-8 at byte {error.start}"
        ) from None


def _invalid(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


def _check_ids(field: str, token_ids: Sequence[int], vocab_size: int) -> None:
    for index, token_id in enumerate(token_ids):
        if token_id >= vocab_size:
            raise _invalid(f"{field}[{index}]: {token_id} is outside the vocabulary [0, {vocab_size})")


def chat_prompt_ids(
    messages: Sequence[Mapping[str, str]], encode_chat: EncodeChat | None, field: str = "messages"
) -> list[int]:
    """A conversation's prompt ids: every message a known role, rendered by ``encode_chat`` (the
    model's chat template with the assistant's generation prompt). ``RequestError`` names ``field``
    (``messages[1].role: ...``) or says the model has no chat template."""
    from engine.tokenizer import NoChatTemplateError

    if not messages:
        raise _invalid(f"{field}: the conversation is empty (at least one message)")
    if len(messages) > MAX_CHAT_MESSAGES:
        raise _invalid(f"{field}: at most {MAX_CHAT_MESSAGES} messages, got {len(messages)}")
    for index, message in enumerate(messages):
        if message.get("role") not in CHAT_ROLES:
            raise _invalid(
                f"{field}[{index}].role: must be one of {', '.join(CHAT_ROLES)}, got {message.get('role')!r}"
            )
    if encode_chat is None:
        raise _invalid(f"{field}: this server does not render chat prompts")
    try:
        return list(encode_chat([{"role": m["role"], "content": m.get("content", "")} for m in messages]))
    except NoChatTemplateError as error:
        message = f"{field}: the served model has no chat template ({error}); send text or token_ids"
        raise _invalid(message) from None


def validate(
    wire: pdserve_wire_pb2.GenerateRequestWire,
    encode: Callable[[str], list[int]],
    limits: ModelLimits,
    encode_chat: EncodeChat | None = None,
) -> ValidRequest:
    """Check every field of ``wire``; raise ``RequestError`` on the first bad one."""
    prompt_ids = _prompt_ids(wire, encode, limits.vocab_size, encode_chat)
    sampling = _sampling(wire, limits.vocab_size)
    num_prompt = len(prompt_ids)
    prompt_field = wire.WhichOneof("prompt")
    if prompt_field == "messages":
        sampling = with_chat_stops(sampling, limits)
    # A request that can never fit (issue 15): INVALID_ARGUMENT naming the prompt and max_tokens. The
    # context is capped by one replica's KV pool (cluster.model_info), so this is also the KV bound.
    if num_prompt >= limits.max_model_len:
        raise _invalid(
            f"{prompt_field}: prompt has {num_prompt} tokens (max_tokens {sampling.max_tokens}), the model's "
            f"context is {limits.max_model_len} (the prompt must leave room for at least one new token)"
        )
    if num_prompt + sampling.max_tokens > limits.max_model_len:
        raise _invalid(
            f"max_tokens: prompt ({num_prompt} tokens) + max_tokens ({sampling.max_tokens}) exceeds the "
            f"model's context of {limits.max_model_len} tokens"
        )
    tenant = _utf8("tenant_id", wire.tenant_id)
    request_id = _utf8("request_id", wire.request_id)
    if len(tenant) > MAX_ID_LENGTH or len(request_id) > MAX_ID_LENGTH:
        raise _invalid(f"tenant_id/request_id: at most {MAX_ID_LENGTH} characters")
    return ValidRequest(
        request_id=request_id or uuid.uuid4().hex,
        prompt_token_ids=tuple(prompt_ids),
        sampling=sampling,
        tenant=tenant,
    )


def with_chat_stops(sampling: SamplingSpec, limits: ModelLimits) -> SamplingSpec:
    """``sampling`` that also stops at the chat template's end-of-turn token(s)."""
    extra = tuple(t for t in limits.chat_stop_token_ids if t not in sampling.stop_token_ids)
    return replace(sampling, stop_token_ids=sampling.stop_token_ids + extra) if extra else sampling


def _wire_messages(wire: pdserve_wire_pb2.GenerateRequestWire) -> list[dict[str, str]]:
    return [
        {
            "role": _utf8(f"messages[{index}].role", message.role),
            "content": _utf8(f"messages[{index}].content", message.content),
        }
        for index, message in enumerate(wire.messages.messages)
    ]


def _prompt_ids(
    wire: pdserve_wire_pb2.GenerateRequestWire,
    encode: Callable[[str], list[int]],
    vocab_size: int,
    encode_chat: EncodeChat | None,
) -> list[int]:
    which = wire.WhichOneof("prompt")
    if which is None:
        raise _invalid("text: the prompt is empty (set text, token_ids or messages)")
    if which == "messages":
        return chat_prompt_ids(_wire_messages(wire), encode_chat)
    if which == "text":
        text = _utf8("text", wire.text)
        if not text:
            raise _invalid("text: the prompt is empty")
        return list(encode(text))
    token_ids = list(wire.token_ids.ids)
    if not token_ids:
        raise _invalid("token_ids: the prompt is empty")
    _check_ids("token_ids", token_ids, vocab_size)
    return token_ids


def _sampling(wire: pdserve_wire_pb2.GenerateRequestWire, vocab_size: int) -> SamplingSpec:
    if wire.max_tokens <= 0:
        raise _invalid(f"max_tokens: must be > 0, got {wire.max_tokens}")
    temperature = wire.temperature if wire.HasField("temperature") else 0.0
    if math.isnan(temperature) or temperature < 0:
        raise _invalid(f"temperature: must be >= 0, got {temperature}")
    top_p = wire.top_p if wire.HasField("top_p") else 1.0
    if math.isnan(top_p) or not 0.0 < top_p <= 1.0:
        raise _invalid(f"top_p: must be in (0, 1], got {top_p}")
    top_k = wire.top_k if wire.HasField("top_k") else 0
    if top_k < 0:
        raise _invalid(f"top_k: must be >= 0 (0 turns it off), got {top_k}")
    if len(wire.stop) > MAX_STOP_STRINGS:
        raise _invalid(f"stop: at most {MAX_STOP_STRINGS} stop strings, got {len(wire.stop)}")
    stop = tuple(_utf8(f"stop[{index}]", raw) for index, raw in enumerate(wire.stop))
    for index, text in enumerate(stop):
        if not text:
            raise _invalid(f"stop[{index}]: must not be empty")
    stop_token_ids = tuple(wire.stop_token_ids)
    _check_ids("stop_token_ids", stop_token_ids, vocab_size)
    return SamplingSpec(
        max_tokens=int(wire.max_tokens),
        temperature=float(temperature),
        top_p=float(top_p),
        top_k=int(top_k),
        seed=int(wire.seed) if wire.HasField("seed") else None,
        stop=stop,
        stop_token_ids=stop_token_ids,
        ignore_eos=wire.ignore_eos,
    )
