"""Prefix keys: the engine's block-hash chain over a prompt's leading full blocks.

The key of a prompt is ``h_d``, the chain hash of its first ``d = min(depth, num_full_blocks)`` full
blocks, salted by tenant: bit for bit the hash the prefill worker gives its ``d``-th cached block
(``engine.block_hash``), so "same key" means "same cached prefix of that depth".
"""

from __future__ import annotations

from collections.abc import Sequence

from engine.block_hash import BlockHash, hash_block, root_hash

_MAX_CACHED_ROOTS = 4096


class PrefixKeyer:
    """Computes prefix keys at a fixed block size and depth; caches per-tenant chain roots."""

    def __init__(self, block_size: int, depth_blocks: int):
        if block_size <= 0 or depth_blocks <= 0:
            raise ValueError(f"block_size and depth_blocks must be positive: {block_size}, {depth_blocks}")
        self._block_size = block_size
        self._depth_blocks = depth_blocks
        self._roots: dict[str, BlockHash] = {}

    def _root(self, tenant: str) -> BlockHash:
        root = self._roots.get(tenant)
        if root is None:
            if len(self._roots) >= _MAX_CACHED_ROOTS:
                self._roots.clear()
            root = self._roots[tenant] = root_hash(tenant)
        return root

    def key(self, token_ids: Sequence[int], tenant: str = "") -> BlockHash | None:
        """Key of a token prompt, or None if it has no full block."""
        block_size = self._block_size
        num_blocks = min(len(token_ids) // block_size, self._depth_blocks)
        if num_blocks == 0:
            return None
        parent = self._root(tenant)
        for start in range(0, num_blocks * block_size, block_size):
            parent = hash_block(parent, token_ids[start : start + block_size])
        return parent

    def key_of_block_ids(self, block_ids: Sequence[int], tenant: str = "") -> BlockHash | None:
        """Key of a prompt given as per-block ids (Mooncake ``hash_ids``): each id is hashed as the
        one "token" of its block, so prompts sharing leading ids share keys exactly as token prompts
        sharing leading blocks do."""
        num_blocks = min(len(block_ids), self._depth_blocks)
        if num_blocks == 0:
            return None
        parent = self._root(tenant)
        for index in range(num_blocks):
            parent = hash_block(parent, (block_ids[index],))
        return parent
