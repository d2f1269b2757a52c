"""Tokenizers: the built-in model's byte tokenizer, and a checkpoint's HF tokenizer (directory or GGUF)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from engine.builtin import BOS_TOKEN_ID, BYTE_VOCAB, EOS_TOKEN_ID, PAD_TOKEN_ID, resolve_model_path
from engine.gguf import find_gguf_file, load_gguf_tokenizer


class NoChatTemplateError(ValueError):
    """A chat (``messages``) prompt for a model whose tokenizer has no chat template."""


class Tokenizer(Protocol):
    """What the engine and the workers use of a tokenizer."""

    eos_token_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, token_ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes are tokens 0..255; BOS, EOS and PAD follow. ``encode`` prepends BOS."""

    bos_token_id = BOS_TOKEN_ID
    eos_token_id = EOS_TOKEN_ID
    pad_token_id = PAD_TOKEN_ID
    chat_template: str | None = None

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Text to token ids: BOS then one token per UTF-8 byte."""
        ids = list(text.encode("utf-8"))
        return [BOS_TOKEN_ID, *ids] if add_bos else ids

    def decode(self, token_ids: Sequence[int]) -> str:
        """Token ids to text; special and padding ids are dropped, broken UTF-8 becomes U+FFFD."""
        return bytes(t for t in token_ids if 0 <= t < BYTE_VOCAB).decode("utf-8", errors="replace")

    def encode_chat(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        """The built-in model has no chat template: always ``NoChatTemplateError``."""
        raise NoChatTemplateError("the built-in model's byte tokenizer has no chat template")


class HFTokenizer:
    """A ``transformers`` tokenizer behind the engine's small ``Tokenizer`` protocol."""

    def __init__(self, hf_tokenizer: Any) -> None:
        self.hf_tokenizer = hf_tokenizer
        self.eos_token_id: int | None = hf_tokenizer.eos_token_id
        self.chat_template: str | None = getattr(hf_tokenizer, "chat_template", None)

    def encode(self, text: str) -> list[int]:
        """Text to ids, with the tokenizer's own special tokens (e.g. BOS)."""
        return list(self.hf_tokenizer.encode(text))

    def decode(self, token_ids: Sequence[int]) -> str:
        """Ids to text, special tokens skipped."""
        return self.hf_tokenizer.decode(list(token_ids), skip_special_tokens=True)

    def encode_chat(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        """``[{"role", "content"}, ...]`` rendered with the checkpoint's chat template, ending with the
        assistant's generation prompt, as ids (the template's own special tokens, nothing added)."""
        if not self.chat_template:
            raise NoChatTemplateError("this checkpoint's tokenizer has no chat template")
        encoded = self.hf_tokenizer.apply_chat_template(
            [dict(message) for message in messages],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
        )
        return list(encoded["input_ids"])


def load_tokenizer(path: str) -> HFTokenizer:
    """The tokenizer of a local checkpoint: a GGUF file's metadata or a directory's tokenizer files.

    ``path`` may also be a model id ``resolve_model_path`` knows. Never downloads.
    """
    from transformers import AutoTokenizer

    path = resolve_model_path(path)
    gguf_file = find_gguf_file(path)
    if gguf_file is not None:
        return HFTokenizer(load_gguf_tokenizer(gguf_file))
    return HFTokenizer(AutoTokenizer.from_pretrained(path, local_files_only=True))
