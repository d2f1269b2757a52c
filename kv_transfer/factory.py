"""``make_transport``: the one place a backend class is picked by name (its config's ``backend``).

What a backend can do is declared on its config model (``ShmConfig.supports_gpu_memory``,
``ShmConfig.is_cross_node``: class flags, readable without building a transport or importing torch).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kv_transfer.base import KVTransport
    from kv_transfer.config import TransportConfig

# backend name -> (module, class); a module is imported only when its transport is built (shm never
# loads NIXL)
_TRANSPORT_CLASSES: dict[str, tuple[str, str]] = {
    "shm": ("kv_transfer.shm_transport", "ShmTransport"),
    "nixl": ("kv_transfer.nixl_transport", "NixlTransport"),
    "torch_dist": ("kv_transfer.torch_dist_transport", "TorchDistTransport"),
}


def make_transport(config: TransportConfig, worker_id: str) -> KVTransport:
    """Build the transport ``config.backend`` names, for the worker ``worker_id``."""
    if not worker_id:
        raise ValueError("worker_id must be a non-empty string")
    if config.backend not in _TRANSPORT_CLASSES:
        raise ValueError(f"unknown transport backend {config.backend!r}")
    module, class_name = _TRANSPORT_CLASSES[config.backend]
    return getattr(importlib.import_module(module), class_name)(config, worker_id)
