"""The one small interface every KV transport implements.

Vocabulary:
- A worker's KV pool is one contiguous tensor laid out block-major
  (``[num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]``, see ``LayoutSignature``):
  block ``i`` for every layer, K and V, is one contiguous run of ``layout.block_bytes`` bytes, so a run
  of consecutive block ids is one contiguous byte range and moves as one descriptor.
- The prefill side ``register``s its pool and publishes the returned ``TransferEndpoint``.
- The decode side **pulls**: ``read_blocks(handle, local_block_ids)`` copies the remote blocks named in
  the ``KVHandle`` into its own local blocks and returns a ``Transfer`` whose status is polled or
  awaited. The data plane never touches the Ray object store.
- Release notices (decode telling prefill it may unpin) are the caller's control plane; the transport
  only moves bytes.

Lifecycle of one transfer: PENDING -> TRANSFERRING -> DONE | FAILED (a timeout is FAILED with
``error`` saying so). A FAILED transfer leaves the local blocks with undefined contents; the caller
recomputes or re-prefills.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    import torch

BLOCK_CONTIGUOUS = "block_contiguous"

_DTYPE_SIZES = {"float32": 4, "float16": 2, "bfloat16": 2}


class LayoutMismatchError(ValueError):
    """Two workers' KV layouts differ: refused before any byte moves."""


class TransferError(RuntimeError):
    """A transfer failed (peer gone, timeout, stale endpoint)."""


@dataclass(frozen=True)
class LayoutSignature:
    """Everything two workers must agree on for their KV blocks to be interchangeable bytes."""

    model_id: str  # a name plus a weights fingerprint: same name, other weights must not match
    dtype: str  # "float32" | "float16" | "bfloat16"
    block_size: int  # tokens per block
    num_layers: int
    num_kv_heads: int
    head_dim: int
    memory_layout: str = BLOCK_CONTIGUOUS

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPE_SIZES:
            raise ValueError(f"layout.dtype must be one of {sorted(_DTYPE_SIZES)}, got {self.dtype!r}")
        for name in ("block_size", "num_layers", "num_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"layout.{name} must be positive, got {getattr(self, name)}")

    @property
    def dtype_size(self) -> int:
        return _DTYPE_SIZES[self.dtype]

    @property
    def bytes_per_token(self) -> int:
        """2 (K and V) x layers x kv heads x head dim x dtype size."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_size

    @property
    def block_bytes(self) -> int:
        return self.bytes_per_token * self.block_size

    def check_compatible(self, other: LayoutSignature) -> None:
        """Raise ``LayoutMismatchError`` naming every field that differs."""
        if self == other:
            return
        fields = [
            f"{name}: {getattr(self, name)!r} != {getattr(other, name)!r}"
            for name in self.__dataclass_fields__
            if getattr(self, name) != getattr(other, name)
        ]
        raise LayoutMismatchError("KV layout mismatch (" + "; ".join(fields) + ")")


@dataclass(frozen=True)
class TransferEndpoint:
    """What a peer needs to reach a worker's registered KV pool. Small; travels over Ray."""

    backend: str  # "nixl" | "torch_dist" | "shm"
    worker_id: str
    incarnation: str  # new per process start: a restarted peer is re-handshaked, never reused
    metadata: bytes  # backend-specific (NIXL agent metadata, shm segment name, rendezvous address)
    layout: LayoutSignature


@dataclass(frozen=True)
class KVHandle:
    """A prefill worker's pinned KV for one request, handed to the decode side."""

    request_id: str
    endpoint: TransferEndpoint
    block_ids: tuple[int, ...]  # remote block ids, in sequence order
    num_tokens: int  # tokens whose KV the blocks hold
    lease_expires_at: float  # wall-clock seconds: after this the prefill side may unpin

    @property
    def worker_id(self) -> str:
        return self.endpoint.worker_id

    @property
    def layout(self) -> LayoutSignature:
        return self.endpoint.layout


class TransferStatus(enum.Enum):
    PENDING = "pending"
    TRANSFERRING = "transferring"
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True)
class TransportCapabilities:
    """What a backend can do; declared per backend class, read instead of isinstance checks."""

    supports_cpu_memory: bool
    supports_gpu_memory: bool
    cross_node: bool  # can reach a peer on another host
    needs_shared_pool_allocation: bool  # the pool must be allocated by the transport (``allocate_pool``)
    async_completion: bool  # read_blocks returns before the bytes land


class Transfer(ABC):
    """One pull in flight."""

    @property
    @abstractmethod
    def status(self) -> TransferStatus: ...

    @property
    @abstractmethod
    def error(self) -> str | None: ...

    @abstractmethod
    def wait(self, timeout: float | None = None) -> TransferStatus:
        """Block until DONE or FAILED, or until ``timeout`` seconds pass (then FAILED: timed out)."""


class KVTransport(ABC):
    """A KV block mover. The prefill side registers and serves; the decode side reads."""

    capabilities: ClassVar[TransportCapabilities]

    def allocate_pool(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """Allocate a KV pool this transport can serve (prefaulted). Default: plain host memory."""
        import torch

        pool = torch.empty(tuple(shape), dtype=dtype)
        pool.view(torch.uint8).zero_()  # prefault every page now, not on the first transfer
        return pool

    @abstractmethod
    def register(self, pool: torch.Tensor, layout: LayoutSignature) -> TransferEndpoint:
        """Register the local pool (``[num_blocks, ...]`` block-major) and return its endpoint."""

    @abstractmethod
    def read_blocks(self, handle: KVHandle, local_block_ids: Sequence[int]) -> Transfer:
        """Start pulling ``handle.block_ids`` into ``local_block_ids`` (same length, same order).

        Raises ``LayoutMismatchError`` before any byte moves when layouts differ.
        """

    def peer_incarnations(self) -> dict[str, str]:
        """Query (no state change): worker id -> incarnation of every peer this transport currently holds a
        mapping / agent / connection for. A restarted peer shows its new incarnation after the first read."""
        return {}

    @abstractmethod
    def close(self) -> None:
        """Release every registration and connection. Idempotent."""
