"""``make_transport``: the one place a backend is picked by name."""

from __future__ import annotations

from kv_transfer.base import KVTransport
from kv_transfer.config import TransportConfig


def make_transport(config: TransportConfig, worker_id: str) -> KVTransport:
    """Build the transport ``config.backend`` names, for the worker ``worker_id``.

    Backends are imported lazily: selecting "shm" never loads NIXL.
    """
    if not worker_id:
        raise ValueError("worker_id must be a non-empty string")
    if config.backend == "shm":
        from kv_transfer.shm_transport import ShmTransport

        return ShmTransport(config, worker_id)
    if config.backend == "nixl":
        from kv_transfer.nixl_transport import NixlTransport

        return NixlTransport(config, worker_id)
    if config.backend == "torch_dist":
        from kv_transfer.torch_dist_transport import TorchDistTransport

        return TorchDistTransport(config, worker_id)
    raise ValueError(f"unknown transport backend {config.backend!r}")
