"""What the engine returns: per-step request outputs and engine-wide stats."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class RequestOutput:
    """New tokens of one request from one ``step()``.

    ``finish_reason``: "length" (max_tokens), "stop" (stop token id or stop string), "eos",
    "context" (the model's context is full), "abort", or None while running.
    """

    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_cached_tokens: int  # prompt tokens whose KV came from the prefix cache
    new_text: str | None = None  # filled when SamplingParams.detokenize or stop strings are set
    logits: list[torch.Tensor] | None = None  # one float32 [vocab] per new token when return_logits


@dataclass(frozen=True)
class EngineStats:
    """A snapshot for load reports and metrics."""

    num_blocks_total: int
    num_blocks_used: int  # referenced: running, pinned or allocated for a pull
    num_blocks_cached: int  # unreferenced, holding a cached prefix (evictable)
    num_blocks_free: int  # allocatable now: free + cached
    num_running: int
    num_waiting: int
    num_pinned: int  # prefill_only requests whose blocks await release_pinned
    num_queued_prefill_tokens: int
    num_prompt_tokens: int  # totals since start
    num_cached_tokens: int
    num_generated_tokens: int
    num_preemptions: int
    evictions: dict[tuple[str, str], int] = field(default_factory=dict)  # (victim, causing tenant) -> blocks

    @property
    def kv_usage(self) -> float:
        """Fraction of blocks referenced."""
        return self.num_blocks_used / self.num_blocks_total
