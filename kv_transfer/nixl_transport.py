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
import math
import mmap
import os
import struct
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kv_transfer.base import KVTransport, TransferEndpoint, TransferStatus
from kv_transfer.blocks import BlockRun, LocalPool
from kv_transfer.config import NixlConfig
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


@dataclass(frozen=True)
class _PeerMetadata:
    """A peer endpoint's metadata, decoded: its pool and its agent's metadata."""

    pool: _PoolInfo
    agent_metadata: bytes

    @property
    def nbytes(self) -> int:
        return self.pool.nbytes


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
        return self._transport.config.poll_interval_s

    def _on_finish(self, status: TransferStatus) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            self._transport._release_handle(handle)


def apply_ucx_environment(config: NixlConfig) -> None:
    """The one place the UCX environment is written, before an agent (and its UCX context) is created:
    ``NixlConfig.net_devices`` -> ``UCX_NET_DEVICES``. UCX reads it when the context is created, so it
    holds for this process's agents from now on (one transport per worker process). None leaves the
    environment as it is (an exported UCX_NET_DEVICES still applies). NIXL's own ``ucx_devices`` backend
    parameter does not restrict the TCP devices UCX 1.23 uses (checked with UCX_LOG_LEVEL=info)."""
    if config.net_devices is not None:
        os.environ["UCX_NET_DEVICES"] = config.net_devices


class NixlTransport(KVTransport[_PeerMetadata]):
    """KV transport over NIXL with the UCX backend."""

    backend = "nixl"
    config: NixlConfig

    def __init__(self, config: NixlConfig, worker_id: str) -> None:
        from nixl._api import nixl_agent, nixl_agent_config

        super().__init__(config, worker_id)
        apply_ucx_environment(config)
        agent_config = nixl_agent_config(
            enable_prog_thread=config.enable_progress_thread,
            backends=[config.ucx_backend],
            num_threads=config.num_threads,
        )
        self.agent_name = f"{worker_id}/{self.incarnation}"
        self._agent = nixl_agent(self.agent_name, agent_config)
        if config.ucx_backend not in self._agent.backends:
            raise RuntimeError(
                f"NIXL backend {config.ucx_backend!r} (NixlConfig.ucx_backend) is not available; "
                f"plugins: {self._agent.get_plugin_list()}"
            )
        self._lock = threading.RLock()  # the agent is created without NIXL's own thread sync
        self._registration: Any = None
        self._peers: dict[str, _Peer] = {}
        self._unreleased: list[Any] = []  # handles NIXL refused to release yet (retried at close)

    # -- pools ---------------------------------------------------------------------------------------
    def _allocate_pool(
        self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """On a GPU: device memory (NIXL registers it as VRAM). On the host: page-aligned memory,
        transparent huge pages advised, every page prefaulted."""
        if device.type != "cpu":
            return super()._allocate_pool(shape, dtype, device)
        nbytes = math.prod(shape) * dtype.itemsize
        mapping = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if self.config.hugepages and hasattr(mmap, "MADV_HUGEPAGE"):
            mapping.madvise(mmap.MADV_HUGEPAGE)
        data = torch.frombuffer(mapping, dtype=torch.uint8)  # keeps the mapping alive
        data.zero_()  # prefault: every page (huge where the kernel allows) is backed now
        return data.view(dtype).view(shape)

    def _publish(self, local: LocalPool) -> bytes:
        """Register the pool with the NIXL agent; the metadata carries the agent's own."""
        pool = local.tensor
        with self._lock:
            self._registration = self._agent.register_memory(pool)
            agent_metadata = self._agent.get_agent_metadata()
        info = _PoolInfo(
            agent_name=self.agent_name,
            base_address=pool.data_ptr(),
            nbytes=pool.numel() * pool.element_size(),
            device_id=max(pool.get_device(), 0),
            mem_type="VRAM" if pool.is_cuda else "DRAM",
        )
        return encode_metadata(info, agent_metadata)

    # -- reads ---------------------------------------------------------------------------------------
    def _parse_endpoint(self, endpoint: TransferEndpoint) -> _PeerMetadata:
        return _PeerMetadata(*decode_metadata(endpoint.metadata))

    def _new_transfer(self, description: str, lease_expires_at: float) -> NixlTransfer:
        return NixlTransfer(self, self.config.timeout_s, description, lease_expires_at)

    def _start_read(
        self, transfer: TransferState, endpoint: TransferEndpoint, peer: _PeerMetadata, runs: list[BlockRun]
    ) -> None:
        """Handshake if needed and post one READ (the template fails the transfer if this raises)."""
        assert isinstance(transfer, NixlTransfer)
        remote = self._peer(endpoint, peer.pool, peer.agent_metadata)
        transfer.post(self._make_read(remote, runs, endpoint.layout.block_bytes))

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
    def _release(self) -> None:
        """Drop remote agents, deregister the pool, destroy the agent."""
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
            self._agent = None
