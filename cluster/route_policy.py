"""The ingress's routing seam: which prefill replica and which decode replica take a request.

``RoutePolicy`` is fed the replica set and their load reports (``ReplicaView``) and answers with a
``RouteChoice(replica_id, reason)``. It delegates to the torch-free ``router.Router`` (policy from the
config: cache_aware (default: the prefill replicas' prefix summaries against their queues),
prefix_hash, round_robin, least_loaded, consistent_hash). ``replica_id`` None means "let the
Serve router pick" (the ingress has not seen the pool's replicas yet).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from cluster.replica_directory import ReplicaView
from engine.prefix_summary import PrefixSummary
from router.config import RouterConfig
from router.load import LoadReport
from router.router import Router

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RouteChoice:
    """Where one request goes and why."""

    replica_id: str | None
    reason: str


class RoutePolicy:
    """Chooses replicas from load reports; one instance per ingress replica."""

    def __init__(self, config: RouterConfig) -> None:
        """``config``: the cluster's ``router`` section (its block size is the engine's)."""
        self.config = config
        self._router = Router(config)
        self._workers: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())

    def choose_prefill(
        self,
        prompt_token_ids: tuple[int, ...],
        tenant: str,
        replicas: list[ReplicaView],
        decode: list[ReplicaView],
    ) -> RouteChoice:
        """The prefill replica for a prompt (cache_aware: where its prefix is cached, unless that costs
        more than a copy elsewhere; a prefix nobody holds: its ring owner)."""
        if not replicas:
            return RouteChoice(None, "serve_default")
        self._sync(replicas, decode)
        choice = self._router.choose_prefill(prompt_token_ids, tenant)
        return RouteChoice(choice.worker_id, _reason(choice.reason))

    def choose_decode(self, expected_num_blocks: int, replicas: list[ReplicaView]) -> RouteChoice:
        """The decode replica for a request needing ``expected_num_blocks`` blocks (KV headroom first)."""
        if not replicas:
            return RouteChoice(None, "serve_default")
        self._sync(None, replicas)
        choice = self._router.choose_decode(expected_num_blocks)
        return RouteChoice(choice.worker_id, _reason(choice.reason))

    def _sync(self, prefill: list[ReplicaView] | None, decode: list[ReplicaView]) -> None:
        """Tell the router about replicas that came or went, and their latest load reports."""
        prefill_ids = self._workers[0] if prefill is None else tuple(sorted(r.replica_id for r in prefill))
        workers = (prefill_ids, tuple(sorted(r.replica_id for r in decode)))
        if workers != self._workers:
            self._router.set_workers(workers[0], workers[1])
            self._workers = workers
        for view in [*(prefill or []), *decode]:
            report = _load_report(view)
            if report is not None:
                self._router.update_load(report)


def _reason(reason: Any) -> str:
    return str(getattr(reason, "value", reason))


def _load_report(view: ReplicaView) -> LoadReport | None:
    """The router's ``LoadReport`` from a replica's published load (None before its first report).

    The router's "free" KV blocks are what an allocation may take: free plus cached (evictable).
    """
    load = view.load
    if load is None:
        return None
    return LoadReport(
        worker_id=view.replica_id,
        queued_prefill_tokens=load.queued_prefill_tokens,
        running_requests=load.load,
        free_kv_blocks=load.kv_blocks_allocatable,
        total_kv_blocks=load.kv_blocks_total,
        reported_at=load.reported_at,
        prefix_summary=None if load.prefix_summary is None else PrefixSummary(*load.prefix_summary),
        computed_prompt_tokens=max(0, load.prompt_tokens - load.cached_tokens),  # new_prefix_work_factor
        requests_received=load.requests_received,
    )
