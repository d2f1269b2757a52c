"""``KVTransport``'s template (no second process): an in-process backend that fills in only the hooks
gets every shared step -- closed check, endpoint and layout checks, block id checks, bookkeeping, close.
"""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch

from kv_transfer import (
    KVHandle,
    LayoutMismatchError,
    LayoutSignature,
    ShmConfig,
    TorchDistConfig,
    TransferEndpoint,
    TransferStatus,
    block_digests,
    make_transport,
    pool_shape,
)
from kv_transfer.base import KVTransport
from kv_transfer.blocks import BlockRun, LocalPool
from kv_transfer.transfer import TransferState

LAYOUT = LayoutSignature("m@1", "float32", block_size=4, num_layers=2, num_kv_heads=2, head_dim=8)
_POOLS: dict[str, torch.Tensor] = {}  # worker id -> registered pool: the fake's "network"


@dataclasses.dataclass(frozen=True)
class _FakePeer:
    worker_id: str
    nbytes: int


class InProcessTransport(KVTransport[_FakePeer]):
    """Copies at once from a pool registered in this process; ``hold`` leaves reads in flight."""

    backend = "torch_dist"  # borrows a real backend's name: the template compares it with the endpoint's

    def __init__(self, config: TorchDistConfig, worker_id: str, hold: bool = False) -> None:
        super().__init__(config, worker_id)
        self.hold = hold
        self.num_released = 0

    def _publish(self, local: LocalPool) -> bytes:
        _POOLS[self.worker_id] = local.tensor
        return self.worker_id.encode()

    def _parse_endpoint(self, endpoint: TransferEndpoint) -> _FakePeer:
        pool = _POOLS[endpoint.metadata.decode()]
        return _FakePeer(endpoint.worker_id, pool.numel() * pool.element_size())

    def _start_read(
        self, transfer: TransferState, endpoint: TransferEndpoint, peer: _FakePeer, runs: list[BlockRun]
    ) -> None:
        if peer.worker_id == "gone":
            raise ConnectionError("peer gone")
        transfer.begin()
        if self.hold:
            return
        assert self._local is not None
        remote = _POOLS[peer.worker_id]
        for run in runs:
            with transfer.writing():
                self._local.tensor[run.local_start : run.local_start + run.num_blocks] = remote[
                    run.remote_start : run.remote_start + run.num_blocks
                ]
        transfer.succeed()

    def _release(self) -> None:
        self.num_released += 1
        _POOLS.pop(self.worker_id, None)


def _pair(hold: bool = False) -> tuple[InProcessTransport, TransferEndpoint, InProcessTransport]:
    server = InProcessTransport(TorchDistConfig(), "prefill", hold)
    pool = server.allocate_pool(pool_shape(LAYOUT, 8), torch.float32)
    pool.copy_(torch.randn(pool.shape, generator=torch.Generator().manual_seed(0)))
    endpoint = server.register(pool, LAYOUT)
    reader = InProcessTransport(TorchDistConfig(), "decode", hold)
    reader.register(reader.allocate_pool(pool_shape(LAYOUT, 8), torch.float32), LAYOUT)
    return server, endpoint, reader


def _handle(endpoint: TransferEndpoint, block_ids: list[int]) -> KVHandle:
    return KVHandle("r", endpoint, tuple(block_ids), len(block_ids) * LAYOUT.block_size, time.time() + 60)


def test_template_reads_through_the_hooks() -> None:
    server, endpoint, reader = _pair()
    assert endpoint.backend == "torch_dist" and endpoint.incarnation == server.incarnation
    transfer = reader.read_blocks(_handle(endpoint, [1, 2, 5]), [0, 1, 7])
    assert transfer.wait() is TransferStatus.DONE, transfer.error
    assert reader._local is not None and server._local is not None
    assert block_digests(reader._local.tensor, [0, 1, 7]) == block_digests(server._local.tensor, [1, 2, 5])
    for transport in (server, reader):
        transport.close()
        transport.close()  # idempotent: the backend releases once
        assert transport.num_released == 1


def test_template_refuses_before_any_byte_moves() -> None:
    server, endpoint, reader = _pair()
    other_backend = dataclasses.replace(endpoint, backend="shm")
    with pytest.raises(ValueError, match="backend 'shm'"):
        reader.read_blocks(_handle(other_backend, [1]), [0])
    other_layout = dataclasses.replace(endpoint, layout=dataclasses.replace(LAYOUT, block_size=8))
    with pytest.raises(LayoutMismatchError, match="block_size"):
        reader.read_blocks(_handle(other_layout, [1]), [0])
    with pytest.raises(ValueError, match="out of range"):
        reader.read_blocks(_handle(endpoint, [8]), [0])
    with pytest.raises(ValueError, match="local block ids"):
        reader.read_blocks(_handle(endpoint, [1, 2]), [0])
    with pytest.raises(ValueError, match="already registered"):
        reader.register(reader.allocate_pool(pool_shape(LAYOUT, 2), torch.float32), LAYOUT)
    unregistered = InProcessTransport(TorchDistConfig(), "fresh")
    with pytest.raises(ValueError, match="register"):
        unregistered.read_blocks(_handle(endpoint, [1]), [0])
    for transport in (server, reader, unregistered):
        transport.close()
    with pytest.raises(RuntimeError, match="closed"):
        reader.read_blocks(_handle(endpoint, [1]), [0])
    with pytest.raises(RuntimeError, match="closed"):
        reader.allocate_pool((1, 2, 2, 4, 2, 8), torch.float32)


def test_an_unreachable_peer_fails_the_transfer_never_raises() -> None:
    server, endpoint, reader = _pair()
    _POOLS["gone"] = _POOLS["prefill"]
    gone = dataclasses.replace(endpoint, worker_id="gone", metadata=b"gone")
    transfer = reader.read_blocks(_handle(gone, [1]), [0])
    assert transfer.status is TransferStatus.FAILED
    assert transfer.error == "torch_dist read from gone failed: ConnectionError: peer gone"
    for transport in (server, reader):
        transport.close()
    _POOLS.pop("gone")


def test_close_fails_reads_in_flight() -> None:
    server, endpoint, reader = _pair(hold=True)
    transfer = reader.read_blocks(_handle(endpoint, [3]), [4])
    assert transfer.status is TransferStatus.TRANSFERRING
    reader.close()
    assert transfer.status is TransferStatus.FAILED and transfer.error == "transport closed"
    server.close()


def test_allocate_pool_checks_shape_and_device() -> None:
    transport = InProcessTransport(TorchDistConfig(), "w")
    pool = transport.allocate_pool(pool_shape(LAYOUT, 3), torch.bfloat16, "cpu")
    assert pool.shape == pool_shape(LAYOUT, 3) and pool.dtype is torch.bfloat16 and not pool.any()
    with pytest.raises(ValueError, match="holds no bytes"):
        transport.allocate_pool(pool_shape(LAYOUT, 0), torch.float32)
    transport.close()
    shm = make_transport(ShmConfig(segment_prefix="pdtest-template-"), "w")
    with pytest.raises(ValueError, match="host memory only"):  # refused before any segment is created
        shm.allocate_pool(pool_shape(LAYOUT, 3), torch.float32, "cuda")
    shm.close()
