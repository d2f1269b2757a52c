"""The ingress's routing seam: which prefill replica and which decode replica take a request.

``RoutePolicy`` is fed the replica set and their load reports (``cluster.routing.ReplicaView``) and
answers with a ``RouteChoice(replica_id, reason, prefix_key)``. It delegates to the torch-free
``router.Router`` (policy from the config: prefix_hash, round_robin, least_loaded, consistent_hash)
when that package provides it, and otherwise routes round-robin. ``replica_id`` None means "let the
Serve router pick" (no replica known yet).
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import Any

from cluster.config import RouterSection
from cluster.replica_directory import ReplicaView

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RouteChoice:
    """Where one request goes and why."""

    replica_id: str | None
    reason: str


class RoutePolicy:
    """Chooses replicas from load reports; one instance per ingress replica."""

    def __init__(self, config: RouterSection, block_size: int) -> None:
        self.config = config
        self.block_size = block_size
        self._counter = itertools.count()
        self._router: Any = _make_router(config, block_size)
        self._workers: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())

    def choose_prefill(
        self,
        prompt_token_ids: tuple[int, ...],
        tenant: str,
        replicas: list[ReplicaView],
        decode: list[ReplicaView],
    ) -> RouteChoice:
        """The prefill replica for a prompt (prefix affinity when the router package is present)."""
        if not replicas:
            return RouteChoice(None, "serve_default")
        if self._router is not None:
            self._sync(replicas, decode)
            choice = self._router.choose_prefill(list(prompt_token_ids), tenant)
            return RouteChoice(choice.worker_id, choice.reason)
        return self._round_robin(replicas)

    def choose_decode(self, expected_num_blocks: int, replicas: list[ReplicaView]) -> RouteChoice:
        """The decode replica for a request needing ``expected_num_blocks`` blocks (KV headroom first)."""
        if not replicas:
            return RouteChoice(None, "serve_default")
        if self._router is not None:
            choice = self._router.choose_decode(expected_num_blocks)
            return RouteChoice(choice.worker_id, choice.reason)
        best = max(
            replicas,
            key=lambda r: (
                int(r.routing_stats.get("kv_blocks_free", 0))
                - int(r.routing_stats.get("running_requests", 0))
            ),
        )
        return RouteChoice(best.replica_id, "kv_headroom")

    def _round_robin(self, replicas: list[ReplicaView]) -> RouteChoice:
        ordered = sorted(r.replica_id for r in replicas)
        return RouteChoice(ordered[next(self._counter) % len(ordered)], "round_robin")

    def _sync(self, prefill: list[ReplicaView], decode: list[ReplicaView]) -> None:
        """Tell the router about replicas that came or went, and their latest loads."""
        workers = (tuple(sorted(r.replica_id for r in prefill)), tuple(sorted(r.replica_id for r in decode)))
        if workers != self._workers:
            self._router.set_workers(prefill=list(workers[0]), decode=list(workers[1]))
            self._workers = workers
        from router import LoadReport

        for pool, views in (("prefill", prefill), ("decode", decode)):
            for view in views:
                if view.routing_stats:
                    self._router.update_load(
                        LoadReport(worker_id=view.replica_id, pool=pool, **_load_fields(view.routing_stats))
                    )


def _load_fields(stats: dict[str, Any]) -> dict[str, int]:
    return {
        "queued_prefill_tokens": int(stats.get("queued_prefill_tokens", 0)),
        "running_requests": int(stats.get("running_requests", 0)),
        "free_kv_blocks": int(stats.get("kv_blocks_free", 0)),
    }


def _make_router(config: RouterSection, block_size: int) -> Any:
    try:
        from router import Router, RouterConfig
    except ImportError:
        logger.info("router package has no Router yet: routing round-robin")
        return None
    return Router(RouterConfig(policy=config.policy, block_size=block_size))
