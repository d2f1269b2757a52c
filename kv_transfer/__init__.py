"""kv_transfer: moving paged KV blocks between workers (shm, NIXL, torch.distributed).

Typical use::

    transport = make_transport(ShmConfig(), worker_id)   # or NixlConfig(...), TorchDistConfig(...)
    pool = transport.allocate_pool(shape, dtype, device)  # the engine's KV pool
    endpoint = transport.register(pool, layout)           # published to peers
    transfer = transport.read_blocks(handle, local_ids)   # decode side pulls
    if transfer.wait() is TransferStatus.FAILED: ...      # recompute

See docs/kv_transfer.md.
"""

from __future__ import annotations

from kv_transfer.base import (
    BLOCK_CONTIGUOUS,
    KVHandle,
    KVTransport,
    LayoutMismatchError,
    LayoutSignature,
    Transfer,
    TransferEndpoint,
    TransferError,
    TransferStatus,
)
from kv_transfer.blocks import BlockRun, block_digests, merge_block_runs, pool_shape
from kv_transfer.config import NixlConfig, ShmConfig, TorchDistConfig, TransportConfig, transport_config
from kv_transfer.factory import make_transport

__all__ = [
    "BLOCK_CONTIGUOUS",
    "BlockRun",
    "KVHandle",
    "KVTransport",
    "LayoutMismatchError",
    "LayoutSignature",
    "NixlConfig",
    "ShmConfig",
    "TorchDistConfig",
    "Transfer",
    "TransferEndpoint",
    "TransferError",
    "TransferStatus",
    "TransportConfig",
    "block_digests",
    "make_transport",
    "merge_block_runs",
    "pool_shape",
    "transport_config",
]
