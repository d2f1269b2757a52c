"""NIXL transport (UCX backend): the decode side posts one-sided READs from the peer's registered pool.

Prefill side: ``register`` registers the pool with the local NIXL agent; the endpoint metadata is the
agent's metadata plus the pool's base address and size. Decode side: ``read_blocks`` loads the peer's
agent metadata once per (worker id, incarnation) -- a new incarnation first removes the stale agent, so
a restarted peer is always re-handshaked -- builds one descriptor per merged run of blocks on each side,
posts a READ and returns a transfer that polls ``check_xfer_state``. The prefill side runs no code per
transfer (UCX moves host memory between processes through shared memory / CMA, device memory through
CUDA IPC or RDMA). A timeout or failure releases (aborts) the NIXL request.
"""

from __future__ import annotations

import json
import logging
import mmap
import struct
import threading
import uuid
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from kv_transfer.base import (
    KVHandle,
    KVTransport,
    LayoutSignature,
    TransferEndpoint,
    TransferStatus,
    TransportCapabilities,
)
from kv_transfer.blocks import BlockRun, LocalPool, plan_read
from kv_transfer.config import TransportConfig
from kv_transfer.transfer import TransferState

logger = logging.getLogger(__name__)
_HEADER = struct.Struct("!I")  # length of the JSON header that precedes the agent metadata


@dataclass(frozen=True)
class _PoolInfo:
    """What a reader needs besides the agent: where the peer's pool is."""

    agent_name: str
    base_address: int
    nbytes: int
    device_id: int
    mem_type: str  # "DRAM" | "VRAM"


def encode_metadata(info: _PoolInfo, agent_metadata: bytes) -> bytes:
    header = json.dumps(info.__dict__).encode()
    return _HEADER.pack(len(header)) + header + agent_metadata


def decode_metadata(metadata: bytes) -> tuple[_PoolInfo, bytes]:
    (length,) = _HEADER.unpack_from(metadata)
    header = json.loads(metadata[_HEADER.size : _HEADER.size + length])
    return _PoolInfo(**header), metadata[_HEADER.size + length :]


@dataclass
class _Peer:
    incarnation: str
    agent_name: str
    pool: _PoolInfo


class NixlTransfer(TransferState):
    """A posted NIXL READ; progress comes from polling ``check_xfer_state``."""

    def __init__(
        self, transport: NixlTransport, timeout_s: float, description: str, lease_expires_at: float
    ) -> None:
        super().__init__(timeout_s, description, lease_expires_at)
        self._transport = transport
        self._handle: Any = None

    def post(self, handle: Any) -> None:
        self._handle = handle
        if not self.begin():
            self._on_finish(TransferStatus.FAILED)  # release the unposted request
            return
        state = self._transport._agent_call(lambda agent: agent.transfer(handle))
        self._apply(state)

    def _poll(self) -> None:
        handle = self._handle
        if handle is None or self.is_terminal:
            return
        self._apply(self._transport._agent_call(lambda agent: agent.check_xfer_state(handle)))

    def _apply(self, state: str) -> None:
        if state == "DONE":
            self.succeed()
        elif state == "ERR":
            self.fail(f"NIXL transfer error ({self.description}): peer gone or unreachable")

    def _poll_interval(self) -> float | None:
        return self._transport.config.nixl.poll_interval_s

    def _on_finish(self, status: TransferStatus) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            self._transport._release_handle(handle)


class NixlTransport(KVTransport):
    """KV transport over NIXL with the UCX backend."""

    capabilities: ClassVar[TransportCapabilities] = TransportCapabilities(
        supports_cpu_memory=True,
        supports_gpu_memory=True,
        cross_node=True,
        needs_shared_pool_allocation=False,
        async_completion=True,
    )

    def __init__(self, config: TransportConfig, worker_id: str) -> None:
        from nixl._api import nixl_agent, nixl_agent_config

        self.config = config
        self.worker_id = worker_id
        self.incarnation = uuid.uuid4().hex[:16]
        nixl = config.nixl
        agent_config = nixl_agent_config(
            enable_prog_thread=nixl.enable_progress_thread,
            backends=[nixl.ucx_backend],
            num_threads=nixl.num_threads,
        )
        self.agent_name = f"{worker_id}/{self.incarnation}"
        self._agent = nixl_agent(self.agent_name, agent_config)
        if nixl.ucx_backend not in self._agent.backends:
            raise RuntimeError(
                f"NIXL backend {nixl.ucx_backend!r} (NixlConfig.ucx_backend) is not available; "
                f"plugins: {self._agent.get_plugin_list()}"
            )
        self._lock = threading.RLock()  # the agent is created without NIXL's own thread sync
        self._local: LocalPool | None = None
        self._registration: Any = None
        self._peers: dict[str, _Peer] = {}
        self._inflight: weakref.WeakSet[NixlTransfer] = weakref.WeakSet()
        self._unreleased: list[Any] = []  # handles NIXL refused to release yet (retried at close)
        self._closed = False

    # -- pools ---------------------------------------------------------------------------------------
    def allocate_pool(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """Page-aligned host memory, transparent huge pages advised, every page prefaulted."""
        numel = 1
        for size in shape:
            numel *= int(size)
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        if nbytes <= 0:
            raise ValueError(f"pool shape {tuple(shape)} holds no bytes")
        mapping = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if self.config.nixl.hugepages and hasattr(mmap, "MADV_HUGEPAGE"):
            mapping.madvise(mmap.MADV_HUGEPAGE)
        data = torch.frombuffer(mapping, dtype=torch.uint8)  # keeps the mapping alive
        data.zero_()  # prefault: every page (huge where the kernel allows) is backed now
        return data.view(dtype).view(tuple(int(s) for s in shape))

    def register(self, pool: torch.Tensor, layout: LayoutSignature) -> TransferEndpoint:
        """Register the pool with the NIXL agent; the endpoint carries the agent's metadata."""
        self._check_open()
        if self._local is not None:
            raise ValueError("this transport already registered a KV pool")
        local = LocalPool.checked(pool, layout)
        with self._lock:
            self._registration = self._agent.register_memory(pool)
            agent_metadata = self._agent.get_agent_metadata()
        self._local = local
        info = _PoolInfo(
            agent_name=self.agent_name,
            base_address=pool.data_ptr(),
            nbytes=pool.numel() * pool.element_size(),
            device_id=max(pool.get_device(), 0),
            mem_type="VRAM" if pool.is_cuda else "DRAM",
        )
        return TransferEndpoint(
            "nixl", self.worker_id, self.incarnation, encode_metadata(info, agent_metadata), layout
        )

    # -- reads ---------------------------------------------------------------------------------------
    def read_blocks(self, handle: KVHandle, local_block_ids: Sequence[int]) -> NixlTransfer:
        """Validate (raising before any byte moves), handshake if needed, post one READ; returns at once."""
        self._check_open()
        endpoint = handle.endpoint
        if endpoint.backend != "nixl":
            raise ValueError(
                f"handle's endpoint is for backend {endpoint.backend!r}, this transport is 'nixl'"
            )
        info, agent_metadata = decode_metadata(endpoint.metadata)
        block_bytes = endpoint.layout.block_bytes
        runs = plan_read(
            endpoint.layout, handle.block_ids, info.nbytes // block_bytes, self._local, local_block_ids
        )
        transfer = NixlTransfer(
            self,
            self.config.timeout_s,
            f"{handle.request_id} <- {endpoint.worker_id}",
            handle.lease_expires_at,
        )
        transfer.num_bytes = len(handle.block_ids) * block_bytes
        self._inflight.add(transfer)
        try:
            peer = self._peer(endpoint, info, agent_metadata)
            transfer.post(self._make_read(peer, runs, block_bytes))
        except Exception as exc:  # unreachable peer, stale metadata: FAILED, never an exception
            transfer.fail(f"NIXL read from {endpoint.worker_id} failed: {type(exc).__name__}: {exc}")
        return transfer

    def _make_read(self, peer: _Peer, runs: list[BlockRun], block_bytes: int) -> Any:
        assert self._local is not None
        local_base = self._local.tensor.data_ptr()
        local_device = max(self._local.tensor.get_device(), 0)
        # one descriptor per merged run: [address, length, device id]
        local = np.empty((len(runs), 3), dtype=np.uint64)
        remote = np.empty((len(runs), 3), dtype=np.uint64)
        for i, run in enumerate(runs):
            length = run.num_blocks * block_bytes
            local[i] = (local_base + run.local_start * block_bytes, length, local_device)
            remote[i] = (peer.pool.base_address + run.remote_start * block_bytes, length, peer.pool.device_id)
        local_mem = "VRAM" if self._local.tensor.is_cuda else "DRAM"
        with self._lock:
            local_descs = self._agent.get_xfer_descs(local, local_mem)
            remote_descs = self._agent.get_xfer_descs(remote, peer.pool.mem_type)
            return self._agent.initialize_xfer("READ", local_descs, remote_descs, peer.agent_name)

    def _peer(self, endpoint: TransferEndpoint, info: _PoolInfo, agent_metadata: bytes) -> _Peer:
        """The loaded remote agent of this incarnation; a new incarnation removes the stale agent first."""
        with self._lock:
            peer = self._peers.get(endpoint.worker_id)
            if peer is not None and peer.incarnation == endpoint.incarnation:
                return peer
            if peer is not None:
                self._remove_peer(endpoint.worker_id)
            name = self._agent.add_remote_agent(agent_metadata)
            name = name.decode() if isinstance(name, bytes) else name
            peer = _Peer(endpoint.incarnation, name, info)
            self._peers[endpoint.worker_id] = peer
            return peer

    def _remove_peer(self, worker_id: str) -> None:
        peer = self._peers.pop(worker_id, None)
        if peer is None:
            return
        try:
            self._agent.remove_remote_agent(peer.agent_name)
        except Exception as exc:  # already gone: nothing to disconnect
            logger.debug("remove_remote_agent(%s): %s", peer.agent_name, exc)

    def peer_incarnations(self) -> dict[str, str]:
        """worker id -> incarnation of every loaded remote agent (a query, for tests and debugging)."""
        with self._lock:
            return {worker_id: peer.incarnation for worker_id, peer in self._peers.items()}

    # -- agent access --------------------------------------------------------------------------------
    def _agent_call(self, call: Any) -> Any:
        """Run ``call(agent)`` under the lock; a NIXL error (e.g. remote disconnect) reads as "ERR"."""
        with self._lock:
            if self._closed:
                return "ERR"
            try:
                return call(self._agent)
            except Exception as exc:
                logger.info("NIXL call failed: %s: %s", type(exc).__name__, exc)
                return "ERR"

    def _release_handle(self, handle: Any) -> None:
        with self._lock:
            try:
                handle.release()  # aborts the request if it is still in flight
            except Exception as exc:
                logger.warning("NIXL could not release a transfer yet (%s); retrying at close()", exc)
                self._unreleased.append(handle)

    # -- lifecycle -----------------------------------------------------------------------------------
    def close(self) -> None:
        """Abort in-flight reads, drop remote agents, deregister the pool, destroy the agent. Idempotent."""
        if self._closed:
            return
        for transfer in list(self._inflight):
            transfer.fail("transport closed")
        with self._lock:
            for handle in self._unreleased:
                try:
                    handle.release()
                except Exception as exc:
                    logger.warning("NIXL transfer still not releasable at close(): %s", exc)
            self._unreleased.clear()
            for worker_id in list(self._peers):
                self._remove_peer(worker_id)
            if self._registration is not None:
                self._agent.deregister_memory(self._registration)
                self._registration = None
            self._closed = True
            self._local = None
            self._agent = None

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"{type(self).__name__} for {self.worker_id} is closed")
