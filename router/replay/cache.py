"""An LRU prefix cache of KV blocks, as a prefill worker's prefix cache behaves in the replay.

Blocks are identified by id (a Mooncake ``hash_id``, or a per-request id for traces without them).
A request hits the *leading run* of its blocks that is cached (prefix caching shares only prefixes).
After the request, all its blocks are cached and most recently used, touched from the last block to
the first so that a request's tail is evicted before its head (as vLLM's free-block queue does: a
finished request's blocks are freed tail first), keeping shared prefixes alive longest.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence


class LRUPrefixCache:
    """A fixed number of block slots with LRU eviction. ``match`` is a query; ``insert`` a command."""

    def __init__(self, capacity_blocks: int):
        if capacity_blocks <= 0:
            raise ValueError(f"capacity_blocks must be positive, got {capacity_blocks}")
        self.capacity_blocks = capacity_blocks
        self._blocks: OrderedDict[Hashable, None] = OrderedDict()  # oldest first
        self.num_evicted = 0

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, block_id: Hashable) -> bool:
        return block_id in self._blocks

    def match(self, block_ids: Sequence[Hashable]) -> int:
        """Number of leading blocks of ``block_ids`` that are cached (no state change)."""
        blocks = self._blocks
        num_hit = 0
        for block_id in block_ids:
            if block_id not in blocks:
                break
            num_hit += 1
        return num_hit

    def insert(self, block_ids: Sequence[Hashable]) -> None:
        """Cache all of ``block_ids`` as most recently used (head most recent), evicting LRU blocks."""
        blocks = self._blocks
        for block_id in reversed(block_ids):
            if block_id in blocks:
                blocks.move_to_end(block_id)
            else:
                blocks[block_id] = None
        overflow = len(blocks) - self.capacity_blocks
        for _ in range(max(0, overflow)):
            blocks.popitem(last=False)
        self.num_evicted += max(0, overflow)
