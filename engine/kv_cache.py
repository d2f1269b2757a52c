"""The KV pool tensor; its memory math is ``engine.kv_memory``'s."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.kv_memory import KVShape, torch_dtype_name
from engine.model_config import ModelConfig

logger = logging.getLogger(__name__)

# (shape, dtype, device) -> the pool tensor, e.g. a transport's allocate_pool (registered memory)
KVAllocator = Callable[[tuple[int, ...], torch.dtype, torch.device], torch.Tensor]


@dataclass(frozen=True)
class KVCacheLayout:
    """Block-contiguous pool ``[num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]``.

    One block of every layer, K and V, is one contiguous byte run: the unit a KV transfer moves.
    """

    num_blocks: int
    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def shape(self) -> tuple[int, int, int, int, int, int]:
        return (self.num_blocks, self.num_layers, 2, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def kv_shape(self) -> KVShape:
        return KVShape(self.num_layers, self.num_kv_heads, self.head_dim, torch_dtype_name(self.dtype))

    @property
    def bytes_per_token(self) -> int:
        return self.kv_shape.bytes_per_token

    @property
    def block_bytes(self) -> int:
        return self.kv_shape.block_bytes(self.block_size)


def plan_kv_cache(
    model: ModelConfig, dtype: torch.dtype, block_size: int, kv_cache_bytes: int
) -> KVCacheLayout:
    """As many blocks as fit ``kv_cache_bytes``; logs the math."""
    probe = KVCacheLayout(1, model.num_layers, block_size, model.num_kv_heads, model.head_dim, dtype)
    num_blocks = probe.kv_shape.num_blocks(kv_cache_bytes, block_size)
    if num_blocks < 1:
        raise ValueError(
            f"kv_cache_bytes ({kv_cache_bytes}) is smaller than one block ({probe.block_bytes} bytes)"
        )
    layout = KVCacheLayout(
        num_blocks, model.num_layers, block_size, model.num_kv_heads, model.head_dim, dtype
    )
    logger.info(
        "KV cache: bytes/token = 2 x %d layers x %d kv_heads x %d head_dim x %d bytes (%s) = %d; "
        "budget %d bytes -> %d blocks of %d tokens (%d bytes each) = %d tokens",
        model.num_layers,
        model.num_kv_heads,
        model.head_dim,
        dtype.itemsize,
        dtype,
        layout.bytes_per_token,
        kv_cache_bytes,
        num_blocks,
        block_size,
        layout.block_bytes,
        num_blocks * block_size,
    )
    return layout


def allocate_kv_cache(
    layout: KVCacheLayout, device: torch.device, allocator: KVAllocator | None
) -> torch.Tensor:
    """The pool tensor on ``device``: from ``allocator(shape, dtype, device)`` (e.g. transport-registered
    memory) or torch.zeros."""
    if allocator is None:
        return torch.zeros(layout.shape, dtype=layout.dtype, device=device)
    pool = allocator(layout.shape, layout.dtype, device)
    is_expected = tuple(pool.shape) == layout.shape and pool.dtype == layout.dtype and pool.is_contiguous()
    if not is_expected or pool.device.type != device.type:
        raise ValueError(
            f"kv_allocator returned {tuple(pool.shape)} {pool.dtype} on {pool.device}; "
            f"expected contiguous {layout.shape} {layout.dtype} on {device}"
        )
    # Masked attention still multiplies stale slots: they must hold finite numbers, never NaN garbage.
    pool.zero_()
    return pool
