"""Incremental detokenization and stop-string detection for one request.

Offset scheme (as vLLM's and Hugging Face's ``TextStreamer``): each step decodes only a short window of
recent tokens, never the whole output again, so a request's detokenization costs O(output length)::

    tokens:  [ settled ............ | context | unsettled ]
                                    ^ prefix_offset     ^ read_offset

The text of the unsettled tokens is ``decode(context + unsettled)`` minus ``decode(context)``: decoding
with a few tokens of context keeps what depends on neighbours right (SentencePiece's leading space, a
character split over byte tokens). Tokens settle once that text is non-empty and does not end in U+FFFD
(the tail of an incomplete UTF-8 character); their text then never changes. A run of tokens that keeps
ending in U+FFFD (invalid bytes) settles anyway after ``_MAX_UNSETTLED_TOKENS``, all but the last four
(a UTF-8 character spans at most four tokens).

A request split over two engines detokenizes on both, each its own tokens once: the prefill engine the
first token, the decode engine the same first token (so a stop string that spans it and later tokens is
found) and the rest. The text an engine emits is a function of the tokens alone, so the decode side's
checker drops the ``num_chars_sent`` characters the prefill side already emitted.
"""

from __future__ import annotations

from engine.tokenizer import Tokenizer

_MAX_UNSETTLED_TOKENS = 8
_KEEP_UNSETTLED_TOKENS = 4  # bytes of one UTF-8 character, at most


class StopStringChecker:
    """Decodes a request's output as it grows and finds its stop strings.

    Text that could still be the beginning of a stop string (the last ``max_stop_len - 1`` chars) and a
    trailing incomplete UTF-8 character are held back until the next token decides them.
    """

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...], num_chars_sent: int = 0) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.hold_back = max((len(s) for s in stop), default=1) - 1
        self.is_stopped = False
        self._token_ids: list[int] = []  # the output so far
        self._prefix_offset = 0  # tokens [prefix_offset, read_offset): context, decoded again each step
        self._read_offset = 0  # tokens before it are settled: their text is final
        self._unsent = ""  # settled text not taken yet (cut before the stop string once found)
        self._unsettled = ""  # text of the tokens from read_offset on; may end in U+FFFD
        self._num_chars_to_skip = num_chars_sent  # the first chars of the text, emitted elsewhere

    def update(self, output_token_ids: list[int]) -> bool:
        """Decode the tokens added since the last call; True when a stop string appeared (the text is cut
        before the earliest one). ``output_token_ids`` is the whole output: it only ever grows."""
        if self.is_stopped or len(output_token_ids) == len(self._token_ids):
            return self.is_stopped
        self._token_ids.extend(output_token_ids[len(self._token_ids) :])
        # a stop string not found before ends in the new text: it starts at most hold_back chars earlier
        search_from = max(0, len(self._unsent) - self.hold_back)
        self._decode_new_tokens()
        text = self._unsent + self._unsettled
        found = [i for i in (text.find(stop, search_from) for stop in self.stop) if i != -1]
        if found:
            self._unsent, self._unsettled = text[: min(found)], ""  # the earliest stop string wins
            self.is_stopped = True
        return self.is_stopped

    def take_new_text(self, is_finished: bool) -> str:
        """Text not taken yet that is safe to emit (all of it once the request is finished)."""
        if is_finished:  # nothing follows: an incomplete character stays U+FFFD
            self._unsent, self._unsettled = self._unsent + self._unsettled, ""
            end = len(self._unsent)
        else:
            end = max(0, len(self._unsent) - self.hold_back)
        new_text, self._unsent = self._unsent[:end], self._unsent[end:]
        if self._num_chars_to_skip:
            num_skipped = min(len(new_text), self._num_chars_to_skip)
            self._num_chars_to_skip -= num_skipped
            new_text = new_text[num_skipped:]
        return new_text

    def _decode_new_tokens(self) -> None:
        num_tokens = len(self._token_ids)
        text = self._text_of_tokens_until(num_tokens)
        if text and not text.endswith("\ufffd"):
            self._settle(num_tokens, text)
            text = ""
        elif num_tokens - self._read_offset > _MAX_UNSETTLED_TOKENS:
            end = num_tokens - _KEEP_UNSETTLED_TOKENS
            self._settle(end, self._text_of_tokens_until(end))
            text = self._text_of_tokens_until(num_tokens)
        self._unsettled = text

    def _text_of_tokens_until(self, end: int) -> str:
        """The text of tokens [read_offset, end), decoded after the context tokens."""
        context = self._token_ids[self._prefix_offset : self._read_offset]
        context_text = self.tokenizer.decode(context)
        return self.tokenizer.decode(self._token_ids[self._prefix_offset : end])[len(context_text) :]

    def _settle(self, end: int, text: str) -> None:
        """Tokens up to ``end`` are final: append their text; they become the next context."""
        self._unsent += text
        self._prefix_offset, self._read_offset = self._read_offset, end
