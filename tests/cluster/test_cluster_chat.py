"""Chat prompts (``messages``) without a server: rendering, roles, UTF-8 by field, a model without a
chat template, the end-of-turn stop, and the model name of a GGUF checkpoint."""

from __future__ import annotations

import grpc
import pytest

from cluster.model_info import end_of_turn_token_ids, model_name
from cluster.validation import ModelLimits, RequestError, chat_prompt_ids, parse_generate_request, validate
from engine.tokenizer import ByteTokenizer
from protos import pdserve_pb2 as pb
from protos import pdserve_wire_pb2 as wire_pb

LIMITS = ModelLimits(vocab_size=320, max_model_len=64, chat_stop_token_ids=(300,))


def _render(messages) -> list[int]:
    """A stand-in chat template: every message as ``role-char content`` bytes, then BOS (the turn)."""
    ids: list[int] = []
    for message in messages:
        ids += list(f"{message['role'][0]}{message['content']}".encode())
    return [*ids, 256]


def _chat(*messages: tuple[str, str], max_tokens: int = 4, **fields) -> pb.GenerateRequest:
    request = pb.GenerateRequest(max_tokens=max_tokens, **fields)
    for role, content in messages:
        request.messages.messages.add(role=role, content=content)
    return request


def _validate(request, encode_chat=_render, limits: ModelLimits = LIMITS):
    wire = parse_generate_request(request.SerializeToString())
    return validate(wire, ByteTokenizer().encode, limits, encode_chat)


def test_messages_are_rendered_and_stop_at_the_end_of_turn() -> None:
    valid = _validate(_chat(("system", "s"), ("user", "hi"), ("assistant", ""), stop_token_ids=[5]))
    assert valid.prompt_token_ids == (*b"ss", *b"uhi", *b"a", 256)
    assert valid.sampling.stop_token_ids == (5, 300)  # the request's, then the template's end of turn
    text = _validate(pb.GenerateRequest(text="hi", max_tokens=1))
    assert text.sampling.stop_token_ids == ()  # only chat requests stop at the end-of-turn token


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (_chat(("user", "hi"), ("tool", "x")), "messages[1].role: must be one of system, user, assistant"),
        (_chat(("", "hi")), "messages[0].role: must be one of"),
        (_chat(), "text: the prompt is empty"),  # an empty ChatMessages is not sent: no prompt at all
        (_chat(("user", "x" * 70)), "messages: prompt has 72 tokens"),
    ],
)
def test_bad_messages_name_the_field(request_: pb.GenerateRequest, message: str) -> None:
    with pytest.raises(RequestError) as raised:
        _validate(request_)
    assert raised.value.message.startswith(message), raised.value.message


def test_an_empty_conversation_and_invalid_utf8_are_refused_by_field() -> None:
    empty = wire_pb.GenerateRequestWire(messages=wire_pb.ChatMessagesWire(), max_tokens=1)
    with pytest.raises(RequestError, match=r"^messages: the conversation is empty"):
        validate(empty, ByteTokenizer().encode, LIMITS, _render)
    bad = wire_pb.GenerateRequestWire(max_tokens=1)
    bad.messages.messages.add(role=b"user", content=b"ok")
    bad.messages.messages.add(role=b"user", content=b"\xff")
    with pytest.raises(RequestError, match=r"^messages\[1\]\.content: invalid UTF-8 at byte 0"):
        validate(parse_generate_request(bad.SerializeToString()), ByteTokenizer().encode, LIMITS, _render)


def test_a_model_without_a_chat_template_is_invalid_argument_naming_messages() -> None:
    with pytest.raises(RequestError) as raised:
        _validate(_chat(("user", "hi")), encode_chat=ByteTokenizer().encode_chat)
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.message.startswith("messages: the served model has no chat template")
    with pytest.raises(RequestError, match=r"^messages: the served model has no chat template"):
        chat_prompt_ids([{"role": "user", "content": "hi"}], ByteTokenizer().encode_chat)


class _FakeHF:
    """An HF tokenizer whose template closes a turn with ``<eot>`` (id 7); EOS is ``eos_id``."""

    all_special_ids = (7, 9)

    def apply_chat_template(self, messages, tokenize: bool) -> str:
        return "".join(f"<{m['role']}>{m['content']}<eot>\n" for m in messages)

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return [7, 10] if text.startswith("<eot>") else [11]


class _FakeTokenizer:
    chat_template = "{{ fake }}"

    def __init__(self, eos_id: int) -> None:
        self.hf_tokenizer = _FakeHF()
        self.eos_token_id = eos_id


def test_end_of_turn_token_is_found_from_the_template() -> None:
    assert end_of_turn_token_ids(_FakeTokenizer(eos_id=9)) == (7,)  # Llama 3 style: not EOS
    assert end_of_turn_token_ids(_FakeTokenizer(eos_id=7)) == ()  # SmolLM2 style: EOS already
    assert end_of_turn_token_ids(ByteTokenizer()) == ()  # no template


def test_model_names(tmp_path) -> None:
    from engine.builtin import SMOLLM2_MODEL_ID, smollm2_gguf_path

    assert model_name(SMOLLM2_MODEL_ID) == SMOLLM2_MODEL_ID
    assert model_name(smollm2_gguf_path()) == "SmolLM2-135M-Instruct.Q4_1"
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "tiny.gguf").write_bytes(b"")
    assert model_name(str(tmp_path / "m")) == "tiny"
    assert model_name(str(tmp_path)) == tmp_path.name  # no GGUF: a directory checkpoint's name
