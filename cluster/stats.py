"""One replica's load and KV facts (``ReplicaLoad``), from the engine's ``EngineStats`` snapshot.

The one type for a replica's stats: its routing load report (``record_routing_stats``, read by the
ingress's routers), the source of its autoscaling metrics (``record_autoscaling_stats``), and one
``ReplicaInfo`` of ``ClusterInfo``. It travels over Ray pickled as it is (``replica_stats``); only the
routing report crosses Serve's controller, whose contract is a dict: ``to_routing_stats`` /
``from_routing_stats`` are the two ends of that one hop.

KV blocks, as the engine counts them: ``kv_blocks_used`` (referenced: running, pinned, reserved for a
pull) + ``kv_blocks_cached`` (unreferenced, holding a reusable prefix; evictable) + ``kv_blocks_free``
(neither) = ``kv_blocks_total``; ``kv_blocks_allocatable`` = free + cached is what an allocation may
take now (the router's KV headroom).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from engine.outputs import EngineStats
    from worker_common.prefix_summary import PrefixSummary


class TenantLoad(NamedTuple):
    """One tenant on one replica (the per-tenant KV review; ``engine.tenant_stats.TenantStats`` plus what
    the worker knows). A NamedTuple, so the routing dict's ``dataclasses.asdict`` keeps it as it is."""

    tenant: str
    active_requests: int
    active_tokens: int  # summed over its active requests
    max_active_tokens: int
    kv_blocks_used: int
    kv_blocks_cached: int
    kv_bytes_used: int
    kv_bytes_cached: int
    allocation_failures: int  # since start
    orphaned_requests: int  # client gone (or lease expired) while its blocks are still held
    evicted_blocks: int  # its cached blocks evicted, since start
    kv_share_blocks: int  # guaranteed to it in eviction


@dataclass(frozen=True)
class ReplicaLoad:
    """A replica's stats at ``reported_at`` (field names as in ``ReplicaInfo`` of the API)."""

    replica_id: str
    running_requests: int
    queued_requests: int
    queued_prefill_tokens: int
    kv_blocks_total: int
    kv_blocks_used: int
    kv_blocks_cached: int
    kv_blocks_free: int  # neither used nor cached
    kv_blocks_allocatable: int  # free + cached
    prompt_tokens: int  # totals since the replica started
    cached_tokens: int
    generated_tokens: int
    preemptions: int
    reported_at: float  # wall clock (time.time()); the router ignores a report older than the one it holds
    pinned_requests: int = 0  # prefill: requests whose KV is lent to a decode replica
    leases_expired: int = 0  # prefill: leases that ended without a release
    recomputed_requests: int = 0  # decode: pulls that failed and were recomputed here
    # (victim tenant, causing tenant, cached blocks evicted) since start, sorted; the engine's evictions
    evictions: tuple[tuple[str, str, int], ...] = ()
    # per tenant, sorted; filled by the fresh ``replica_stats`` call only (cluster.attribution), empty in
    # the routing copy, which stays small
    tenants: tuple[TenantLoad, ...] = ()
    # prefill: (generation, probe keys of the prefixes it holds, newest first) from
    # worker_common.prefix_summary, read by the router's cache_aware policy; capped by
    # router.summary_max_keys, 8 bytes a key
    prefix_summary: PrefixSummary | None = None
    # requests the engine has taken in since start, in the same snapshot as its queue: the router keeps
    # its local charge for a request until a report has counted it (router/load.py ``update``)
    requests_received: int = 0

    @classmethod
    def from_engine(cls, replica_id: str, stats: EngineStats, **worker_counts: int) -> ReplicaLoad:
        """``EngineStats`` -> a ``ReplicaLoad``; ``worker_counts``: the pool's own counters above."""
        return cls(
            replica_id=replica_id,
            running_requests=int(stats.num_running),
            queued_requests=int(stats.num_waiting),
            queued_prefill_tokens=int(stats.num_queued_prefill_tokens),
            kv_blocks_total=int(stats.num_blocks_total),
            kv_blocks_used=int(stats.num_blocks_used),
            kv_blocks_cached=int(stats.num_blocks_cached),
            kv_blocks_free=int(stats.num_blocks_free),
            kv_blocks_allocatable=int(stats.num_blocks_allocatable),
            prompt_tokens=int(stats.num_prompt_tokens),
            cached_tokens=int(stats.num_cached_tokens),
            generated_tokens=int(stats.num_generated_tokens),
            preemptions=int(stats.num_preemptions),
            reported_at=time.time(),
            evictions=tuple(sorted((victim, causing, int(n))
                                   for (victim, causing), n in stats.evictions.items())),
            requests_received=int(stats.num_requests_added),
            **worker_counts,
        )

    @property
    def prefix_hit_rate(self) -> float:
        """Cached prompt tokens / prompt tokens since the replica started (0 before any prompt)."""
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def kv_blocks_used_fraction(self) -> float:
        """Blocks held by requests / all blocks (decode's autoscaling metric)."""
        return self.kv_blocks_used / max(1, self.kv_blocks_total)

    @property
    def load(self) -> int:
        """Requests on the replica, running or queued (the Serve router's least-loaded order)."""
        return self.running_requests + self.queued_requests

    def to_routing_stats(self) -> dict[str, Any]:
        """The dict Serve's ``record_routing_stats`` contract asks for (``from_routing_stats`` reads it)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_routing_stats(cls, stats: dict[str, Any] | None) -> ReplicaLoad | None:
        """The ``ReplicaLoad`` Serve handed on, or None before the replica's first report."""
        if not stats:
            return None
        return cls(**stats)
