"""router: picks the prefill and decode worker for each request (torch-free).

The public API::

    from router import Router, RouterConfig, LoadReport
    router = Router(RouterConfig(block_size=16))
    router.set_workers(prefill_ids, decode_ids)
    router.update_load(LoadReport(...))
    decision = router.route(prompt_token_ids, expected_num_blocks, tenant)

See docs/router.md. Nothing here may import torch (tests/router/test_router_isolation.py checks).
"""

from __future__ import annotations

from router.config import RouterConfig
from router.decisions import DecodeChoice, PrefillChoice, RouteDecision, RouteReason
from router.load import LoadReport, LoadTable
from router.ring import HashRing
from router.router import NoWorkerError, Router

__all__ = [
    "DecodeChoice",
    "HashRing",
    "LoadReport",
    "LoadTable",
    "NoWorkerError",
    "PrefillChoice",
    "RouteDecision",
    "RouteReason",
    "Router",
    "RouterConfig",
]
