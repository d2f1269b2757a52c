"""Sending a call to the exact replica the ingress chose: a tiny Serve ``RequestRouter``.

The ingress decides where a request goes (prefix affinity for prefill, KV headroom for decode; see
``cluster.route_policy``) and passes the chosen replica's id as the ``target_replica_id`` keyword of the
call. ``TargetedRequestRouter`` (set on the worker deployments with ``RequestRouterConfig``) honours it;
without a target (or when the target has just gone away) it takes the least-loaded replica by the load
each replica publishes from ``record_routing_stats``. The same targeting sends a release notice to the
prefill replica that pinned the blocks, and lets ``ClusterInfo`` ask every replica for fresh stats.

Serve builds one router per deployment handle in the calling process (the ingress replica). Each
registers itself in ``cluster.replica_directory.REPLICA_DIRECTORY`` so the ingress can read the replica
set and the published load reports (its own copy per ingress replica, as the architecture asks).

Serve pickles this module *by value* into every process that routes (``RequestRouterConfig``), so it
must hold no state of its own: the directory lives in another module, imported inside the methods.
"""

from __future__ import annotations

from typing import Any

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

TARGET_KWARG = "target_replica_id"


def _load_of(replica: RunningReplica) -> int:
    from cluster.stats import ReplicaLoad

    load = ReplicaLoad.from_routing_stats(replica.routing_stats)
    return load.load if load is not None else 0


class TargetedRequestRouter(RequestRouter):
    """Route to ``kwargs[target_replica_id]`` when it names a live replica, else to the least loaded."""

    def initialize_state(self, **kwargs: Any) -> None:
        from cluster.replica_directory import REPLICA_DIRECTORY

        REPLICA_DIRECTORY.register(self._deployment_id.name, self)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        from cluster.replica_directory import REPLICA_DIRECTORY

        super().update_replicas(replicas)
        REPLICA_DIRECTORY.register(self._deployment_id.name, self)

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        target = None
        if pending_request is not None:
            target = pending_request.kwargs.get(TARGET_KWARG)
        if target:
            for replica in candidate_replicas:
                if replica.replica_id.unique_id == target:
                    return [[replica]]
        return [sorted(candidate_replicas, key=_load_of)]
