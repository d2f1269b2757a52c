"""BlockPool: reference-counted KV blocks, the prefix cache over them, and LRU eviction.

Every block is in exactly one state:

- **free**: refcount 0, no hash (in ``_free``);
- **referenced**: refcount > 0 (held by running sequences or pinned for a transfer); it may also carry
  a hash, and then new requests with that prefix share it;
- **cached**: refcount 0 with a hash (in ``_evictable``, oldest release first): reusable by a prefix
  hit, or evicted (hash dropped) when an allocation needs it.

Evictions are counted per ``(victim tenant, causing tenant)``.
"""

from __future__ import annotations

from collections import Counter, OrderedDict, deque
from collections.abc import Sequence

from engine.block_hash import BlockHash
from engine.prefix_index import PrefixIndex, PrefixMatch


class OutOfBlocksError(RuntimeError):
    """``allocate`` was asked for more blocks than ``can_allocate`` allows."""


class BlockPool:
    """Allocation, sharing and prefix caching of ``num_blocks`` KV blocks of ``block_size`` tokens."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be > 0, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.index = PrefixIndex()
        self._ref_counts = [0] * num_blocks
        self._hashes: list[BlockHash | None] = [None] * num_blocks
        self._tenants = [""] * num_blocks  # tenant whose sequence registered the block's hash
        self._free: deque[int] = deque(range(num_blocks))
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced; oldest first
        self._num_referenced = 0
        self.evictions: Counter[tuple[str, str]] = Counter()  # (victim tenant, causing tenant) -> blocks

    # -- queries (no state change) --------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks neither referenced nor cached."""
        return len(self._free)

    @property
    def num_allocatable_blocks(self) -> int:
        """Blocks an allocation can take now: free plus cached-unreferenced (evictable)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        """Blocks with refcount > 0."""
        return self._num_referenced

    @property
    def num_cached_blocks(self) -> int:
        """Unreferenced blocks that still hold a cached prefix."""
        return len(self._evictable)

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def can_allocate(self, num_blocks: int) -> bool:
        """Whether ``allocate(num_blocks)`` would succeed."""
        return num_blocks <= self.num_allocatable_blocks

    def match_prefix(self, hashes: Sequence[BlockHash]) -> PrefixMatch:
        """Read-only longest cached prefix for a hash chain."""
        return self.index.match_prefix(hashes, self.block_size)

    def num_evictable_in(self, block_ids: Sequence[int]) -> int:
        """How many of ``block_ids`` are cached-unreferenced (sharing them uses up allocatable blocks)."""
        return sum(1 for block_id in block_ids if self._ref_counts[block_id] == 0)

    # -- state changes --------------------------------------------------------------------------------
    def allocate(self, num_blocks: int, tenant: str = "") -> list[int]:
        """Take ``num_blocks`` blocks (refcount 1): free ones first, then evict the least recently used."""
        if not self.can_allocate(num_blocks):
            raise OutOfBlocksError(
                f"asked for {num_blocks} blocks, {self.num_allocatable_blocks} allocatable"
            )
        block_ids = []
        for _ in range(num_blocks):
            if self._free:
                block_id = self._free.popleft()
            else:
                block_id, _ = self._evictable.popitem(last=False)
                self._evict(block_id, tenant)
            self._ref_counts[block_id] = 1
            block_ids.append(block_id)
        self._num_referenced += num_blocks
        return block_ids

    def share(self, block_ids: Sequence[int]) -> None:
        """Take one more reference on each block (a prefix hit); cached blocks stop being evictable."""
        for block_id in block_ids:
            if self._ref_counts[block_id] == 0:
                if self._hashes[block_id] is None:
                    raise ValueError(f"block {block_id} is free: it cannot be shared")
                del self._evictable[block_id]
                self._num_referenced += 1
            self._ref_counts[block_id] += 1

    def release(self, block_ids: Sequence[int]) -> None:
        """Drop one reference from each block, in reverse order so a sequence's tail is evicted first."""
        for block_id in reversed(block_ids):
            count = self._ref_counts[block_id]
            if count <= 0:
                raise ValueError(f"block {block_id} released more often than referenced")
            self._ref_counts[block_id] = count - 1
            if count == 1:
                self._num_referenced -= 1
                if self._hashes[block_id] is None:
                    self._free.append(block_id)
                else:
                    self._evictable[block_id] = None

    def cache_block(self, block_id: int, block_hash: BlockHash, tenant: str = "") -> bool:
        """Publish a referenced full block under its chain hash; False if the hash is already cached
        elsewhere (then this block stays private and is freed, not cached, on release)."""
        if self._ref_counts[block_id] <= 0:
            raise ValueError(f"block {block_id} must be referenced to be cached")
        if self._hashes[block_id] is not None or not self.index.insert(block_hash, block_id):
            return False
        self._hashes[block_id] = block_hash
        self._tenants[block_id] = tenant
        return True

    def _evict(self, block_id: int, causing_tenant: str) -> None:
        block_hash = self._hashes[block_id]
        assert block_hash is not None
        self.index.remove(block_hash)
        self._hashes[block_id] = None
        self.evictions[(self._tenants[block_id], causing_tenant)] += 1

    # -- checks ---------------------------------------------------------------------------------------
    def check_invariants(self) -> None:
        """Raise AssertionError if a block is in two states or the counts disagree."""
        free, evictable = set(self._free), set(self._evictable)
        assert len(free) == len(self._free), "a block is twice in the free list"
        assert not free & evictable, "a block is both free and cached"
        referenced = {b for b, count in enumerate(self._ref_counts) if count > 0}
        assert all(count >= 0 for count in self._ref_counts), "negative refcount"
        assert not referenced & (free | evictable), "a referenced block is also free or cached"
        assert len(free) + len(evictable) + len(referenced) == self.num_blocks, "blocks lost"
        assert len(referenced) == self._num_referenced, "referenced count drifted"
        assert all(self._hashes[b] is None for b in free), "a free block still has a hash"
        assert all(self._hashes[b] is not None for b in evictable), "a cached block has no hash"
        for block_id, block_hash in enumerate(self._hashes):
            if block_hash is not None:
                assert self.index.lookup(block_hash) == block_id, f"index and block {block_id} disagree"
        assert len(self.index) == sum(h is not None for h in self._hashes), "index holds stale hashes"
