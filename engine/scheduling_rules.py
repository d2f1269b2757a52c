"""The scheduler's rules as pure functions (torch-free): the token budget, chunking and admission.

``engine.scheduler.Scheduler`` applies them to its sequences and block pool; the capacity simulator
(``capacity.sim``) applies the same functions to its simulated workers, so both follow one set of rules.
"""

from __future__ import annotations


def blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks that hold ``num_tokens`` tokens."""
    return -(-num_tokens // block_size)


def chunk_tokens(num_remaining_tokens: int, budget: int) -> int:
    """Tokens of a sequence that run this step: what is left of it, cut to the step's token budget."""
    return min(num_remaining_tokens, budget)


def may_admit(num_waiting: int, budget: int, num_running: int, max_num_seqs: int) -> bool:
    """Whether the step may look at the next waiting sequence (budget left, a batch slot free)."""
    return num_waiting > 0 and budget > 0 and num_running < max_num_seqs


def admits(num_evictable_in_match: int, num_new_blocks: int, num_allocatable_blocks: int) -> bool:
    """Admission by free blocks: the new blocks plus the cached blocks it takes out of the evictable
    set must fit what can be allocated; otherwise the request waits for running ones to finish."""
    return num_evictable_in_match + num_new_blocks <= num_allocatable_blocks


def max_prefix_blocks(num_tokens: int, block_size: int) -> int:
    """Leading full blocks a prefix-cache hit may cover: at least one token is left to compute."""
    return (num_tokens - 1) // block_size
