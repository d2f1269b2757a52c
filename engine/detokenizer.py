"""Incremental detokenization and stop-string detection for one request."""

from __future__ import annotations

from engine.tokenizer import Tokenizer


class StopStringChecker:
    """Decodes a request's output as it grows and finds its stop strings.

    Text that could still be the beginning of a stop string (the last ``max_stop_len - 1`` chars) and a
    trailing incomplete UTF-8 character are held back until the next token decides them.
    """

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.hold_back = max((len(s) for s in stop), default=1) - 1
        self.text = ""  # the whole output text so far (stop string excluded once found)
        self.num_emitted_chars = 0
        self.is_stopped = False

    def update(self, output_token_ids: list[int]) -> bool:
        """Re-decode the output; True when a stop string appeared (text is cut before it)."""
        previous_len = len(self.text)
        self.text = self.tokenizer.decode(output_token_ids)
        search_from = max(0, previous_len - self.hold_back - 1)
        found = [i for i in (self.text.find(stop, search_from) for stop in self.stop) if i != -1]
        if found:
            self.text = self.text[: min(found)]  # the earliest stop string wins
            self.is_stopped = True
        return self.is_stopped

    def take_new_text(self, is_finished: bool) -> str:
        """Text not emitted yet that is safe to emit."""
        end = len(self.text)
        if not is_finished:
            end = max(self.num_emitted_chars, end - self.hold_back)
            while end > self.num_emitted_chars and self.text[end - 1] == "\ufffd":
                end -= 1
        new_text = self.text[self.num_emitted_chars : end]
        self.num_emitted_chars = end
        return new_text
