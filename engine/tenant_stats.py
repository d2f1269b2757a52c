"""TenantStats: one tenant's requests and KV blocks on one engine (the per-tenant KV review, issue 14).

A query built on demand (``LLMEngine.tenant_stats``), never per step: it walks the engine's requests once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from engine.block_pool import BlockPool


@dataclass(frozen=True)
class TenantStats:
    """``tenant``'s share of one engine now (counts since start where said).

    Active requests are queued, running, pinned for a transfer (prefill) or reserved for a pull
    (decode); their tokens are prompt + generated (block-rounded for pinned and reserved ones).
    """

    tenant: str
    num_active_requests: int
    num_active_tokens: int  # summed over the active requests
    max_active_tokens: int
    num_blocks_used: int  # referenced blocks it owns
    num_blocks_cached: int  # its unreferenced cached blocks
    num_allocation_failures: int  # refused allocate() calls and preemptions of its requests, since start
    num_evicted_blocks: int  # its cached blocks evicted since start (by any tenant)
    num_share_blocks: int  # blocks guaranteed to it in eviction
    active_request_ids: tuple[str, ...] = ()


def collect_tenant_stats(
    pool: BlockPool, active: Mapping[str, Sequence[tuple[str, int]]]
) -> tuple[TenantStats, ...]:
    """Per tenant, sorted: ``active``: tenant -> its (request id, tokens) pairs; the rest from the pool."""
    evicted: dict[str, int] = {}
    for (victim, _), count in pool.evictions.items():
        evicted[victim] = evicted.get(victim, 0) + count
    tenants = set(active) | {t for t, n in pool.held_blocks.items() if n} | set(pool.allocation_failures)
    tenants |= set(evicted)
    stats = []
    for tenant in sorted(tenants):
        requests = active.get(tenant, ())
        cached = pool.num_cached_blocks_of(tenant)
        stats.append(
            TenantStats(
                tenant=tenant,
                num_active_requests=len(requests),
                num_active_tokens=sum(tokens for _, tokens in requests),
                max_active_tokens=max((tokens for _, tokens in requests), default=0),
                num_blocks_used=pool.held_blocks[tenant] - cached,
                num_blocks_cached=cached,
                num_allocation_failures=pool.allocation_failures[tenant],
                num_evicted_blocks=evicted.get(tenant, 0),
                num_share_blocks=pool.share_blocks(tenant),
                active_request_ids=tuple(request_id for request_id, _ in requests),
            )
        )
    return tuple(stats)
