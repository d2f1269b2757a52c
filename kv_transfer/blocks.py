"""Block-range helpers shared by every backend: run merging, pool layout checks, byte hashing.

A pool is block-major (``[num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]``), so block
``i`` is the byte range ``[i * block_bytes, (i + 1) * block_bytes)`` of the flat pool and a run of
consecutive block ids is one contiguous byte range.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from engine.kv_memory import torch_dtype, torch_dtype_name  # noqa: F401 -- re-exported for the transports

if TYPE_CHECKING:
    import torch

    from kv_transfer.base import LayoutSignature

BLOCK_CONTIGUOUS = "block_contiguous"  # LayoutSignature.memory_layout of a block-major pool


@dataclass(frozen=True)
class BlockRun:
    """``num_blocks`` consecutive remote blocks from ``remote_start`` land in consecutive local blocks
    from ``local_start``: one descriptor, one copy."""

    remote_start: int
    local_start: int
    num_blocks: int


def merge_block_runs(remote_block_ids: Sequence[int], local_block_ids: Sequence[int]) -> list[BlockRun]:
    """Merge a pairwise block mapping into maximal runs, in order.

    A run grows only while *both* the remote and the local ids are consecutive
    (``remote[i+1] == remote[i] + 1 and local[i+1] == local[i] + 1``).
    """
    if len(remote_block_ids) != len(local_block_ids):
        raise ValueError(
            f"remote and local block id lists differ in length: {len(remote_block_ids)} != "
            f"{len(local_block_ids)}"
        )
    runs: list[BlockRun] = []
    if not remote_block_ids:
        return runs
    start_remote, start_local, length = int(remote_block_ids[0]), int(local_block_ids[0]), 1
    for remote, local in zip(remote_block_ids[1:], local_block_ids[1:], strict=True):
        remote, local = int(remote), int(local)
        if remote == start_remote + length and local == start_local + length:
            length += 1
            continue
        runs.append(BlockRun(start_remote, start_local, length))
        start_remote, start_local, length = remote, local, 1
    runs.append(BlockRun(start_remote, start_local, length))
    return runs


def pool_shape(layout: LayoutSignature, num_blocks: int) -> tuple[int, ...]:
    """The block-major pool shape for ``num_blocks`` blocks of ``layout``."""
    return (num_blocks, layout.num_layers, 2, layout.block_size, layout.num_kv_heads, layout.head_dim)


def check_pool_layout(pool: torch.Tensor, layout: LayoutSignature) -> int:
    """Check ``pool`` is a contiguous block-major pool of ``layout``; return its number of blocks."""
    if layout.memory_layout != BLOCK_CONTIGUOUS:
        raise ValueError(
            f"layout.memory_layout {layout.memory_layout!r} is not supported; use {BLOCK_CONTIGUOUS!r}"
        )
    if not pool.is_contiguous():
        raise ValueError("KV pool must be contiguous (block-major)")
    if torch_dtype_name(pool.dtype) != layout.dtype:
        raise ValueError(f"KV pool dtype {pool.dtype} does not match layout.dtype {layout.dtype!r}")
    expected = pool_shape(layout, pool.shape[0]) if pool.dim() >= 1 else ()
    if tuple(pool.shape) != expected:
        raise ValueError(
            f"KV pool shape {tuple(pool.shape)} does not match the layout's block shape {expected}"
        )
    return int(pool.shape[0])


def check_block_ids(block_ids: Sequence[int], num_blocks: int, side: str) -> None:
    """Every id must name a block of a pool with ``num_blocks`` blocks."""
    for block_id in block_ids:
        if not 0 <= int(block_id) < num_blocks:
            raise ValueError(f"{side} block id {block_id} out of range [0, {num_blocks})")


def flat_bytes(pool: torch.Tensor) -> torch.Tensor:
    """The pool as a flat ``uint8`` view (no copy): ``[num_blocks * block_bytes]``."""
    import torch

    return pool.reshape(-1).view(torch.uint8)


def block_digest(pool: torch.Tensor, block_id: int) -> str:
    """SHA-256 of one block's bytes (tests compare these across processes)."""
    blocks = flat_bytes(pool).view(pool.shape[0], -1)
    return hashlib.sha256(blocks[block_id].numpy().tobytes()).hexdigest()


def block_digests(pool: torch.Tensor, block_ids: Sequence[int]) -> list[str]:
    """``block_digest`` for each id, in order."""
    return [block_digest(pool, block_id) for block_id in block_ids]


@dataclass(frozen=True)
class LocalPool:
    """The pool a transport registered: the tensor, its layout and a flat byte view."""

    tensor: torch.Tensor
    layout: LayoutSignature
    num_blocks: int

    @property
    def data(self) -> torch.Tensor:
        """``[num_blocks * block_bytes]`` uint8 view of the pool."""
        return flat_bytes(self.tensor)

    @classmethod
    def checked(cls, pool: torch.Tensor, layout: LayoutSignature) -> LocalPool:
        return cls(pool, layout, check_pool_layout(pool, layout))


def plan_read(
    handle_layout: LayoutSignature,
    remote_block_ids: Sequence[int],
    remote_num_blocks: int,
    local: LocalPool | None,
    local_block_ids: Sequence[int],
) -> list[BlockRun]:
    """Validate one pull before any byte moves and return its merged runs.

    Raises ``LayoutMismatchError`` when the layouts differ and ``ValueError`` for a bad block list.
    """
    if local is None:
        raise ValueError("register(pool, layout) the local KV pool before read_blocks")
    local.layout.check_compatible(handle_layout)
    if len(remote_block_ids) != len(local_block_ids):
        raise ValueError(
            f"handle has {len(remote_block_ids)} blocks but {len(local_block_ids)} local block ids were given"
        )
    check_block_ids(remote_block_ids, remote_num_blocks, "remote")
    check_block_ids(local_block_ids, local.num_blocks, "local")
    if len(set(local_block_ids)) != len(local_block_ids):
        raise ValueError("local block ids must be distinct")
    return merge_block_runs(remote_block_ids, local_block_ids)
