"""Incremental detokenization: the same text and stop step as decoding the whole output at every step,
for a bounded amount of decoding per step (counted, not timed)."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.builtin import BOS_TOKEN_ID, EOS_TOKEN_ID
from engine.detokenizer import StopStringChecker
from engine.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer

TEXTS = [
    "héllo wörld, naïve café — 日本語のテキスト 🙂🙃 emoji",
    "the quick brown fox jumps over the lazy dog",
    "a\nb\n\nc 🙂 d  e\t日本",
]


class CountingTokenizer:
    """Wraps a tokenizer and counts the token ids it is asked to decode."""

    def __init__(self, inner: Tokenizer) -> None:
        self.inner = inner
        self.eos_token_id = inner.eos_token_id
        self.num_decoded = 0

    def encode(self, text: str) -> list[int]:
        return self.inner.encode(text)

    def decode(self, token_ids: Sequence[int]) -> str:
        self.num_decoded += len(token_ids)
        return self.inner.decode(token_ids)


def reference(tokenizer: Tokenizer, tokens: list[int], stop: tuple[str, ...]) -> tuple[int | None, str]:
    """The definition: the first step whose whole decoded output holds a stop string, and the text cut
    before the earliest one (or the whole text and None)."""
    for end in range(1, len(tokens) + 1):
        text = tokenizer.decode(tokens[:end])
        found = [i for i in (text.find(s) for s in stop) if i != -1]
        if found:
            return end, text[: min(found)]
    return None, tokenizer.decode(tokens)


def stream(tokenizer: Tokenizer, tokens: list[int], stop: tuple[str, ...]) -> tuple[int | None, str]:
    """Feed one token per step as the engine does; the stop step and the text taken, chunk by chunk."""
    checker = StopStringChecker(tokenizer, stop)
    chunks = []
    for end in range(1, len(tokens) + 1):
        is_stopped = checker.update(tokens[:end])
        is_finished = is_stopped or end == len(tokens)
        chunks.append(checker.take_new_text(is_finished))
        if not is_finished:
            assert not any(s in "".join(chunks) for s in stop), "emitted text that may be a stop string"
        if is_stopped:
            return end, "".join(chunks)
    return None, "".join(chunks)


# -- the byte tokenizer: every token is one byte, so characters split across tokens all the time ------
byte_tokens = st.lists(
    st.one_of(
        st.text(max_size=4).map(lambda text: list(text.encode())),  # valid UTF-8
        st.lists(st.integers(0, 255), max_size=3),  # anything, invalid bytes included
        st.sampled_from([[EOS_TOKEN_ID], [BOS_TOKEN_ID]]),  # decoded to nothing
    ),
    max_size=30,
).map(lambda parts: [token for part in parts for token in part])


@settings(max_examples=300, deadline=None)
@given(tokens=byte_tokens, data=st.data())
def test_byte_tokenizer_matches_the_whole_output_decode(tokens: list[int], data: st.DataObject) -> None:
    tokenizer = ByteTokenizer()
    text = tokenizer.decode(tokens)
    substrings = st.integers(0, max(0, len(text) - 1)).flatmap(
        lambda start: st.integers(start + 1, start + 4).map(lambda end: text[start:end])
    )
    stops = tuple(data.draw(st.lists(substrings | st.text(min_size=1, max_size=3), max_size=3)))
    stops = tuple(stop for stop in stops if stop)
    assert stream(tokenizer, tokens, stops) == reference(tokenizer, tokens, stops)


def split_stream(tokenizer: Tokenizer, tokens: list[int], stop: tuple[str, ...]) -> tuple[int | None, str]:
    """A request split over two engines: prefill decodes the first token and sends what it may; decode
    decodes every token again and drops the ``num_chars_sent`` chars prefill sent."""
    prefill = StopStringChecker(tokenizer, stop)
    if prefill.update(tokens[:1]) or len(tokens) == 1:
        return (1 if prefill.is_stopped else None), prefill.take_new_text(True)
    first_text = prefill.take_new_text(False)
    decode = StopStringChecker(tokenizer, stop, num_chars_sent=len(first_text))
    chunks = [first_text]
    for end in range(1, len(tokens) + 1):
        is_stopped = decode.update(tokens[:end])
        is_finished = is_stopped or end == len(tokens)
        chunks.append(decode.take_new_text(is_finished))
        if is_stopped:
            return end, "".join(chunks)
    return None, "".join(chunks)


@settings(max_examples=200, deadline=None)
@given(tokens=byte_tokens.filter(bool), data=st.data())
def test_a_split_request_sends_the_text_of_one_engine(tokens: list[int], data: st.DataObject) -> None:
    tokenizer = ByteTokenizer()
    text = tokenizer.decode(tokens)
    starts = st.integers(0, max(0, len(text) - 1))
    substrings = starts.flatmap(lambda start: st.integers(start + 1, start + 4).map(lambda e: text[start:e]))
    stops = tuple(
        s for s in data.draw(st.lists(substrings | st.text(min_size=1, max_size=3), max_size=3)) if s
    )
    assert split_stream(tokenizer, tokens, stops) == reference(tokenizer, tokens, stops)


def test_incomplete_character_is_held_back_until_decided() -> None:
    checker = StopStringChecker(ByteTokenizer(), ())
    euro = list("€".encode())  # three bytes
    assert not checker.update(euro[:1]) and checker.take_new_text(False) == ""
    assert not checker.update(euro[:2]) and checker.take_new_text(False) == ""
    assert not checker.update(euro) and checker.take_new_text(False) == "€"
    checker.update([*euro, 0xE2])  # the request ends mid-character: U+FFFD, as decode() says
    assert checker.take_new_text(True) == "\ufffd"


# -- Hugging Face tokenizers: byte-level BPE (GPT-2 / SmolLM2) and SentencePiece-style (Llama) -------
@functools.cache
def hf_tokenizers() -> dict[str, HFTokenizer]:
    """Two small tokenizers trained here, in memory (nothing downloaded)."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    byte_level = RustTokenizer(models.BPE())
    byte_level.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    byte_level.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_level.train_from_iterator(
        TEXTS * 5, trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"], initial_alphabet=alphabet)
    )
    # SentencePiece-like: characters of TEXTS[1] and "▁" (a space), every other character as byte pieces
    pieces = ["<eos>", *(f"<0x{i:02X}>" for i in range(256)), *sorted(set(TEXTS[1].replace(" ", "▁")))]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    metaspace = RustTokenizer(models.BPE(vocab, [], byte_fallback=True))
    metaspace.pre_tokenizer = pre_tokenizers.Metaspace()
    metaspace.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return {
        name: HFTokenizer(PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>"))
        for name, tok in (("byte_level", byte_level), ("metaspace", metaspace))
    }


@pytest.mark.parametrize("name", ["byte_level", "metaspace"])
@pytest.mark.parametrize("text", TEXTS)
def test_hf_tokenizers_match_the_whole_output_decode(name: str, text: str) -> None:
    tokenizer = hf_tokenizers()[name]
    tokens = [*tokenizer.encode(text), tokenizer.eos_token_id or 0]
    full = tokenizer.decode(tokens)
    assert stream(tokenizer, tokens, ()) == (None, full)
    for start in range(0, len(full) - 2, 3):  # stop strings starting everywhere, 1 to 3 chars long
        stop = (full[start : start + 1 + start % 3],)
        assert stream(tokenizer, tokens, stop) == reference(tokenizer, tokens, stop), stop


@pytest.mark.parametrize("name", ["byte_level", "metaspace"])
def test_a_split_hf_request_sends_the_text_of_one_engine(name: str) -> None:
    """Tokens of several characters: prefill sends part of the first token's text, decode the rest."""
    tokenizer = hf_tokenizers()[name]
    tokens = tokenizer.encode(TEXTS[1])
    full = tokenizer.decode(tokens)
    for stop in [(), (full[:2],), (full[1:6],), ("<never seen>", full[4:7]), (full[-3:],)]:
        assert split_stream(tokenizer, tokens, stop) == reference(tokenizer, tokens, stop), stop


# -- acceptance: the work per step is bounded ---------------------------------------------------------
MAX_DECODED_PER_STEP = 32  # token ids decoded per step, whatever the output length


@pytest.mark.parametrize("stop", [(), ("<never seen>", "\x00")])
def test_decoding_work_per_step_is_bounded(stop: tuple[str, ...]) -> None:
    """4,096 tokens (ASCII, split multi-byte characters, invalid bytes, special ids): the token ids the
    detokenizer decodes per step stay under a constant, so a request costs O(output length)."""
    pattern = [*b"ab ", *"€🙂".encode(), 0xFF, 0x80, EOS_TOKEN_ID, *"日".encode()[:2]]
    tokens = (pattern * (4096 // len(pattern) + 1))[:4096]
    tokenizer = CountingTokenizer(ByteTokenizer())
    checker = StopStringChecker(tokenizer, stop)
    per_step, chunks = [], []
    for end in range(1, len(tokens) + 1):
        before = tokenizer.num_decoded
        assert not checker.update(tokens[:end])
        chunks.append(checker.take_new_text(end == len(tokens)))
        per_step.append(tokenizer.num_decoded - before)
    assert max(per_step) <= MAX_DECODED_PER_STEP, f"max {max(per_step)} ids decoded in one step"
    assert "".join(chunks) == ByteTokenizer().decode(tokens)
