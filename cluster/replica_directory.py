"""Which replicas each worker deployment has, and their published load, as seen in this process.

``cluster.routing.TargetedRequestRouter`` instances (one per deployment handle) register here; the
ingress reads ``REPLICA_DIRECTORY.replicas(name)`` to route and to ask every replica for stats.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from cluster.stats import ReplicaLoad


@dataclass(frozen=True)
class ReplicaView:
    """One replica as the ingress sees it: its id and its last published load (None before the first)."""

    replica_id: str
    load: ReplicaLoad | None


class ReplicaDirectory:
    """Deployment name -> its live router (and so its replicas), in this process. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._routers: dict[str, Any] = {}

    def register(self, deployment_name: str, router: Any) -> None:
        with self._lock:
            self._routers[deployment_name] = router

    def replicas(self, deployment_name: str) -> list[ReplicaView]:
        """The deployment's replicas with their published load (empty before its handle's first call)."""
        with self._lock:
            router = self._routers.get(deployment_name)
        if router is None:
            return []
        return [
            ReplicaView(replica.replica_id.unique_id, ReplicaLoad.from_routing_stats(replica.routing_stats))
            for replica in list(router.curr_replicas.values())
        ]


REPLICA_DIRECTORY = ReplicaDirectory()
