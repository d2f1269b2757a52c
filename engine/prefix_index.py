"""PrefixIndex: chain hash of a full block -> the block id holding its KV."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from engine.block_hash import BlockHash


@dataclass(frozen=True)
class PrefixMatch:
    """The longest cached prefix of a request: ``block_ids[i]`` holds the KV of full block ``i``."""

    num_cached_tokens: int
    block_ids: tuple[int, ...]


class PrefixIndex:
    """Maps ``BlockHash`` to a block id. The hash is collision-resistant (BLAKE2b over the whole chain),
    so a hit needs no token re-check. One hash maps to at most one block."""

    def __init__(self) -> None:
        self._blocks: dict[BlockHash, int] = {}

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, block_hash: BlockHash) -> bool:
        return block_hash in self._blocks

    def match_prefix(self, hashes: Sequence[BlockHash], block_size: int) -> PrefixMatch:
        """Read-only: the blocks of the longest run ``hashes[:k]`` that is all cached."""
        block_ids: list[int] = []
        for block_hash in hashes:
            block_id = self._blocks.get(block_hash)
            if block_id is None:
                break
            block_ids.append(block_id)
        return PrefixMatch(len(block_ids) * block_size, tuple(block_ids))

    def insert(self, block_hash: BlockHash, block_id: int) -> bool:
        """Record ``block_id`` as holding ``block_hash``; False (no change) if the hash is already held."""
        if block_hash in self._blocks:
            return False
        self._blocks[block_hash] = block_id
        return True

    def remove(self, block_hash: BlockHash) -> None:
        """Forget a hash (its block is being evicted)."""
        del self._blocks[block_hash]

    def lookup(self, block_hash: BlockHash) -> int | None:
        """The block holding ``block_hash``, if any (read-only)."""
        return self._blocks.get(block_hash)
