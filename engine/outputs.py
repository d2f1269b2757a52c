"""What the engine returns: per-step request outputs and engine-wide stats."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine.eviction_log import PrefixMiss

# The finish reason of a ``prefill_only`` request whose first token does not end it: its KV is pinned and
# a decode engine continues it. Not an end of the request: a state of its own, never "length".
PREFILLED = "prefilled"


@dataclass
class RequestOutput:
    """New tokens of one request from one ``step()``.

    ``finished``: this engine is done with the request. ``finish_reason``: "length" (max_tokens), "stop"
    (stop token id or stop string), "eos", "context" (the model's context is full), "abort",
    ``PREFILLED`` (prefill_only, handed on to a decode engine), or None while running. The stop rules
    live only in the engine: a caller reads the reason, never re-derives it.
    """

    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_cached_tokens: int  # prompt tokens whose KV came from the prefix cache
    new_text: str | None = None  # filled when SamplingParams.detokenize or stop strings are set
    logits: list[torch.Tensor] | None = None  # one float32 [vocab] per new token when return_logits
    prefix_miss: PrefixMiss | None = None  # the prompt's cache attribution (None before its admission)

    @property
    def is_prefilled(self) -> bool:
        """A prefill_only request's first token did not end it: its blocks wait pinned for the decode side."""
        return self.finish_reason == PREFILLED


@dataclass(frozen=True)
class EngineStats:
    """A snapshot for load reports and metrics."""

    num_blocks_total: int
    num_blocks_used: int  # referenced: running, pinned or allocated for a pull
    num_blocks_cached: int  # unreferenced, holding a cached prefix (evictable)
    num_blocks_free: int  # neither used nor cached
    num_blocks_allocatable: int  # what an allocation may take now: free + cached (evictable)
    num_running: int
    num_waiting: int
    num_pinned: int  # prefill_only requests whose blocks await release_pinned
    num_queued_prefill_tokens: int
    num_prompt_tokens: int  # totals since start
    num_cached_tokens: int
    num_generated_tokens: int
    num_preemptions: int
    evictions: dict[tuple[str, str], int] = field(default_factory=dict)  # (victim, causing tenant) -> blocks
    num_requests_added: int = 0  # requests taken in since start (queued, or blocks allocated for a pull)

    @property
    def kv_usage(self) -> float:
        """Fraction of blocks referenced."""
        return self.num_blocks_used / self.num_blocks_total
