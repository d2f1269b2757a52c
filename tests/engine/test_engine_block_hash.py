"""The block-hash chain against an independent re-derivation with hashlib and struct."""

from __future__ import annotations

import hashlib
import struct

from engine.block_hash import DIGEST_SIZE, HASH_SEED, block_hashes, hash_block, root_hash


def _reference_chain(token_ids: list[int], block_size: int, salt: str) -> list[bytes]:
    salt_bytes = salt.encode()
    parent = hashlib.blake2b(HASH_SEED + struct.pack("<I", len(salt_bytes)) + salt_bytes,
                             digest_size=DIGEST_SIZE).digest()
    chain = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        block = token_ids[start : start + block_size]
        payload = parent + struct.pack("<I", block_size) + b"".join(struct.pack("<I", t) for t in block)
        parent = hashlib.blake2b(payload, digest_size=DIGEST_SIZE).digest()
        chain.append(parent)
    return chain


def test_chain_matches_independent_encoding() -> None:
    tokens = [(i * 7919) % 50_000 for i in range(16 * 5 + 3)]  # 5 full blocks and a partial one
    for salt in ("", "tenant-a"):
        assert block_hashes(tokens, 16, salt) == _reference_chain(tokens, 16, salt)
    assert len(block_hashes(tokens, 16)) == 5  # the partial block has no hash


def test_salt_depth_and_extra_keys_change_the_hash() -> None:
    tokens = list(range(64))
    assert block_hashes(tokens, 16, "a") != block_hashes(tokens, 16, "b")
    assert block_hashes(tokens, 16, max_blocks=2) == block_hashes(tokens, 16)[:2]
    root = root_hash()
    assert hash_block(root, tokens[:16], b"image-1") != hash_block(root, tokens[:16])
    # block size is part of the encoding: 8 tokens then 8 more never equal one block of 16
    assert hash_block(hash_block(root, tokens[:8]), tokens[8:16]) != hash_block(root, tokens[:16])
