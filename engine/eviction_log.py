"""EvictionLog: a bounded record of evicted chain hashes, so a later prefix miss can say who took its blocks.

``BlockPool`` writes one entry per evicted cached block (chain hash -> when, victim tenant, causing
tenant) and drops it again when that hash is cached anew; past ``max_entries`` the oldest entry goes.
``explain`` answers, for the chain hashes a prompt could have reused, which of them past the cache hit
are in the log (a ``PrefixMiss``). Hashes are tenant-salted (``engine.block_hash``), so an entry for a
prompt's hash was always left by an earlier request of the same tenant.

Memory: one entry costs about ``BYTES_PER_ENTRY`` bytes of Python heap (measured with tracemalloc by
``measure_bytes_per_entry``, docs/observability.md "Cache attribution"): the dict slot, the 16-byte
hash object it keeps alive and a small record; the tenant strings are shared with the pool's.
"""

from __future__ import annotations

import sys
import time
import tracemalloc
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from engine.block_hash import BlockHash

BYTES_PER_ENTRY = 240  # upper bound of measure_bytes_per_entry() on CPython 3.11 (it measures ~233)


class EvictionRecord(NamedTuple):
    """One evicted cached block: when (``time.time()``), whose prefix it held, whose allocation took it."""

    evicted_at: float
    victim_tenant: str
    causing_tenant: str


@dataclass(frozen=True)
class PrefixMiss:
    """Why a prompt's reusable blocks were not all cached, from the eviction log (a named result).

    ``is_evicted``: the first block past the hit is in the log (the miss starts at an eviction);
    ``num_evicted_blocks``: the prompt's blocks past the hit found in the log; ``evicted_by``: (causing
    tenant, blocks), most blocks first; ``first_evicted_at`` / ``last_evicted_at``: wall clock, 0 if none.
    """

    num_cacheable_blocks: int = 0
    num_cached_blocks: int = 0
    is_evicted: bool = False
    num_evicted_blocks: int = 0
    evicted_by: tuple[tuple[str, int], ...] = ()
    first_evicted_at: float = 0.0
    last_evicted_at: float = 0.0


class EvictionLog:
    """Chain hash -> ``EvictionRecord`` for the ``max_entries`` most recent evictions (0: keep none)."""

    def __init__(self, max_entries: int, clock: Callable[[], float] = time.time) -> None:
        if max_entries < 0:
            raise ValueError(f"max_entries must be >= 0, got {max_entries}")
        self.max_entries = max_entries
        self._clock = clock
        self._records: OrderedDict[BlockHash, EvictionRecord] = OrderedDict()  # oldest first
        self.num_dropped = 0  # entries pushed out by the cap

    def __len__(self) -> int:
        return len(self._records)

    def get(self, block_hash: BlockHash) -> EvictionRecord | None:
        """The record of ``block_hash``'s eviction, if it is still logged (read-only)."""
        return self._records.get(block_hash)

    def record(self, block_hash: BlockHash, victim_tenant: str, causing_tenant: str) -> None:
        """Log one eviction; the oldest entry goes when the log is full."""
        if self.max_entries == 0:
            return
        self._records[block_hash] = EvictionRecord(self._clock(), victim_tenant, causing_tenant)
        self._records.move_to_end(block_hash)
        if len(self._records) > self.max_entries:
            self._records.popitem(last=False)
            self.num_dropped += 1

    def forget(self, block_hash: BlockHash) -> None:
        """The hash is cached again: its old eviction no longer explains a miss."""
        self._records.pop(block_hash, None)

    def explain(self, hashes: Sequence[BlockHash], num_cached_blocks: int) -> PrefixMiss:
        """Read-only: which of ``hashes[num_cached_blocks:]`` (past the hit) were evicted, and by whom."""
        records = [r for r in map(self._records.get, hashes[num_cached_blocks:]) if r is not None]
        if not records:
            return PrefixMiss(len(hashes), num_cached_blocks)
        by_tenant = Counter(record.causing_tenant for record in records)
        times = [record.evicted_at for record in records]
        return PrefixMiss(
            num_cacheable_blocks=len(hashes),
            num_cached_blocks=num_cached_blocks,
            is_evicted=hashes[num_cached_blocks] in self._records,
            num_evicted_blocks=len(records),
            evicted_by=tuple(sorted(by_tenant.items(), key=lambda item: (-item[1], item[0]))),
            first_evicted_at=min(times),
            last_evicted_at=max(times),
        )


def measure_bytes_per_entry(num_entries: int = 65_536) -> float:
    """Python heap bytes one full log's entry costs (tracemalloc), hashes created as the pool creates them."""
    import hashlib

    hashes = [BlockHash(hashlib.blake2b(i.to_bytes(8, "little"), digest_size=16).digest())
              for i in range(num_entries)]
    tenants = ("tenant-a", "tenant-b")
    log = EvictionLog(num_entries)
    # tracemalloc sees every thread: leave out what a process's other threads allocate meanwhile (the
    # test session runs Ray's and gRPC's: site-packages, threading, asyncio, logging, sockets)
    others = ("*/site-packages/*", "*/threading.py", "*/asyncio/*", "*/concurrent/*", "*/logging/*",
              "*/selectors.py", "*/socket.py", "*/queue.py", "*/tracemalloc.py")
    mine = [tracemalloc.Filter(False, pattern) for pattern in others]
    tracemalloc.start()
    before = tracemalloc.take_snapshot().filter_traces(mine)
    for i, block_hash in enumerate(hashes):
        log.record(block_hash, tenants[i % 2], tenants[(i + 1) % 2])
    after = tracemalloc.take_snapshot().filter_traces(mine)
    tracemalloc.stop()
    grown = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    # the 16-byte hash object is made before tracing here; in the pool the log is what keeps it alive
    return grown / num_entries + sys.getsizeof(hashes[0])
