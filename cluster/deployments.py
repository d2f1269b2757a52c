"""The prefill and decode Serve deployments: thin adapters around ``PrefillWorker`` / ``DecodeWorker``.

Each replica builds its KV transport (``kv_transfer.make_transport``), lets the transport allocate the
engine's KV pool (so the pool is memory the transport can serve), and runs the engine in one
background thread (``worker_common.engine_loop``). Every method takes an optional
``target_replica_id`` keyword: ``cluster.routing.TargetedRequestRouter`` reads it to reach this exact
replica; the method itself ignores it.

Replicas publish their load (one ``cluster.stats.ReplicaLoad``) three ways: ``replica_stats`` (asked
directly, e.g. by ``ClusterInfo``), ``record_routing_stats`` (read by the ingress's routers) and
``record_autoscaling_stats`` (the custom metrics ``cluster.autoscaling`` policies read: prefill
``queued_prefill_tokens`` and ``running_requests``; decode ``kv_blocks_used_fraction`` and
``running_requests``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import AsyncIterator
from typing import Any, Literal

from cluster.attribution import tenant_loads
from cluster.config import ClusterConfig, config_from_dict
from cluster.stats import ReplicaLoad
from cluster.tracing import NULL_TRACER, make_tracer
from worker_common.messages import DecodeChunk, DecodeRequest, PrefillResult, WorkerRequest

logger = logging.getLogger(__name__)


def transport_config_for_replica(config: ClusterConfig) -> Any:
    """The cluster's ``kv_transfer`` config as this replica uses it: torch_dist's ``host: auto`` becomes
    this node's IP address (as Ray sees it), so a decode replica on another node can connect."""
    from kv_transfer.config import TorchDistConfig

    transport = config.kv_transfer
    if isinstance(transport, TorchDistConfig) and transport.host == "auto":
        import ray

        return transport.model_copy(update={"host": ray.util.get_node_ip_address()})
    return transport


def _replica_id() -> str:
    from ray import serve

    return serve.get_replica_context().replica_id.unique_id


def _build_engine(config: ClusterConfig, pool: Literal["prefill", "decode"], transport: Any) -> Any:
    """The pool's engine (its device, dtype and threads), its KV pool allocated by the transport."""
    from engine.llm_engine import LLMEngine

    config.check_devices((pool,))  # this replica's process must see the GPU its pool asks for
    allocator = transport.allocate_pool if transport is not None else None
    return LLMEngine(config.engine_for(pool), kv_allocator=allocator)


class _WorkerDeployment:
    """What both pools' replicas share: load reports (ClusterInfo, routing, autoscaling), the health
    check and clean-up. A subclass sets ``self.replica_id`` and ``self.worker`` and adds its own stats
    in ``_worker_counts``."""

    replica_id: str
    worker: Any
    tracer: Any = NULL_TRACER  # cluster.tracing: this replica's spans (make_tracer; a no-op when off)

    async def replica_stats(self, target_replica_id: str | None = None) -> ReplicaLoad:
        """Fresh stats, with the per-tenant KV review (cluster.attribution; the routing copy has none)."""
        return dataclasses.replace(self._load(), tenants=await tenant_loads(self.worker))

    def _load(self) -> ReplicaLoad:
        return ReplicaLoad.from_engine(self.replica_id, self.worker.stats(), **self._worker_counts())

    def _worker_counts(self) -> dict[str, int]:
        return {}

    def record_routing_stats(self) -> dict[str, Any]:
        return self._load().to_routing_stats()  # Serve's contract is a dict; the ingress reads a ReplicaLoad

    async def process_id(self, target_replica_id: str | None = None) -> int:
        """The OS process id of this replica (operators and fault tests signal it)."""
        return os.getpid()

    def check_health(self) -> None:
        """Serve's health check: the engine thread must be alive."""
        if not self.worker.engine_loop.is_alive:
            raise RuntimeError("engine thread died")

    def __del__(self) -> None:
        worker = getattr(self, "worker", None)
        if worker is not None:
            worker.close()
        self.tracer.shutdown()  # flush the spans still buffered


class PrefillDeployment(_WorkerDeployment):
    """A prefill replica."""

    def __init__(self, config_dict: dict[str, Any]) -> None:
        from kv_transfer import make_transport
        from prefill_worker.worker import PrefillWorker

        config = config_from_dict(config_dict)
        self.replica_id = _replica_id()
        transport = make_transport(transport_config_for_replica(config), self.replica_id)
        engine = _build_engine(config, "prefill", transport)
        self.tracer = make_tracer(config.tracing, "prefill", self.replica_id)
        self.worker = PrefillWorker(
            engine, transport, self.replica_id, engine.config.dtype, engine.config.block_size, config.lease_s
        )
        self.worker.prefix_summary.configure(config.router.summary_max_keys, config.router.summary_period_s)

    async def prefill(self, request: WorkerRequest, target_replica_id: str | None = None) -> PrefillResult:
        return await self.tracer.prefill(request, self.worker.prefill(request))

    async def release(self, request_id: str, target_replica_id: str | None = None) -> bool:
        return await self.worker.release(request_id)

    async def abort(self, request_id: str, target_replica_id: str | None = None) -> None:
        await self.worker.abort(request_id)

    def _worker_counts(self) -> dict[str, Any]:
        return {
            "pinned_requests": self.worker.num_pinned,
            "leases_expired": self.worker.num_leases_expired,
            "prefix_summary": self.worker.prefix_summary.summary,  # worker_common.prefix_summary
        }

    def record_autoscaling_stats(self) -> dict[str, float]:
        load = self._load()
        return {
            "queued_prefill_tokens": float(load.queued_prefill_tokens),
            "running_requests": float(load.running_requests),
        }


class DecodeDeployment(_WorkerDeployment):
    """A decode replica (in colocated mode: a replica that prefills and decodes its own requests)."""

    def __init__(self, config_dict: dict[str, Any]) -> None:
        from decode_worker.worker import DecodeWorker
        from kv_transfer import make_transport

        config = config_from_dict(config_dict)
        self.replica_id = _replica_id()
        transport = (
            None
            if config.is_colocated
            else make_transport(transport_config_for_replica(config), self.replica_id)
        )
        engine = _build_engine(config, "decode", transport)
        self.tracer = make_tracer(config.tracing, "decode", self.replica_id)
        self.worker = DecodeWorker(
            engine,
            transport,
            self.replica_id,
            config.kv_transfer.backend,
            config.kv_transfer.timeout_s,
            engine.config.dtype,
            engine.config.block_size,
            config.coalesce_every_streams,
            config.coalesce_max_wait_ms / 1e3,
            pull_delay_s=config.kv_transfer.test_pull_delay_s,
            heartbeat_interval_s=config.migration.heartbeat_interval_s,
        )

    async def generate(
        self, work: DecodeRequest, target_replica_id: str | None = None
    ) -> AsyncIterator[DecodeChunk]:
        async for chunk in self.tracer.decode(work, self.worker.generate(work)):
            yield chunk

    def _worker_counts(self) -> dict[str, int]:
        return {"recomputed_requests": self.worker.num_recomputed}

    def record_autoscaling_stats(self) -> dict[str, float]:
        load = self._load()
        return {
            "kv_blocks_used_fraction": load.kv_blocks_used_fraction,
            "running_requests": float(load.running_requests),
        }
