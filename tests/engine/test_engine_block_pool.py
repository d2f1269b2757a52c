"""Acceptance 3: the block pool under thousands of random allocate / share / free / cache / evict steps."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.block_hash import BlockHash, block_hashes
from engine.block_pool import BlockPool, OutOfBlocksError

NUM_BLOCKS = 12
TENANTS = ["", "a", "b"]

operation = st.one_of(
    st.tuples(st.just("allocate"), st.integers(1, 5), st.sampled_from(TENANTS)),
    st.tuples(st.just("release"), st.integers(0, 10_000), st.just("")),
    st.tuples(st.just("cache"), st.integers(0, 10_000), st.integers(0, 6)),
    st.tuples(st.just("share"), st.integers(0, 6), st.sampled_from(TENANTS)),
)


class PoolModel:
    """An independent model of the pool: who holds which references, which hash each block carries."""

    def __init__(self, pool: BlockPool) -> None:
        self.pool = pool
        self.held: list[int] = []  # one entry per reference taken
        self.hash_of: dict[int, BlockHash] = {}  # block -> hash while the block is cached or referenced

    def apply(self, op: tuple) -> None:
        kind, arg, extra = op
        pool = self.pool
        if kind == "allocate":
            can = pool.can_allocate(arg)
            free_before = pool.num_allocatable_blocks
            if not can:
                with pytest.raises(OutOfBlocksError):
                    pool.allocate(arg, extra)
                assert pool.num_allocatable_blocks == free_before  # a refused allocation changes nothing
                return
            blocks = pool.allocate(arg, extra)
            assert len(set(blocks)) == arg
            for block in blocks:
                assert block not in self.held, "allocated a block that is still referenced"
                self.hash_of.pop(block, None)  # evicted or free: its hash is gone
            self.held += blocks
        elif kind == "release" and self.held:
            block = self.held.pop(arg % len(self.held))
            pool.release([block])
        elif kind == "cache" and self.held:
            block = self.held[arg % len(self.held)]
            block_hash = _hash(extra)
            published = pool.cache_block(block, block_hash)
            if published:
                assert block not in self.hash_of and block_hash not in self.hash_of.values()
                self.hash_of[block] = block_hash
        elif kind == "share":
            match = pool.match_prefix([_hash(arg)])
            for block in match.block_ids:
                assert self.hash_of.get(block) == _hash(arg)
            pool.share(match.block_ids)
            self.held += list(match.block_ids)

    def check(self) -> None:
        pool = self.pool
        pool.check_invariants()
        for block in range(pool.num_blocks):
            assert pool.ref_count(block) == self.held.count(block) >= 0
        used = len(set(self.held))
        assert pool.num_used_blocks == used
        assert pool.num_allocatable_blocks + used == pool.num_blocks  # free + cached + used = total
        cached_unreferenced = {b for b in self.hash_of if b not in self.held}
        assert pool.num_cached_blocks == len(cached_unreferenced)


def _hash(index: int) -> BlockHash:
    return block_hashes([index] * 4, 4)[0]


@settings(max_examples=250, deadline=None)
@given(st.lists(operation, min_size=1, max_size=60))
def test_random_operations_keep_invariants(ops: list[tuple]) -> None:
    pool = BlockPool(NUM_BLOCKS, block_size=4)
    model = PoolModel(pool)
    for op in ops:
        model.apply(op)
        model.check()
    pool.release(model.held)  # leak check: everything returned leaves nothing referenced
    model.held.clear()
    model.check()
    assert pool.num_used_blocks == 0 and pool.num_allocatable_blocks == NUM_BLOCKS


def test_lru_eviction_order_and_counters() -> None:
    pool = BlockPool(4, block_size=4)
    blocks = pool.allocate(4, "a")
    for index, block in enumerate(blocks):
        assert pool.cache_block(block, _hash(index), "a")
    pool.release(blocks[:2])  # released in reverse: blocks[1] is older than blocks[0] in the LRU
    pool.release(blocks[2:])
    assert pool.num_cached_blocks == 4 and pool.num_allocatable_blocks == 4
    taken = pool.allocate(1, "b")
    assert taken == [blocks[1]], "least recently released is evicted first"
    assert pool.match_prefix([_hash(1)]).num_cached_tokens == 0
    assert pool.match_prefix([_hash(0)]).block_ids == (blocks[0],)
    assert pool.evictions == {("a", "b"): 1}
    pool.release(taken)
    pool.check_invariants()
    assert pool.num_used_blocks == 0


def test_release_more_than_referenced_is_refused() -> None:
    pool = BlockPool(2, block_size=4)
    block = pool.allocate(1)[0]
    pool.release([block])
    with pytest.raises(ValueError, match="released more often"):
        pool.release([block])
    pool.check_invariants()
    assert pool.num_used_blocks == 0


def test_duplicate_hash_stays_private() -> None:
    pool = BlockPool(3, block_size=4)
    first, second = pool.allocate(2)
    assert pool.cache_block(first, _hash(1))
    assert not pool.cache_block(second, _hash(1))
    pool.release([first, second])
    assert pool.num_cached_blocks == 1  # the duplicate went back to free, not to the cache
    pool.check_invariants()
    assert pool.num_used_blocks == 0
