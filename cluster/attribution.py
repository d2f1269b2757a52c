"""Cache attribution at the ingress, the hit-rate warning, and the per-tenant KV review (issue 14).

- ``CacheAttributionRecorder`` (one per ingress replica, owned by ``RequestPath``): writes a request's
  ``CacheAttribution`` (the prefill replica's, plus the route) into its final response (``cache``), counts
  short hits by cause, and watches the realized prefix hit rate against what the router expected
  (``HitRateMonitor``): a metric and a rate-limited log warning when it falls far below.
- ``tenant_loads`` (each worker replica's fresh ``replica_stats``): the engine's ``TenantStats`` as
  ``TenantLoad``s, with the requests whose client is gone but whose blocks are still held.
- ``tenant_kv_infos`` (``ClusterInfo``): one pool's ``TenantLoad``s summed per tenant as ``TenantKVInfo``.

The rules are written in docs/observability.md ("Cache attribution", "Hit-rate warning", "KV review").
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Annotated, Any

from prometheus_client import CollectorRegistry, Gauge
from prometheus_client import Counter as PromCounter
from pydantic import BaseModel, Field

from cluster.stats import ReplicaLoad, TenantLoad
from engine.config import STRICT_FROZEN
from protos import pdserve_pb2 as pb
from worker_common.messages import CACHE_CAUSES, CacheAttribution

logger = logging.getLogger(__name__)

# Prefill route reasons that send a request to where its prefix lives: prefix_hash's ring owner, the
# cache_aware policy's primary holder or another holder (router.decisions.RouteReason)
OWNER_ROUTES = ("ring_owner", "prefix_cache", "cache_split")
TENANT_STATS_TIMEOUT_S = 0.5  # a replica_stats call answers without the per-tenant part past this


class AttributionConfig(BaseModel):
    """The ``attribution:`` section: the hit-rate warning (docs/observability.md, "Hit-rate warning").

    Over the last ``window_requests`` requests with a cacheable prefix, the realized hit rate (cached /
    cacheable tokens) is compared with the expected one: the hit rate that requests routed to where their
    prefix lives (``OWNER_ROUTES``) got over the last ``baseline_requests`` such requests. Below
    ``warn_ratio`` x expected (and expected >= ``min_expected``), ``pdserve:prefix_hit_rate_low`` is 1
    and a warning is logged at most every ``warn_interval_s``.
    """

    model_config = STRICT_FROZEN

    window_requests: Annotated[int, Field(ge=1)] = 64
    baseline_requests: Annotated[int, Field(ge=1)] = 1024
    warn_ratio: Annotated[float, Field(gt=0, le=1)] = 0.5
    min_expected: Annotated[float, Field(ge=0, le=1)] = 0.2
    warn_interval_s: Annotated[float, Field(ge=0)] = 60.0


@dataclass(frozen=True)
class HitRateVerdict:
    """One check of the window: realized and expected hit rates and whether that is a warning."""

    realized: float
    expected: float
    num_requests: int
    owner_fraction: float  # of the window's requests, those routed to their prefix's ring owner
    causes: tuple[tuple[str, int], ...]  # short hits in the window by cause, most first
    is_low: bool


class HitRateMonitor:
    """Sliding windows of (cached, cacheable) tokens: all requests, and ring-owner-routed ones."""

    def __init__(self, config: AttributionConfig) -> None:
        self.config = config
        self._window: deque[tuple[int, int, bool, str]] = deque(maxlen=config.window_requests)
        self._owner: deque[tuple[int, int]] = deque(maxlen=config.baseline_requests)

    def observe(self, cache: CacheAttribution) -> HitRateVerdict | None:
        """Add a finished request; None when it had nothing cacheable (it says nothing about the cache)."""
        if cache.cacheable_tokens <= 0:
            return None
        is_owner = cache.route_reason in OWNER_ROUTES
        self._window.append((cache.cached_tokens, cache.cacheable_tokens, is_owner, cache.cause))
        if is_owner:
            self._owner.append((cache.cached_tokens, cache.cacheable_tokens))
        return self.verdict()

    def verdict(self) -> HitRateVerdict:
        """The window now (a query)."""
        window = self._window
        realized = _rate(window)
        expected = _rate(self._owner)
        causes = Counter(cause for _, _, _, cause in window if cause)
        is_full = len(window) >= self.config.window_requests
        config = self.config
        is_low = is_full and expected >= config.min_expected and realized < config.warn_ratio * expected
        return HitRateVerdict(
            realized,
            expected,
            len(window),
            sum(is_owner for _, _, is_owner, _ in window) / max(1, len(window)),
            tuple(causes.most_common()),
            is_low,
        )


def _rate(items: Iterable[tuple[Any, ...]]) -> float:
    cached = cacheable = 0
    for item in items:
        cached += item[0]
        cacheable += item[1]
    return cached / cacheable if cacheable else 0.0


class CacheAttributionRecorder:
    """Fills the final response's ``cache`` and records attribution metrics; one per ingress replica."""

    def __init__(
        self,
        config: AttributionConfig,
        registry: CollectorRegistry,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.monitor = HitRateMonitor(config)
        self.config = config
        self._clock = clock
        self._last_warning = float("-inf")
        self.short_requests = PromCounter(
            "pdserve:prefix_cache_short_requests",
            "Requests that got fewer cached prompt tokens than a full prefix hit, by cause",
            ["cause"], registry=registry,
        )
        self.lost_tokens = PromCounter(
            "pdserve:prefix_cache_lost_tokens",
            "Cacheable prompt tokens that were not served from the cache, by cause",
            ["cause"], registry=registry,
        )
        self.realized = Gauge(
            "pdserve:prefix_hit_rate_realized", "Cached / cacheable prompt tokens over the recent window",
            registry=registry,
        )
        self.expected = Gauge(
            "pdserve:prefix_hit_rate_expected",
            "Hit rate of requests routed to their prefix's ring owner over the baseline window",
            registry=registry,
        )
        self.is_low = Gauge(
            "pdserve:prefix_hit_rate_low", "1 while the realized hit rate is far below the expected one",
            registry=registry,
        )
        self.warnings = PromCounter(
            "pdserve:prefix_hit_rate_warnings", "Hit-rate warnings logged", registry=registry
        )

    def record(self, response: pb.GenerateResponse, cache: CacheAttribution | None) -> None:
        """A finished request: its attribution into ``response.cache``, the metrics, the warning check.
        ``cache`` None (colocated): only the cached tokens the decode replica reported are known."""
        if cache is None:
            response.cache.cached_tokens = response.usage.cached_tokens
            return
        write_cache(response.cache, cache)
        if cache.is_short and cache.cause:
            self.short_requests.labels(cache.cause).inc()
            self.lost_tokens.labels(cache.cause).inc(cache.cacheable_tokens - cache.cached_tokens)
        verdict = self.monitor.observe(cache)
        if verdict is not None:
            self._report(verdict)

    def _report(self, verdict: HitRateVerdict) -> None:
        self.realized.set(verdict.realized)
        self.expected.set(verdict.expected)
        self.is_low.set(1.0 if verdict.is_low else 0.0)
        now = self._clock()
        if verdict.is_low and now - self._last_warning >= self.config.warn_interval_s:
            self._last_warning = now
            self.warnings.inc()
            logger.warning(
                "prefix hit rate %.0f%% over the last %d requests, far below the %.0f%% the router "
                "expected (what requests sent to their prefix's holder get); %.0f%% of them went there; "
                "short hits by cause: %s",
                100 * verdict.realized, verdict.num_requests, 100 * verdict.expected,
                100 * verdict.owner_fraction, dict(verdict.causes) or "none",
            )


def write_cache(message: pb.CacheAttribution, cache: CacheAttribution) -> None:
    """``cache`` into its proto message (the ``cache`` field of the final ``GenerateResponse``)."""
    assert cache.cause in CACHE_CAUSES, cache.cause
    message.cached_tokens = cache.cached_tokens
    message.cacheable_tokens = cache.cacheable_tokens
    message.cause = cache.cause
    message.evicted_blocks = cache.evicted_blocks
    for tenant, blocks in cache.evicted_by:
        message.evicted_by.add(tenant=tenant, blocks=blocks)
    message.first_evicted_at = cache.first_evicted_at
    message.last_evicted_at = cache.last_evicted_at
    message.route_reason = cache.route_reason
    message.replica = cache.replica_id


def cache_usage_extension(message: pb.CacheAttribution) -> dict[str, Any]:
    """The HTTP usage object's ``pdserve_cache`` extension (beside ``prompt_tokens_details``)."""
    return {
        "cached_tokens": message.cached_tokens,
        "cacheable_tokens": message.cacheable_tokens,
        "cause": message.cause or None,
        "evicted_blocks": message.evicted_blocks,
        "evicted_by": [{"tenant": source.tenant, "blocks": source.blocks} for source in message.evicted_by],
        "first_evicted_at": message.first_evicted_at or None,
        "last_evicted_at": message.last_evicted_at or None,
        "route_reason": message.route_reason,
        "replica": message.replica,
    }


# ---- the per-tenant KV review ---------------------------------------------------------------------


async def tenant_loads(worker: Any) -> tuple[TenantLoad, ...]:
    """The worker's engine's per-tenant stats as ``TenantLoad``s. A request the engine holds without a
    live caller (``worker.live_request_ids()``, read before and again during the engine call, so a request
    arriving or leaving meanwhile is never miscounted) is orphaned. Empty when the engine thread does not
    answer within ``TENANT_STATS_TIMEOUT_S``."""
    live_before = worker.live_request_ids()  # before the call is queued: no await in between

    def collect(engine: Any) -> tuple[Any, set[str]]:
        return engine.tenant_stats(), live_before | worker.live_request_ids()

    future = worker.engine_loop.call(collect)
    try:
        async with asyncio.timeout(TENANT_STATS_TIMEOUT_S):
            stats, live = await asyncio.wrap_future(future)
    except TimeoutError:
        return ()
    block_bytes = worker.engine.kv_layout.block_bytes
    return tuple(
        TenantLoad(
            tenant=s.tenant,
            active_requests=s.num_active_requests,
            active_tokens=s.num_active_tokens,
            max_active_tokens=s.max_active_tokens,
            kv_blocks_used=s.num_blocks_used,
            kv_blocks_cached=s.num_blocks_cached,
            kv_bytes_used=s.num_blocks_used * block_bytes,
            kv_bytes_cached=s.num_blocks_cached * block_bytes,
            allocation_failures=s.num_allocation_failures,
            orphaned_requests=sum(rid not in live for rid in s.active_request_ids),
            evicted_blocks=s.num_evicted_blocks,
            kv_share_blocks=s.num_share_blocks,
        )
        for s in stats
    )


def tenant_kv_infos(loads: Iterable[ReplicaLoad], only_tenant: str | None = None) -> list[pb.TenantKVInfo]:
    """One pool's per-tenant review: its replicas' ``TenantLoad``s summed (max of the maxima), by tenant;
    ``only_tenant``: that tenant's row alone (an API key that is not an admin sees its own)."""
    totals: dict[str, pb.TenantKVInfo] = {}
    tokens: Counter[str] = Counter()
    for load in loads:
        for t in load.tenants:
            if only_tenant is not None and t.tenant != only_tenant:
                continue
            info = totals.setdefault(t.tenant, pb.TenantKVInfo(tenant=t.tenant))
            info.active_requests += t.active_requests
            tokens[t.tenant] += t.active_tokens
            info.max_active_tokens = max(info.max_active_tokens, t.max_active_tokens)
            info.kv_blocks_used += t.kv_blocks_used
            info.kv_blocks_cached += t.kv_blocks_cached
            info.kv_bytes_used += t.kv_bytes_used
            info.kv_bytes_cached += t.kv_bytes_cached
            info.allocation_failures += t.allocation_failures
            info.orphaned_requests += t.orphaned_requests
            info.evicted_blocks += t.evicted_blocks
            info.kv_share_blocks = max(info.kv_share_blocks, t.kv_share_blocks)
    for tenant, info in totals.items():
        info.mean_active_tokens = tokens[tenant] / info.active_requests if info.active_requests else 0.0
    return [totals[tenant] for tenant in sorted(totals)]
