"""Same-host shared-memory transport.

Prefill side: ``allocate_pool`` puts the KV pool in a named tmpfs segment (``shm_segment``), prefaulted;
``register`` publishes the segment's path, size and host. Decode side: ``read_blocks`` maps the peer's
segment once per (worker id, incarnation) (a new incarnation drops the old mapping first) and copies the
merged runs of blocks into its own pool on a daemon worker thread, chunk by chunk, so a timeout or
``close`` stops it between chunks. A transfer from a peer whose process is gone (its segment vanished or
its lock was released) ends FAILED, even when the bytes were still readable.
"""

from __future__ import annotations

import json
import math
import os
import socket
import weakref
from dataclasses import dataclass

import torch

from kv_transfer.base import KVTransport, TransferEndpoint
from kv_transfer.blocks import BlockRun, LocalPool
from kv_transfer.config import ShmConfig
from kv_transfer.shm_segment import (
    Segment,
    create_segment,
    is_owner_alive,
    map_segment,
    reap_orphans,
    segment_name,
)
from kv_transfer.transfer import TransferAborted, TransferState, WorkerThread

_SLICE_COPY_MAX_RUNS = 8  # above this many runs in a batch, gather + scatter by index instead


def host_identity() -> str:
    """Hostname plus kernel boot id: two processes share /dev/shm only when these match."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot_id = f.read().strip()
    except OSError:
        boot_id = ""
    return f"{socket.gethostname()}/{boot_id}"


@dataclass
class _Peer:
    incarnation: str
    segment: Segment


@dataclass(frozen=True)
class _SegmentInfo:
    """A peer endpoint's metadata as the reader uses it: where the pool's segment is."""

    path: str
    nbytes: int


def _close_segments(segments: list[Segment]) -> None:
    """Unlink and unmap this process's segments (close() and interpreter exit)."""
    for segment in segments:
        segment.close(unlink=True)
    segments.clear()


class ShmTransport(KVTransport[_SegmentInfo]):
    """KV transport through shared memory between processes on one host (host memory only)."""

    backend = "shm"
    config: ShmConfig

    def __init__(self, config: ShmConfig, worker_id: str) -> None:
        super().__init__(config, worker_id)
        self._host = host_identity()
        self._segments: list[Segment] = []  # segments this process owns
        self._peers: dict[str, _Peer] = {}  # worker id -> mapping; touched only by the worker thread
        self._worker = WorkerThread(name=f"kv-shm-{worker_id}")
        # unlink our segments at interpreter exit even if close() is never called
        self._finalizer = weakref.finalize(self, _close_segments, self._segments)

    # -- prefill side --------------------------------------------------------------------------------
    def _allocate_pool(
        self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """A KV pool in a new shared-memory segment, every page allocated and mapped."""
        if self.config.reap_orphans:
            reap_orphans(self.config.shm_dir, self.config.segment_prefix)
        name = segment_name(self.config.segment_prefix, self.worker_id, self.incarnation, len(self._segments))
        segment = create_segment(self.config.shm_dir, name, math.prod(shape) * dtype.itemsize)
        self._segments.append(segment)
        assert segment.data is not None
        return segment.data.view(dtype).view(shape)

    def _publish(self, local: LocalPool) -> bytes:
        """Host and segment; peers can read the pool only if it came from ``allocate_pool``."""
        metadata: dict[str, object] = {"host": self._host, "pid": os.getpid()}
        address = local.tensor.data_ptr()
        segment = next(
            (s for s in self._segments if s.data is not None and s.data.data_ptr() == address), None
        )
        if segment is not None:
            metadata.update(path=segment.path, nbytes=segment.nbytes)
        return json.dumps(metadata).encode()

    # -- decode side ---------------------------------------------------------------------------------
    def _parse_endpoint(self, endpoint: TransferEndpoint) -> _SegmentInfo:
        metadata = json.loads(endpoint.metadata)
        if metadata["host"] != self._host:
            raise ValueError(f"shm peer {endpoint.worker_id} is on another host ({metadata['host']})")
        if "path" not in metadata:
            raise ValueError(f"shm peer {endpoint.worker_id} did not allocate its pool with allocate_pool")
        return _SegmentInfo(metadata["path"], metadata["nbytes"])

    def _start_read(
        self, transfer: TransferState, endpoint: TransferEndpoint, peer: _SegmentInfo, runs: list[BlockRun]
    ) -> None:
        """Copy on the worker thread (one per transport: reads run in order)."""
        self._worker.submit(lambda: self._run_copy(transfer, endpoint, peer, runs))

    def _run_copy(
        self, transfer: TransferState, endpoint: TransferEndpoint, peer: _SegmentInfo, runs: list[BlockRun]
    ) -> None:
        try:
            if not transfer.begin():
                return
            segment = self._peer_segment(endpoint, peer)
            self._check_peer_alive(endpoint, segment)
            self._copy_runs(transfer, segment, runs, endpoint.layout.block_bytes)
            self._check_peer_alive(endpoint, segment)  # bytes from a dying peer are not trusted
            transfer.succeed()
        except TransferAborted:
            pass
        except Exception as exc:  # any failure ends the transfer, never the worker thread
            transfer.fail(f"shm read from {endpoint.worker_id} failed: {type(exc).__name__}: {exc}")

    def _copy_runs(
        self, transfer: TransferState, segment: Segment, runs: list[BlockRun], block_bytes: int
    ) -> None:
        """Copy every run in batches of ~copy_chunk_bytes, one lock hold per batch (a timeout cuts in
        between batches). Long runs are split on block boundaries."""
        assert self._local is not None and segment.data is not None
        # widest element that divides a block: index kernels move words, not bytes (uint8 is ~10x slower)
        word = torch.int64 if block_bytes % 8 == 0 else torch.uint8
        src = segment.data.view(word).view(-1, block_bytes // word.itemsize)  # [remote blocks, words]
        dst = self._local.data.view(word).view(-1, block_bytes // word.itemsize)  # [local blocks, words]
        chunk_blocks = max(1, self.config.copy_chunk_bytes // block_bytes)
        batch: list[BlockRun] = []
        batch_blocks = 0
        for run in runs:
            for offset in range(0, run.num_blocks, chunk_blocks):
                count = min(chunk_blocks, run.num_blocks - offset)
                batch.append(BlockRun(run.remote_start + offset, run.local_start + offset, count))
                batch_blocks += count
                if batch_blocks >= chunk_blocks:
                    self._copy_batch(transfer, src, dst, batch)
                    batch, batch_blocks = [], 0
        if batch:
            self._copy_batch(transfer, src, dst, batch)

    @staticmethod
    def _copy_batch(
        transfer: TransferState, src: torch.Tensor, dst: torch.Tensor, batch: list[BlockRun]
    ) -> None:
        if len(batch) <= _SLICE_COPY_MAX_RUNS:  # few runs: one memcpy per run, no index tensors
            with transfer.writing():
                for run in batch:
                    end_remote, end_local = (
                        run.remote_start + run.num_blocks,
                        run.local_start + run.num_blocks,
                    )
                    dst[run.local_start : end_local].copy_(src[run.remote_start : end_remote])
            return
        # many short runs: one gather into a temporary, one scatter (two passes beat per-run dispatch)
        remote_ids = torch.cat([torch.arange(r.remote_start, r.remote_start + r.num_blocks) for r in batch])
        local_ids = torch.cat([torch.arange(r.local_start, r.local_start + r.num_blocks) for r in batch])
        gathered = src.index_select(0, remote_ids)  # [len(remote_ids), words per block]
        with transfer.writing():
            dst.index_copy_(0, local_ids, gathered)

    def _peer_segment(self, endpoint: TransferEndpoint, info: _SegmentInfo) -> Segment:
        """The cached mapping of the peer's incarnation; a new incarnation drops the old one first."""
        peer = self._peers.get(endpoint.worker_id)
        if peer is not None and peer.incarnation == endpoint.incarnation:
            return peer.segment
        if peer is not None:
            self._drop_peer(endpoint.worker_id)
        try:
            segment = map_segment(info.path, info.nbytes)
        except FileNotFoundError as exc:
            raise ConnectionError(
                f"peer {endpoint.worker_id} incarnation {endpoint.incarnation} is gone (segment vanished)"
            ) from exc
        self._peers[endpoint.worker_id] = _Peer(endpoint.incarnation, segment)
        return segment

    def _check_peer_alive(self, endpoint: TransferEndpoint, segment: Segment) -> None:
        if is_owner_alive(segment.fd):
            return
        self._drop_peer(endpoint.worker_id, unlink=True)  # the owner died: reap its segment
        raise ConnectionError(f"peer {endpoint.worker_id} incarnation {endpoint.incarnation} exited")

    def _drop_peer(self, worker_id: str, unlink: bool = False) -> None:
        peer = self._peers.pop(worker_id, None)
        if peer is not None:
            peer.segment.close(unlink=unlink)

    def peer_incarnations(self) -> dict[str, str]:
        """worker id -> incarnation of every mapped peer (a query, for tests and debugging)."""
        return {worker_id: peer.incarnation for worker_id, peer in self._peers.items()}

    # -- lifecycle -----------------------------------------------------------------------------------
    def _release(self) -> None:
        """Stop the worker, unmap peers, unlink own segments."""
        self._worker.stop()
        for worker_id in list(self._peers):
            self._drop_peer(worker_id)
        self._finalizer()  # unlinks and unmaps our segments now
