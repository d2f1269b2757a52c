"""Scheduler for one worker: continuous batching, chunked prefill under a per-step token budget,
admission by free blocks, preemption by recompute when blocks run out.

A request's path: ``waiting`` -> (admitted: prefix hit shared, blocks for its first chunk allocated)
``running`` (prefill in chunks, then one token per step) -> finished (blocks released, or kept pinned
for a KV transfer when ``prefill_only``). Preemption sends the most recently admitted running request
back to the front of ``waiting`` with its blocks released; it later recomputes (its own blocks often
still sit in the prefix cache).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from engine.block_hash import hash_block, root_hash
from engine.block_pool import BlockPool
from engine.config import SchedulerConfig
from engine.eviction_log import PrefixMiss
from engine.prefix_index import PrefixMatch
from engine.scheduling_rules import admits, blocks_for, chunk_tokens, max_prefix_blocks, may_admit
from engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledSequence:
    """``num_tokens`` tokens of ``seq`` from ``seq.num_computed_tokens`` on run this step."""

    seq: Sequence
    num_tokens: int

    @property
    def completes_sequence(self) -> bool:
        """The chunk reaches the last known token: the step samples a new token for this sequence."""
        return self.seq.num_computed_tokens + self.num_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(item.num_tokens for item in self.scheduled)


class Scheduler:
    """Decides which tokens run each step and owns the sequences' blocks."""

    def __init__(self, config: SchedulerConfig, pool: BlockPool, enable_prefix_caching: bool = True) -> None:
        self.config = config
        self.pool = pool
        self.block_size = pool.block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    # -- queries ------------------------------------------------------------------------------------
    @property
    def num_queued_prefill_tokens(self) -> int:
        """Tokens still to compute before every waiting or running sequence reaches decode."""
        return sum(
            s.num_tokens - s.num_computed_tokens
            for s in (*self.waiting, *self.running)
            if s.num_tokens - s.num_computed_tokens > 1
        )

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks that hold ``num_tokens`` tokens."""
        return blocks_for(num_tokens, self.block_size)

    # -- admission ----------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        """Queue a new request."""
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """Join a sequence whose KV is already in ``seq.block_ids`` (computed elsewhere) to the batch."""
        seq.status = SequenceStatus.RUNNING
        seq.was_admitted = True
        self.extend_hashes(seq)
        self.publish_full_blocks(seq)
        self.running.append(seq)

    # -- the step -----------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        """Running sequences first (decodes and unfinished chunks), then new ones while budget lasts."""
        output = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        index = 0
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            num_tokens = chunk_tokens(seq.num_tokens - seq.num_computed_tokens, budget)
            num_new_blocks = self.blocks_for(seq.num_computed_tokens + num_tokens) - len(seq.block_ids)
            while not self.pool.can_allocate(num_new_blocks):
                victim = self.running.pop()  # the most recently admitted gives way
                self._preempt(victim)
                output.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                break
            seq.block_ids += self.pool.allocate(num_new_blocks, seq.tenant)
            output.scheduled.append(ScheduledSequence(seq, num_tokens))
            budget -= num_tokens
            index += 1
        if not output.preempted:
            self._admit_waiting(output, budget)
        return output

    def _admit_waiting(self, output: SchedulerOutput, budget: int) -> None:
        while may_admit(len(self.waiting), budget, len(self.running), self.config.max_num_seqs):
            seq = self.waiting[0]
            match = self._match_prefix(seq)
            num_tokens = chunk_tokens(seq.num_tokens - match.num_cached_tokens, budget)
            num_new_blocks = self.blocks_for(match.num_cached_tokens + num_tokens) - len(match.block_ids)
            num_allocatable = self.pool.num_allocatable_blocks
            if not admits(self.pool.num_evictable_in(match.block_ids), num_new_blocks, num_allocatable):
                break  # admission by free blocks: wait for running sequences to finish
            self.pool.share(match.block_ids)
            seq.block_ids = [*match.block_ids, *self.pool.allocate(num_new_blocks, seq.tenant)]
            seq.num_computed_tokens = match.num_cached_tokens
            seq.num_registered_blocks = len(match.block_ids)
            if not seq.was_admitted:
                seq.num_cached_tokens = match.num_cached_tokens
                seq.prefix_miss = self._explain_miss(seq, match)
                seq.was_admitted = True
            seq.status = SequenceStatus.RUNNING
            self.waiting.popleft()
            self.running.append(seq)
            output.scheduled.append(ScheduledSequence(seq, num_tokens))
            budget -= num_tokens

    def _match_prefix(self, seq: Sequence) -> PrefixMatch:
        """Read-only: cached leading blocks, leaving at least one token to compute (for its logits)."""
        if not self.enable_prefix_caching:
            return PrefixMatch(0, ())
        self.extend_hashes(seq)
        max_blocks = max_prefix_blocks(seq.num_tokens, self.block_size)
        return self.pool.match_prefix(seq.block_hashes[:max_blocks])

    def _explain_miss(self, seq: Sequence, match: PrefixMatch) -> PrefixMiss:
        """Read-only: which of the prompt's reusable blocks past the hit were evicted (cache attribution)."""
        max_blocks = (seq.num_tokens - 1) // self.block_size
        if not self.enable_prefix_caching:
            return PrefixMiss(max_blocks, 0)
        return self.pool.explain_miss(seq.block_hashes[:max_blocks], len(match.block_ids))

    def _preempt(self, seq: Sequence) -> None:
        self.pool.release(seq.block_ids)
        seq.block_ids = []
        seq.num_computed_tokens = 0
        seq.num_registered_blocks = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
        self.pool.allocation_failures[seq.tenant] += 1  # room it needed went to others (the KV review)

    # -- after the model ran ------------------------------------------------------------------------
    def commit(self, output: SchedulerOutput) -> None:
        """Advance each scheduled sequence past its chunk and publish blocks that became full."""
        for item in output.scheduled:
            item.seq.num_computed_tokens += item.num_tokens
            if self.enable_prefix_caching:
                self.publish_full_blocks(item.seq)

    def extend_hashes(self, seq: Sequence) -> None:
        """Chain hashes for every full block of ``seq.token_ids`` (tenant-salted)."""
        size = self.block_size
        parent = seq.block_hashes[-1] if seq.block_hashes else root_hash(seq.tenant)
        for block_index in range(len(seq.block_hashes), seq.num_tokens // size):
            parent = hash_block(parent, seq.token_ids[block_index * size : (block_index + 1) * size])
            seq.block_hashes.append(parent)

    def publish_full_blocks(self, seq: Sequence) -> None:
        """Put blocks whose tokens all have KV into the prefix cache."""
        num_full = seq.num_computed_tokens // self.block_size
        if num_full <= seq.num_registered_blocks:
            return
        self.extend_hashes(seq)
        for block_index in range(seq.num_registered_blocks, num_full):
            self.pool.cache_block(seq.block_ids[block_index], seq.block_hashes[block_index], seq.tenant)
        seq.num_registered_blocks = num_full

    def finish(self, seq: Sequence, reason: str) -> None:
        """Take ``seq`` out of the batch; release its blocks unless it keeps them pinned (prefill_only)."""
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if not seq.prefill_only:
            self.pool.release(seq.block_ids)
            seq.block_ids = []
