"""BlockPool: reference-counted KV blocks, the prefix cache over them, and LRU eviction.

Every block is in exactly one state:

- **free**: refcount 0, no hash (in ``_free``);
- **referenced**: refcount > 0 (held by running sequences or pinned for a transfer); it may also carry
  a hash, and then new requests with that prefix share it;
- **cached**: refcount 0 with a hash (in ``_evictable``, oldest release first): reusable by a prefix
  hit, or evicted (hash dropped) when an allocation needs it.

Evictions are counted per ``(victim tenant, causing tenant)`` and logged per chain hash in a bounded
``EvictionLog`` (``explain_miss`` reads it), so a later prefix miss can name who took its blocks.

Each non-free block belongs to one tenant (the one that allocated it, or registered its hash). With KV
shares on (``tenant_kv_share`` / ``tenant_kv_shares``: a guaranteed fraction of ``num_blocks`` per
tenant), an allocation that must evict takes, in order: the least recently released cached block of a
tenant holding more than its share (used + cached blocks), else the allocating tenant's own least
recently released cached block, else the pool's least recently released one. So while a tenant holds
no more than its share, its cached blocks go only after every over-share tenant's cached blocks. With
no shares (the default) eviction is plain LRU over all cached blocks.
"""

from __future__ import annotations

from collections import Counter, OrderedDict, deque
from collections.abc import Mapping, Sequence

from engine.block_hash import BlockHash
from engine.eviction_log import EvictionLog, PrefixMiss
from engine.prefix_index import PrefixIndex, PrefixMatch

DEFAULT_EVICTION_LOG_ENTRIES = 65_536  # ~15 MiB of Python heap at ~233 bytes each (engine.eviction_log)


class OutOfBlocksError(RuntimeError):
    """``allocate`` was asked for more blocks than ``can_allocate`` allows."""


class BlockPool:
    """Allocation, sharing and prefix caching of ``num_blocks`` KV blocks of ``block_size`` tokens."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        eviction_log_entries: int = DEFAULT_EVICTION_LOG_ENTRIES,
        tenant_kv_share: float = 0.0,
        tenant_kv_shares: Mapping[str, float] | None = None,
    ) -> None:
        """``tenant_kv_share``: every tenant's guaranteed fraction of the blocks in eviction (0: none);
        ``tenant_kv_shares``: per-tenant fractions that replace it for the tenants they name."""
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be > 0, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.index = PrefixIndex()
        self.eviction_log = EvictionLog(eviction_log_entries)
        self._ref_counts = [0] * num_blocks
        self._hashes: list[BlockHash | None] = [None] * num_blocks
        self._tenants = [""] * num_blocks  # owner of a non-free block: its allocator, or its hash's registrar
        self._free: deque[int] = deque(range(num_blocks))
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced; oldest first
        self._evictable_of: dict[str, OrderedDict[int, None]] = {}  # the same blocks by owner; none empty
        self._released_at = [0] * num_blocks  # release order of a cached block (compares tenants' LRU heads)
        self._num_releases = 0
        self._num_referenced = 0
        self.held_blocks: Counter[str] = Counter()  # tenant -> its used + cached blocks
        self.evictions: Counter[tuple[str, str]] = Counter()  # (victim tenant, causing tenant) -> blocks
        # tenant -> refused allocate() calls, plus the scheduler's preemptions of its running requests
        self.allocation_failures: Counter[str] = Counter()
        self._default_share = int(tenant_kv_share * num_blocks)
        self._shares = {tenant: int(f * num_blocks) for tenant, f in (tenant_kv_shares or {}).items()}
        self.has_kv_shares = self._default_share > 0 or any(self._shares.values())

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

    def share_blocks(self, tenant: str) -> int:
        """Blocks ``tenant`` is guaranteed in eviction (its share of ``num_blocks``, rounded down)."""
        return self._shares.get(tenant, self._default_share)

    def owner_of(self, block_id: int) -> str:
        """The tenant a non-free block belongs to (its allocator, or the registrar of its hash)."""
        return self._tenants[block_id]

    def num_cached_blocks_of(self, tenant: str) -> int:
        """``tenant``'s unreferenced cached blocks."""
        return len(self._evictable_of.get(tenant, ()))

    def explain_miss(self, hashes: Sequence[BlockHash], num_cached_blocks: int) -> PrefixMiss:
        """Read-only: which of a prompt's reusable chain hashes past its hit the eviction log holds."""
        return self.eviction_log.explain(hashes, num_cached_blocks)

    def num_evictable_in(self, block_ids: Sequence[int]) -> int:
        """How many of ``block_ids`` are cached-unreferenced (sharing them uses up allocatable blocks)."""
        return sum(1 for block_id in block_ids if self._ref_counts[block_id] == 0)

    # -- state changes --------------------------------------------------------------------------------
    def allocate(self, num_blocks: int, tenant: str = "") -> list[int]:
        """Take ``num_blocks`` blocks (refcount 1) for ``tenant``: free ones first, then evict (see above)."""
        if not self.can_allocate(num_blocks):
            self.allocation_failures[tenant] += 1
            raise OutOfBlocksError(
                f"asked for {num_blocks} blocks, {self.num_allocatable_blocks} allocatable"
            )
        block_ids = []
        for _ in range(num_blocks):
            if self._free:
                block_id = self._free.popleft()
            else:
                block_id = self._victim(tenant)
                self._take_evictable(block_id)
                self._evict(block_id, tenant)
            self._ref_counts[block_id] = 1
            self._tenants[block_id] = tenant
            self.held_blocks[tenant] += 1
            block_ids.append(block_id)
        self._num_referenced += num_blocks
        return block_ids

    def _victim(self, causing_tenant: str) -> int:
        """The cached block an allocation by ``causing_tenant`` evicts (the module docstring's order)."""
        if not self.has_kv_shares:
            return next(iter(self._evictable))
        best: int | None = None
        for tenant, blocks in self._evictable_of.items():
            if self.held_blocks[tenant] > self.share_blocks(tenant):
                head = next(iter(blocks))
                if best is None or self._released_at[head] < self._released_at[best]:
                    best = head
        if best is not None:
            return best
        own = self._evictable_of.get(causing_tenant)
        return next(iter(own)) if own else next(iter(self._evictable))

    def _take_evictable(self, block_id: int) -> None:
        """Remove a cached block from both LRU orders (it is being shared or evicted)."""
        del self._evictable[block_id]
        tenant = self._tenants[block_id]
        blocks = self._evictable_of[tenant]
        del blocks[block_id]
        if not blocks:
            del self._evictable_of[tenant]

    def share(self, block_ids: Sequence[int]) -> None:
        """Take one more reference on each block (a prefix hit); cached blocks stop being evictable."""
        for block_id in block_ids:
            if self._ref_counts[block_id] == 0:
                if self._hashes[block_id] is None:
                    raise ValueError(f"block {block_id} is free: it cannot be shared")
                self._take_evictable(block_id)
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
                    self.held_blocks[self._tenants[block_id]] -= 1
                else:
                    self._evictable[block_id] = None
                    self._evictable_of.setdefault(self._tenants[block_id], OrderedDict())[block_id] = None
                    self._num_releases += 1
                    self._released_at[block_id] = self._num_releases

    def cache_block(self, block_id: int, block_hash: BlockHash, tenant: str = "") -> bool:
        """Publish a referenced full block under its chain hash; False if the hash is already cached
        elsewhere (then this block stays private and is freed, not cached, on release)."""
        if self._ref_counts[block_id] <= 0:
            raise ValueError(f"block {block_id} must be referenced to be cached")
        if self._hashes[block_id] is not None or not self.index.insert(block_hash, block_id):
            return False
        self._hashes[block_id] = block_hash
        self.eviction_log.forget(block_hash)
        if tenant != self._tenants[block_id]:  # referenced, so in no LRU order: only the counts move
            self.held_blocks[self._tenants[block_id]] -= 1
            self.held_blocks[tenant] += 1
            self._tenants[block_id] = tenant
        return True

    def _evict(self, block_id: int, causing_tenant: str) -> None:
        block_hash = self._hashes[block_id]
        assert block_hash is not None
        self.index.remove(block_hash)
        self._hashes[block_id] = None
        victim = self._tenants[block_id]
        self.held_blocks[victim] -= 1
        self.evictions[(victim, causing_tenant)] += 1
        self.eviction_log.record(block_hash, victim, causing_tenant)

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
        by_owner = Counter(self._tenants[b] for b in range(self.num_blocks) if b not in free)
        assert +self.held_blocks == by_owner, "held blocks per tenant drifted"
        assert all(self._evictable_of.values()), "an empty per-tenant LRU order is kept"
        per_tenant = {b for blocks in self._evictable_of.values() for b in blocks}
        assert per_tenant == evictable, "per-tenant LRU orders and the pool's disagree"
        for tenant, blocks in self._evictable_of.items():
            assert all(self._tenants[b] == tenant for b in blocks), "cached block filed under another tenant"
            order = [self._released_at[b] for b in blocks]
            assert order == sorted(order), "a tenant's LRU order is not by release"
