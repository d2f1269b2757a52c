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
- ``KVTransport`` is a template: ``allocate_pool``, ``register``, ``read_blocks`` and ``close`` do every
  step the backends share (closed check, endpoint and layout checks, block id checks, the transfer's
  creation and bookkeeping) and call a few hooks where a backend differs (``_publish``,
  ``_parse_endpoint``, ``_start_read``, ``_release``; optionally ``_allocate_pool``, ``_new_transfer``).
- Release notices (decode telling prefill it may unpin) are the caller's control plane; the transport
  only moves bytes.

Lifecycle of one transfer: PENDING -> TRANSFERRING -> DONE | FAILED (a timeout is FAILED with
``error`` saying so). A FAILED transfer leaves the local blocks with undefined contents; the caller
recomputes or re-prefills.
"""


from __future__ import annotations

import math
import uuid
import weakref
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Generic, Protocol, TypeVar

from engine.kv_memory import DTYPES, dtype_size, kv_bytes_per_token
from kv_transfer.blocks import BLOCK_CONTIGUOUS, BlockRun, LocalPool, plan_read
from kv_transfer.transfer import Transfer, TransferError, TransferState, TransferStatus

if TYPE_CHECKING:
    import torch

    from kv_transfer.config import TransportSettings

__all__ = [
    "BLOCK_CONTIGUOUS",
    "KVHandle",
    "KVTransport",
    "LayoutMismatchError",
    "LayoutSignature",
    "RemotePool",
    "Transfer",
    "TransferEndpoint",
    "TransferError",
    "TransferStatus",
]


class LayoutMismatchError(ValueError):
    """Two workers' KV layouts differ: refused before any byte moves."""


@dataclass(frozen=True)
class LayoutSignature:
    """Everything two workers must agree on for their KV blocks to be interchangeable bytes."""

    model_id: str  # a name plus a weights fingerprint: same name, other weights must not match
    dtype: str  # one of engine.kv_memory.DTYPES
    block_size: int  # tokens per block
    num_layers: int
    num_kv_heads: int
    head_dim: int
    memory_layout: str = BLOCK_CONTIGUOUS

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"layout.dtype must be one of {DTYPES}, got {self.dtype!r}")
        for name in ("block_size", "num_layers", "num_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"layout.{name} must be positive, got {getattr(self, name)}")

    @property
    def dtype_size(self) -> int:
        return dtype_size(self.dtype)

    @property
    def bytes_per_token(self) -> int:
        """2 (K and V) x layers x kv heads x head dim x dtype size (``engine.kv_memory``)."""
        return kv_bytes_per_token(self.num_layers, self.num_kv_heads, self.head_dim, self.dtype)

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


class RemotePool(Protocol):
    """A backend's reading of a peer endpoint's metadata; all the template needs is the pool's size."""

    @property
    def nbytes(self) -> int: ...


PeerT = TypeVar("PeerT", bound=RemotePool)


class KVTransport(ABC, Generic[PeerT]):
    """A KV block mover. The prefill side registers and serves; the decode side reads.

    A backend sets ``backend`` (its config's ``backend``) and fills in the hooks. What it can do is
    declared on its config model (``config.supports_gpu_memory``, ``config.is_cross_node``).
    """

    backend: ClassVar[str]

    def __init__(self, config: TransportSettings, worker_id: str) -> None:
        self.config = config
        self.worker_id = worker_id
        self.incarnation = uuid.uuid4().hex[:16]
        self._local: LocalPool | None = None  # the registered pool
        self._inflight: weakref.WeakSet[TransferState] = weakref.WeakSet()  # failed by close()
        self._closed = False

    # -- pools ---------------------------------------------------------------------------------------
    def allocate_pool(
        self, shape: Sequence[int], dtype: torch.dtype, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """Allocate a KV pool this transport can serve, on ``device``, every page backed now.

        ``ValueError`` when the shape holds no bytes or the backend cannot serve ``device``'s memory.
        """
        import torch

        self._check_open()
        device = torch.device(device)
        if device.type != "cpu" and not self.config.supports_gpu_memory:
            raise ValueError(
                f"the {self.backend} KV transport serves host memory only: it cannot allocate a pool on "
                f"{device} (use nixl or torch_dist for device memory)"
            )
        shape = tuple(int(size) for size in shape)
        if math.prod(shape) <= 0:
            raise ValueError(f"pool shape {shape} holds no bytes")
        return self._allocate_pool(shape, dtype, device)

    def _allocate_pool(
        self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """Hook: the pool's memory. Default: a plain tensor on ``device``, zeroed (prefaulted)."""
        import torch

        pool = torch.empty(shape, dtype=dtype, device=device)
        pool.view(torch.uint8).zero_()  # prefault every page now, not on the first transfer
        return pool

    def register(self, pool: torch.Tensor, layout: LayoutSignature) -> TransferEndpoint:
        """Register the local pool (``[num_blocks, ...]`` block-major) and return its endpoint."""
        self._check_open()
        if self._local is not None:
            raise ValueError("this transport already registered a KV pool")
        local = LocalPool.checked(pool, layout)
        metadata = self._publish(local)
        self._local = local
        return TransferEndpoint(self.backend, self.worker_id, self.incarnation, metadata, layout)

    @abstractmethod
    def _publish(self, local: LocalPool) -> bytes:
        """Hook: make ``local`` readable by peers; return the endpoint metadata they need."""

    # -- reads ---------------------------------------------------------------------------------------
    def read_blocks(self, handle: KVHandle, local_block_ids: Sequence[int]) -> Transfer:
        """Start pulling ``handle.block_ids`` into ``local_block_ids`` (same length, same order); returns
        at once.

        Raises ``LayoutMismatchError`` (layouts differ) or ``ValueError`` (another backend's endpoint, a
        peer this backend cannot reach, bad block ids) before any byte moves. A peer that turns out gone
        or unreachable ends the transfer FAILED; it never raises.
        """
        self._check_open()
        endpoint = handle.endpoint
        if endpoint.backend != self.backend:
            raise ValueError(
                f"handle's endpoint is for backend {endpoint.backend!r}, this transport is {self.backend!r}"
            )
        peer = self._parse_endpoint(endpoint)
        remote_num_blocks = peer.nbytes // endpoint.layout.block_bytes
        runs = plan_read(endpoint.layout, handle.block_ids, remote_num_blocks, self._local, local_block_ids)
        transfer = self._new_transfer(f"{handle.request_id} <- {endpoint.worker_id}", handle.lease_expires_at)
        self._inflight.add(transfer)
        try:
            self._start_read(transfer, endpoint, peer, runs)
        except Exception as exc:  # unreachable peer, stale metadata: FAILED, never an exception
            error = f"{type(exc).__name__}: {exc}"
            transfer.fail(f"{self.backend} read from {endpoint.worker_id} failed: {error}")
        return transfer

    @abstractmethod
    def _parse_endpoint(self, endpoint: TransferEndpoint) -> PeerT:
        """Hook: read ``endpoint.metadata``; ``ValueError`` when this transport cannot reach that peer."""

    def _new_transfer(self, description: str, lease_expires_at: float) -> TransferState:
        """Hook: the transfer object of one read (a polled backend returns its subclass)."""
        return TransferState(self.config.timeout_s, description, lease_expires_at)

    @abstractmethod
    def _start_read(
        self, transfer: TransferState, endpoint: TransferEndpoint, peer: PeerT, runs: list[BlockRun]
    ) -> None:
        """Hook: start copying ``runs`` (validated, merged) from ``peer`` into the registered pool; end
        ``transfer`` DONE or FAILED when it finishes. May raise: the template ends the transfer FAILED."""

    def peer_incarnations(self) -> dict[str, str]:
        """Query (no state change): worker id -> incarnation of every peer this transport currently holds a
        mapping / agent / connection for. A restarted peer shows its new incarnation after the first read."""
        return {}

    # -- lifecycle -----------------------------------------------------------------------------------
    def close(self) -> None:
        """Fail in-flight transfers ("transport closed"), then release every registration and connection.
        Idempotent."""
        if self._closed:
            return
        self._closed = True
        for transfer in list(self._inflight):
            transfer.fail("transport closed")
        self._release()
        self._local = None

    @abstractmethod
    def _release(self) -> None:
        """Hook: stop threads, drop peers, free registrations (called once, after in-flight reads failed)."""

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"{type(self).__name__} for {self.worker_id} is closed")
