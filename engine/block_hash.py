"""The block-hash chain: one function, one type, shared bit for bit by router, prefill and decode.

A block's identity for prefix reuse is ``h_i = H(h_{i-1}, tokens of block i, extra keys)`` over
*full* blocks only. The chain starts from a root derived from a pinned seed and the tenant's salt,
so the same tokens under two salts never share a hash (and so never share cached blocks).

H is BLAKE2b with a 16-byte digest: collision-resistant, so a hash hit needs no token re-check.
Token ids are encoded as little-endian uint32 with a length prefix, so the encoding is the same
on every machine and two different blocks can never encode to the same bytes.

This module must stay free of torch (and numpy): the router imports it.
"""

from __future__ import annotations

import functools
import hashlib
import struct
from collections.abc import Sequence
from typing import NewType

BlockHash = NewType("BlockHash", bytes)

HASH_SEED = b"pdserve/block-hash/v1"
DIGEST_SIZE = 16


def root_hash(salt: str = "") -> BlockHash:
    """The chain's parent for the first block: the pinned seed mixed with the tenant salt."""
    digest = hashlib.blake2b(HASH_SEED, digest_size=DIGEST_SIZE)
    salt_bytes = salt.encode("utf-8")
    digest.update(struct.pack("<I", len(salt_bytes)))
    digest.update(salt_bytes)
    return BlockHash(digest.digest())


@functools.lru_cache(maxsize=64)
def _block_struct(num_tokens: int) -> struct.Struct:
    # "<I" length prefix + num_tokens little-endian uint32; compiled once per block size (the hot
    # path of every routing decision hashes a handful of equal-sized blocks).
    return struct.Struct(f"<I{num_tokens}I")


def hash_block(parent: BlockHash, token_ids: Sequence[int], extra_keys: bytes = b"") -> BlockHash:
    """``H(parent, tokens, extra_keys)`` for one full block."""
    num_tokens = len(token_ids)
    digest = hashlib.blake2b(parent, digest_size=DIGEST_SIZE)
    digest.update(_block_struct(num_tokens).pack(num_tokens, *token_ids))
    if extra_keys:
        digest.update(extra_keys)
    return BlockHash(digest.digest())


def block_hashes(
    token_ids: Sequence[int],
    block_size: int,
    salt: str = "",
    max_blocks: int | None = None,
) -> list[BlockHash]:
    """Chain hashes of the leading full blocks of ``token_ids`` (at most ``max_blocks`` of them).

    A trailing partial block has no hash: only full blocks are shared.
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    num_full_blocks = len(token_ids) // block_size
    if max_blocks is not None:
        num_full_blocks = min(num_full_blocks, max_blocks)
    parent = root_hash(salt)
    hashes: list[BlockHash] = []
    for block_index in range(num_full_blocks):
        start = block_index * block_size
        parent = hash_block(parent, token_ids[start : start + block_size])
        hashes.append(parent)
    return hashes
