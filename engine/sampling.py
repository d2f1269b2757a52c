"""SamplingParams: what a request asks of the sampler and the stop checks. Frozen and validated, so a
transport layer can map ``ValueError`` to INVALID_ARGUMENT."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling and stopping.

    Sampling is position-seeded: the token at output position ``i`` is drawn with a generator seeded
    from ``(seed, i)``, so a request prefilled on one worker and decoded on another samples the tokens
    the single-process engine samples. With ``seed=None`` the engine derives the seed from the request
    id (same id, same tokens, wherever it runs).
    """

    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # nucleus: smallest set of tokens whose probability reaches top_p; 1 = off
    top_k: int = 0  # keep the k most likely tokens; 0 = off
    seed: int | None = None
    max_tokens: int = 16  # new tokens, the first one included
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()  # stop strings, matched on detokenized text and cut from the text
    ignore_eos: bool = False
    detokenize: bool = False  # fill RequestOutput.new_text (always done when stop strings are set)
    # Characters of the text another engine already emitted (the prefill side's first token): new_text
    # starts after them; the stop strings are still searched from the first character.
    num_chars_sent: int = 0
    return_logits: bool = False  # attach each step's float32 logits [vocab] to the outputs (tests, debugging)

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.max_tokens <= 0:
            raise ValueError(f"max_tokens must be > 0, got {self.max_tokens}")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise ValueError(f"seed must be in [0, 2**64), got {self.seed}")
        if self.num_chars_sent < 0:
            raise ValueError(f"num_chars_sent must be >= 0, got {self.num_chars_sent}")
        if any(not s for s in self.stop):
            raise ValueError("stop must not contain empty strings")
        # Lists are accepted for convenience and frozen into tuples.
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        object.__setattr__(self, "stop", tuple(self.stop))

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0
