"""The KV memory math, once: bytes per token, blocks per budget (torch-free, so the router, the cluster
config, the capacity planner and the transports can all use it without importing torch).

A token's KV in one layer is a key and a value vector per KV head::

    bytes_per_token = 2 (K and V) x num_layers x num_kv_heads x head_dim x dtype size
    num_blocks      = kv_cache_bytes // (bytes_per_token x block_size)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# The serving dtypes by name, and their element sizes in bytes. The one list of dtype names.
DTYPE_SIZES: dict[str, int] = {"float32": 4, "bfloat16": 2, "float16": 2}
DTYPES: tuple[str, ...] = tuple(DTYPE_SIZES)
_TORCH_DTYPE_NAMES = {f"torch.{name}": name for name in DTYPES}


def dtype_size(dtype: str) -> int:
    """Element size of a serving dtype name; ``ValueError`` naming the known ones otherwise."""
    try:
        return DTYPE_SIZES[dtype]
    except KeyError:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}") from None


@dataclass(frozen=True)
class KVShape:
    """The per-token KV geometry of a model in one dtype."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str

    @property
    def bytes_per_token(self) -> int:
        return kv_bytes_per_token(self.num_layers, self.num_kv_heads, self.head_dim, self.dtype)

    def block_bytes(self, block_size: int) -> int:
        return self.bytes_per_token * block_size

    def num_blocks(self, kv_cache_bytes: int, block_size: int) -> int:
        """Whole blocks that fit ``kv_cache_bytes`` (0 when not even one does)."""
        return kv_cache_bytes // self.block_bytes(block_size)


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: str) -> int:
    """2 (K and V) x layers x KV heads x head dim x element size."""
    return 2 * num_layers * num_kv_heads * head_dim * dtype_size(dtype)


def torch_dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (the ``LayoutSignature.dtype`` spelling)."""
    name = _TORCH_DTYPE_NAMES.get(str(dtype))
    if name is None:
        raise ValueError(f"unsupported KV dtype {dtype}; expected one of {sorted(_TORCH_DTYPE_NAMES)}")
    return name


def torch_dtype(name: str) -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16``: a ``LayoutSignature.dtype`` (one of engine.kv_memory.DTYPES)."""
    import torch

    if name not in DTYPES:
        raise ValueError(f"unsupported KV dtype {name!r}; expected one of {DTYPES}")
    return getattr(torch, name)
