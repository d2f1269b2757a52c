"""What the router answers: named results that travel with the request.

The choices are ``NamedTuple``s rather than frozen dataclasses: equally immutable and named, but
about twice as cheap to build, and one is built per decision on the ingress's hot path.
"""

from __future__ import annotations

from enum import Enum
from typing import NamedTuple

from engine.block_hash import BlockHash


class RouteReason(str, Enum):
    """Why a worker was chosen (a ``str``: it serializes as its value)."""

    RING_OWNER = "ring_owner"  # the prefix key's owner on the hash ring
    RING_WALK = "ring_walk"  # the owner was above its watermark: next cool worker in ring order
    LEAST_LOADED = "least_loaded"  # all above the watermark, no prefix key, or the least_loaded policy
    ROUND_ROBIN = "round_robin"  # the round_robin policy, or no load reports to decide on
    KV_HEADROOM = "kv_headroom"  # decode: the worker with the most free KV blocks that fits the request
    # cache_aware policy (router/cache_aware.py):
    PREFIX_CACHE = "prefix_cache"  # the worker holding the prompt's deepest cached prefix (its primary)
    CACHE_SPLIT = "cache_split"  # another holder of that prefix: a hot prefix's traffic split
    REPLICATE = "replicate"  # every holder too loaded: a new copy on the next worker along the ring


class PrefillChoice(NamedTuple):
    """The prefill worker for a request.

    Attributes:
        worker_id: the chosen worker.
        reason: why it was chosen.
        prefix_key: the prompt's prefix key (chain hash of its leading full blocks, salted by tenant),
            or None when the prompt has no full block (nothing cacheable to route by).
        expected_cached_tokens: the cache_aware policy's estimate of the prompt tokens the chosen
            worker holds (from its prefix summary; 0 for the other policies).
    """

    worker_id: str
    reason: RouteReason
    prefix_key: BlockHash | None
    expected_cached_tokens: int = 0


class DecodeChoice(NamedTuple):
    """The decode worker for a request and why."""

    worker_id: str
    reason: RouteReason


class RouteDecision(NamedTuple):
    """Both choices for a request; ``reason`` is the prefill reason (the one that moves caches)."""

    prefill: PrefillChoice
    decode: DecodeChoice

    @property
    def reason(self) -> RouteReason:
        return self.prefill.reason
