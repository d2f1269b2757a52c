"""Request bodies of the OpenAI API as pydantic models, and their translation to the gRPC request.

A body becomes a ``GenerateRequestWire`` (the twin the gRPC server parses into) and goes through the same
``cluster.validation.validate`` as a gRPC request, so both APIs refuse the same things with the same
words. What is the HTTP API's own is checked here: the body's JSON types, one prompt per request,
``n == 1``, the OpenAI features pdserve does not have (``logprobs``, penalties, ...).

Unknown fields are accepted and ignored, as vLLM does (OpenAI clients and gateways send fields of their
own); their names are returned by ``ignored_fields`` so the server can log them. Known OpenAI fields
that would change the output are refused unless they hold their neutral value.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cluster.openai_api.errors import ApiError, bad_request, from_grpc
from cluster.validation import MAX_ID_LENGTH, ModelLimits, RequestError, ValidRequest, validate
from protos import pdserve_wire_pb2 as wire_pb

TokenId = Annotated[int, Field(ge=0, lt=2**63)]
Stop = str | list[str] | None
_INT64_CLAMP = 2**62


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(_Body):
    include_usage: bool = False


class _SamplingBody(_Body):
    """What completions and chat completions share."""

    model: str | None = None  # the served model's id (GET /v1/models); None: the served model
    max_tokens: int | None = None  # None: what is left of the context (as vLLM)
    temperature: float | None = None  # None: greedy (pdserve's default, the gRPC API's too)
    top_p: float | None = None
    top_k: int | None = None  # an extension (vLLM, SGLang); -1 means off, as in vLLM
    seed: int | None = Field(None, ge=0, lt=2**64)
    stop: Stop = None
    stop_token_ids: list[TokenId] | None = None  # extension (vLLM)
    ignore_eos: bool = False  # extension (vLLM)
    return_token_ids: bool = False  # extension (vLLM): choices carry the generated token ids
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # the tenant (prefix-cache isolation) until tenancy has its own API
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_SamplingBody):
    """``POST /v1/completions``."""

    prompt: Any  # text, [text], token ids or [token ids]: checked by completion_wire (clearer messages)
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: str
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_SamplingBody):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage]
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens; wins when both are set
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None


def parse_body(model: type[_SamplingBody], data: Any) -> Any:
    """Validate a decoded JSON body; a bad field is a 400 naming it (``messages.0.role``)."""
    if not isinstance(data, dict):
        raise bad_request(None, f"body: must be a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        location = ".".join(str(part) for part in first["loc"] if not _is_union_tag(part))
        param = location.split(".", 1)[0] or None
        raise bad_request(param, f"{location or 'body'}: {first['msg']}") from None


def _is_union_tag(part: Any) -> bool:
    """pydantic names the union member it tried (``str``, ``list[int]``) in the location: drop it."""
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "function-after"))


def ignored_fields(body: BaseModel) -> list[str]:
    """Top-level fields the body carried that pdserve does not know (accepted, ignored)."""
    return sorted(body.model_extra or ())


def _refuse_unsupported(body: _SamplingBody) -> None:
    """OpenAI fields pdserve cannot honour: refused unless neutral, so no output silently differs."""
    if body.n != 1:
        raise bad_request("n", f"n: only n=1 is supported, got {body.n}; send n requests instead")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name) != 0:
            raise bad_request(name, f"{name}: not supported (must be 0), got {getattr(body, name)}")
    if body.logit_bias:
        raise bad_request("logit_bias", "logit_bias: not supported")
    if isinstance(body, CompletionRequest):
        if body.logprobs is not None:
            raise bad_request("logprobs", "logprobs: not supported yet")
        if body.echo:
            raise bad_request("echo", "echo: not supported")
        if body.best_of not in (None, 1):
            raise bad_request("best_of", f"best_of: only 1 is supported, got {body.best_of}")
        if body.suffix:
            raise bad_request("suffix", "suffix: not supported")
    if isinstance(body, ChatCompletionRequest):
        if body.logprobs or body.top_logprobs:
            raise bad_request("logprobs", "logprobs: not supported yet")
        if body.tools or body.tool_choice not in (None, "none"):
            raise bad_request("tools", "tools: tool calling is not supported")
        if body.response_format and body.response_format.get("type") not in (None, "text"):
            raise bad_request("response_format", "response_format: only {\"type\": \"text\"} is supported")


def _encode(field: str, text: str) -> bytes:
    """UTF-8 bytes of a JSON string (a lone surrogate escape such as \\ud800 has none)."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as error:
        message = f"{field}: invalid Unicode at character {error.start}"
        raise bad_request(field.split("[", 1)[0], message) from None


def _fill_common(wire: wire_pb.GenerateRequestWire, body: _SamplingBody, max_tokens: int | None) -> None:
    # None: set from the context after validate; clamped into int64 (validate then names the overflow)
    wire.max_tokens = 1 if max_tokens is None else max(-_INT64_CLAMP, min(max_tokens, _INT64_CLAMP))
    if body.temperature is not None:
        wire.temperature = body.temperature
    if body.top_p is not None:
        wire.top_p = body.top_p
    if body.top_k is not None:
        wire.top_k = 0 if body.top_k == -1 else max(-_INT64_CLAMP, min(body.top_k, _INT64_CLAMP))
    if body.seed is not None:
        wire.seed = body.seed
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or ())
    wire.stop.extend(_encode(f"stop[{index}]", text) for index, text in enumerate(stops))
    wire.stop_token_ids.extend(body.stop_token_ids or ())
    if body.user is not None and len(body.user) > MAX_ID_LENGTH:
        message = f"user: at most {MAX_ID_LENGTH} characters (the tenant id), got {len(body.user)}"
        raise bad_request("user", message)
    wire.tenant_id = _encode("user", body.user or "")
    wire.ignore_eos = body.ignore_eos


def completion_wire(body: CompletionRequest) -> wire_pb.GenerateRequestWire:
    """The gRPC request of a completions body (one prompt: text, ``[text]``, ids or ``[ids]``)."""
    _refuse_unsupported(body)
    prompt = _one_prompt(body.prompt)
    wire = wire_pb.GenerateRequestWire()
    if isinstance(prompt, str):
        wire.text = _encode("prompt", prompt)
    else:
        wire.token_ids.SetInParent()  # an empty id list is still "token ids" (refused as empty)
        wire.token_ids.ids.extend(prompt)
    _fill_common(wire, body, body.max_tokens)
    return wire


_PROMPT_SHAPES = "a string, token ids, or a list holding one of them"


def _one_prompt(prompt: Any) -> str | list[int]:
    """The one prompt of a completions body; a batch (several prompts) is refused."""
    if isinstance(prompt, str):
        return prompt
    if not isinstance(prompt, list):
        raise bad_request("prompt", f"prompt: must be {_PROMPT_SHAPES}, got {type(prompt).__name__}")
    if prompt and all(isinstance(item, (str, list)) for item in prompt):
        if len(prompt) != 1:
            raise bad_request("prompt", f"prompt: one prompt per request, got {len(prompt)}")
        inner = prompt[0]
        return inner if isinstance(inner, str) else _token_ids("prompt[0]", inner)
    return _token_ids("prompt", prompt)


def _token_ids(field: str, items: list[Any]) -> list[int]:
    for index, item in enumerate(items):
        if isinstance(item, bool) or not isinstance(item, int):
            raise bad_request("prompt", f"{field}[{index}]: must be a token id (an integer), got {item!r}")
        if not 0 <= item < 2**63:
            raise bad_request("prompt", f"{field}[{index}]: must be a token id >= 0, got {item}")
    return items


def chat_wire(body: ChatCompletionRequest) -> wire_pb.GenerateRequestWire:
    """The gRPC request of a chat body: the conversation goes as ``messages`` (the chat template)."""
    _refuse_unsupported(body)
    wire = wire_pb.GenerateRequestWire()
    wire.messages.SetInParent()
    for index, message in enumerate(body.messages):
        wire.messages.messages.add(
            role=_encode(f"messages[{index}].role", message.role),
            content=_encode(f"messages[{index}].content", message.text()),
        )
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    _fill_common(wire, body, max_tokens)
    return wire


def validated(
    wire: wire_pb.GenerateRequestWire,
    body: _SamplingBody,
    tokenizer: Any,
    limits: ModelLimits,
    request_id: str,
) -> ValidRequest:
    """``cluster.validation.validate`` on the wire request, errors in the HTTP shape; a body without
    ``max_tokens`` gets what is left of the context."""
    wire.request_id = request_id.encode()
    has_max = body.max_tokens is not None or getattr(body, "max_completion_tokens", None) is not None
    prompt_field = "messages" if isinstance(body, ChatCompletionRequest) else "prompt"
    try:
        request = validate(wire, tokenizer.encode, limits, getattr(tokenizer, "encode_chat", None))
    except RequestError as error:
        api_error = from_grpc(error.code, error.message, prompt_field)
        if api_error.param == "max_tokens" and isinstance(body, ChatCompletionRequest):
            if body.max_completion_tokens is not None:
                api_error = _renamed(api_error, "max_tokens", "max_completion_tokens")
        raise api_error from None
    if has_max:
        return request
    remaining = limits.max_model_len - len(request.prompt_token_ids)
    return replace(request, sampling=replace(request.sampling, max_tokens=remaining))


def _renamed(error: ApiError, old: str, new: str) -> ApiError:
    return replace(error, param=new, message=error.message.replace(old, new))
