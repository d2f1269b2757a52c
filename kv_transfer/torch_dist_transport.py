"""torch.distributed transport: gloo on CPU, NCCL on GPU, one 2-rank process group per peer pair.

Decode-initiated read over two-sided collectives: the reader sends the merged block runs it wants on the
pair's control connection, the prefill side (``TorchDistServer``) ``send``s those blocks' bytes as one
message, and the reader ``recv``s them into a staging buffer and scatters them into its local blocks
(the staging buffer is what lets a timed-out transfer never write into blocks the caller already freed).
Reads from one peer run in order on that peer's daemon thread; different peers proceed in parallel.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from kv_transfer.base import KVTransport, TransferEndpoint
from kv_transfer.blocks import BlockRun, LocalPool
from kv_transfer.config import TorchDistConfig
from kv_transfer.torch_dist_link import (
    abort_group,
    make_pair_group,
    process_group_backend,
    recv_message,
    send_message,
)
from kv_transfer.torch_dist_server import TorchDistServer
from kv_transfer.transfer import TransferAborted, TransferState, WorkerThread

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _ServerInfo:
    """A peer endpoint's metadata: where its server listens, its pool's size, its collective backend."""

    host: str
    port: int
    nbytes: int
    group_backend: str  # "gloo" | "nccl": both ends of a pair must use the same one


class _PeerLink:
    """This reader's connection to one peer incarnation: control socket + pair group + worker thread."""

    def __init__(self, transport: TorchDistTransport, endpoint: TransferEndpoint, address: tuple[str, int]):
        self.transport = transport
        self.worker_id = endpoint.worker_id
        self.incarnation = endpoint.incarnation
        self.address = address
        self.sock: socket.socket | None = None
        self.group: dist.ProcessGroup | None = None
        self.worker = WorkerThread(name=f"kv-dist-{endpoint.worker_id}")

    def connect(self) -> None:
        """Handshake (checks the peer is the incarnation the handle names) and join the pair group."""
        if self.group is not None:
            return
        config = self.transport.config
        sock = socket.create_connection(self.address, timeout=config.connect_timeout_s)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            send_message(sock, {"worker_id": self.transport.worker_id, "incarnation": self.incarnation})
            reply = recv_message(sock)
            if reply is None or "error" in reply:
                raise ConnectionError(f"peer {self.worker_id} refused: {reply and reply['error']}")
            timeout = timedelta(seconds=config.connect_timeout_s)
            store = dist.TCPStore(self.address[0], reply["store_port"], 2, False, timeout=timeout)
            self.group = make_pair_group(
                store, 1, sock.getsockname()[0], self.transport.process_group_backend, config.timeout_s
            )
            sock.settimeout(None)
            self.sock = sock
        except BaseException:
            sock.close()
            raise

    def reset(self) -> None:
        """Drop the connection (after an error or timeout the pair's stream is out of step)."""
        abort_group(self.group)
        self.group = None
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def close(self) -> None:
        self.worker.submit(self.reset)  # runs after the job in progress, on the link's own thread
        self.worker.stop(timeout=self.transport.config.timeout_s + 1)


class TorchDistTransport(KVTransport[_ServerInfo]):
    """KV transport over torch.distributed point-to-point (gloo on CPU, NCCL on CUDA)."""

    backend = "torch_dist"
    config: TorchDistConfig

    def __init__(self, config: TorchDistConfig, worker_id: str) -> None:
        super().__init__(config, worker_id)
        self._server: TorchDistServer | None = None
        self._links: dict[str, _PeerLink] = {}
        self._retired: list[_PeerLink] = []  # links of replaced incarnations, joined at close()
        self._links_lock = threading.Lock()

    @property
    def process_group_backend(self) -> str:
        """gloo or NCCL, by where the registered pool lives."""
        assert self._local is not None, "register the local pool before reading"
        return process_group_backend(self._local.data.device)

    def _publish(self, local: LocalPool) -> bytes:
        """Start serving reads of the pool on a control port."""
        self._server = TorchDistServer(
            self.config, local.data, local.layout.block_bytes, self.incarnation, self.config.timeout_s
        )
        host, port = self._server.address
        metadata = {
            "host": host,
            "port": port,
            "nbytes": local.tensor.numel() * local.tensor.element_size(),
            "group_backend": process_group_backend(local.data.device),
        }
        return json.dumps(metadata).encode()

    def _parse_endpoint(self, endpoint: TransferEndpoint) -> _ServerInfo:
        info = _ServerInfo(**json.loads(endpoint.metadata))
        if self._local is not None and info.group_backend != self.process_group_backend:
            raise ValueError(
                f"torch_dist peer {endpoint.worker_id} serves over {info.group_backend}, this pool needs "
                f"{self.process_group_backend}: both pools must be on a GPU or both in host memory"
            )
        return info

    def _start_read(
        self, transfer: TransferState, endpoint: TransferEndpoint, peer: _ServerInfo, runs: list[BlockRun]
    ) -> None:
        """Receive on the peer link's thread (reads from one peer run in order)."""
        link = self._link(endpoint, (peer.host, peer.port))
        link.worker.submit(lambda: self._run_read(link, transfer, runs, endpoint.layout.block_bytes))

    def _link(self, endpoint: TransferEndpoint, address: tuple[str, int]) -> _PeerLink:
        """The link to this incarnation; a new incarnation closes the stale link (in the background)."""
        with self._links_lock:
            link = self._links.get(endpoint.worker_id)
            if link is not None and link.incarnation == endpoint.incarnation:
                return link
            if link is not None:
                link.worker.submit(link.reset)
                link.worker.stop(timeout=0)  # ends after its queued jobs; joined at close()
                self._retired.append(link)
            link = _PeerLink(self, endpoint, address)
            self._links[endpoint.worker_id] = link
            return link

    def _run_read(
        self, link: _PeerLink, transfer: TransferState, runs: list[BlockRun], block_bytes: int
    ) -> None:
        try:
            if not transfer.begin():
                return
            link.connect()
            assert self._local is not None and link.group is not None and link.sock is not None
            local = self._local.data
            staging = torch.empty(
                sum(run.num_blocks for run in runs) * block_bytes, dtype=torch.uint8, device=local.device
            )
            send_message(link.sock, {"runs": [[run.remote_start, run.num_blocks] for run in runs]})
            remaining = transfer.deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("deadline passed before the receive started")
            link.group.recv([staging], 0, 0).wait(timedelta(seconds=remaining))
            offset = 0
            for run in runs:  # scatter staging -> local blocks, refusing once the transfer has ended
                length = run.num_blocks * block_bytes
                with transfer.writing():
                    local[run.local_start * block_bytes : run.local_start * block_bytes + length].copy_(
                        staging[offset : offset + length]
                    )
                offset += length
            transfer.succeed()
        except TransferAborted:
            pass
        except Exception as exc:
            link.reset()
            if transfer.fail(f"torch_dist read from {link.worker_id} failed: {type(exc).__name__}: {exc}"):
                return
            logger.info("torch_dist read after its end: %s", exc)

    def peer_incarnations(self) -> dict[str, str]:
        """worker id -> incarnation of every peer link (a query, for tests and debugging)."""
        with self._links_lock:
            return {worker_id: link.incarnation for worker_id, link in self._links.items()}

    def _release(self) -> None:
        """Close links (joining their threads), stop serving."""
        with self._links_lock:
            links = [*self._links.values(), *self._retired]
            self._links.clear()
            self._retired.clear()
        for link in links:
            link.close()
        if self._server is not None:
            self._server.close()
            self._server = None
