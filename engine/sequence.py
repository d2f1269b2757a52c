"""Sequence: one request's tokens, progress, blocks and stop state inside the engine."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from engine.block_hash import BlockHash
from engine.detokenizer import StopStringChecker
from engine.eviction_log import PrefixMiss
from engine.sampling import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # in the scheduler's queue (new, or preempted for recompute)
    RUNNING = "running"  # in the batch: prefilling in chunks or decoding
    FINISHED = "finished"  # done; blocks freed, or pinned for a transfer (prefill_only)


@dataclass(eq=False)
class Sequence:
    """A request inside the engine. ``token_ids`` = prompt + output so far.

    ``num_computed_tokens`` tokens have their KV in ``block_ids``; the next step computes from there.
    ``block_hashes[i]`` is the chain hash of full block ``i`` of ``token_ids`` (filled as blocks fill).
    """

    request_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    seed: int
    tenant: str = ""
    prefill_only: bool = False
    stop_checker: StopStringChecker | None = None
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at first admission
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[BlockHash] = field(default_factory=list)
    num_registered_blocks: int = 0  # leading full blocks already published to the prefix cache
    finish_reason: str | None = None
    num_reported_tokens: int = 0  # output tokens already returned in a RequestOutput
    pending_logits: list[torch.Tensor] = field(default_factory=list)
    was_admitted: bool = False
    prefix_miss: PrefixMiss | None = None  # at first admission: what of the reusable prefix was evicted

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
