"""The small, picklable messages that travel between the ingress and the workers over Ray.

Only control data: token ids, sampling parameters, a ``KVHandle`` (block ids and an endpoint), timings.
KV bytes never travel here. Both workers and the ingress import these; the module stays torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.eviction_log import PrefixMiss
    from engine.sampling import SamplingParams
    from kv_transfer.base import KVHandle


class NoKVSpaceError(RuntimeError):
    """A decode replica has no free blocks for a request's KV (the ingress answers RESOURCE_EXHAUSTED)."""


@dataclass(frozen=True)
class SamplingSpec:
    """Sampling parameters as the API states them (``max_tokens`` counts the first token too): a subset
    of ``SamplingParams``'s fields, by the same names."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def to_engine(self, num_chars_sent: int = 0) -> SamplingParams:
        """The engine's ``SamplingParams`` for these values. The engines detokenize (the ingress forwards
        their text); ``num_chars_sent``: chars of the text the prefill side already emitted."""
        from engine.sampling import SamplingParams

        values = {field.name: getattr(self, field.name) for field in fields(self)}  # same names, no copy
        return SamplingParams(**values, detokenize=True, num_chars_sent=num_chars_sent)


@dataclass(frozen=True)
class WorkerRequest:
    """A validated request as the workers see it."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingSpec
    tenant: str = ""
    arrival_time: float = 0.0  # wall clock at the ingress (time.time())
    # W3C trace context of the request's ingress span ({"traceparent": ...}; cluster.tracing injects and
    # extracts it); empty when tracing is off, and then the workers make no spans at all.
    trace_context: dict[str, str] = field(default_factory=dict, compare=False)


CACHE_CAUSES = ("", "evicted", "ring_walk", "never_cached")
"""``CacheAttribution.cause`` values ("": every cacheable prompt token was served from the cache)."""
OFF_OWNER_ROUTES = ("ring_walk", "replicate")
"""Prefill route reasons (``router.decisions.RouteReason``) that left the prefix's owner as it was hot."""


@dataclass(frozen=True)
class CacheAttribution:
    """What a request's prefill reused from the prefix cache and, when it fell short, why
    (docs/observability.md, "Cache attribution"). Computed by the engine when the prompt is first
    admitted; the ingress adds the route (``with_route``).

    ``cacheable_tokens``: prompt tokens a full hit would have served (its full blocks, less the last
    token, which is always computed for its logits). ``cause`` when ``cached_tokens < cacheable_tokens``:
    "evicted" (the first missing block of the prompt's chain is in the replica's eviction log: an earlier
    request of this tenant left it there and an allocation took it), "ring_walk" (the router sent the
    request off its prefix's ring owner under load; it wins over the replica's own story), else
    "never_cached". ``evicted_blocks``: the prompt's chain blocks past the hit found in the eviction log;
    ``evicted_by``: (causing tenant, blocks), most blocks first; ``first_evicted_at`` /
    ``last_evicted_at``: wall clock (``time.time()``) of the earliest and latest of those evictions.
    """

    cached_tokens: int = 0
    cacheable_tokens: int = 0
    cause: str = ""
    evicted_blocks: int = 0
    evicted_by: tuple[tuple[str, int], ...] = ()
    first_evicted_at: float = 0.0
    last_evicted_at: float = 0.0
    route_reason: str = ""  # the prefill route's reason at the ingress ("ring_owner", "ring_walk", ...)
    replica_id: str = ""  # the replica whose cache this describes

    @property
    def evicted_by_tenant(self) -> str:
        """The tenant whose allocations took most of the evicted blocks ("" when none were)."""
        return self.evicted_by[0][0] if self.evicted_by else ""

    @property
    def is_short(self) -> bool:
        """Fewer prompt tokens came from the cache than a full hit would have served."""
        return self.cached_tokens < self.cacheable_tokens

    @classmethod
    def from_miss(cls, miss: PrefixMiss | None, block_size: int, replica_id: str = "") -> CacheAttribution:
        """The attribution of the engine's ``PrefixMiss`` (None: the request was never admitted)."""
        if miss is None:
            return cls(replica_id=replica_id)
        cached, cacheable = miss.num_cached_blocks * block_size, miss.num_cacheable_blocks * block_size
        cause = "" if cached >= cacheable else "evicted" if miss.is_evicted else "never_cached"
        return cls(
            cached_tokens=cached,
            cacheable_tokens=cacheable,
            cause=cause,
            evicted_blocks=miss.num_evicted_blocks,
            evicted_by=miss.evicted_by,
            first_evicted_at=miss.first_evicted_at,
            last_evicted_at=miss.last_evicted_at,
            replica_id=replica_id,
        )

    def with_route(self, route_reason: str) -> CacheAttribution:
        """This attribution with the ingress's route reason; a short hit after the router sent the request
        off its prefix's owner under load (``OFF_OWNER_ROUTES``) is blamed on that."""
        cause = "ring_walk" if route_reason in OFF_OWNER_ROUTES and self.is_short else self.cause
        return replace(self, route_reason=route_reason, cause=cause)


@dataclass(frozen=True)
class PrefillResult:
    """What a prefill replica returns: the first token and, unless the request already ended, its KV."""

    request_id: str
    replica_id: str
    first_token_id: int
    # The engine's answer, never re-derived: "prefilled" (decode goes on from ``handle``), or why the first
    # token ends the request ("stop", "eos", "length", "context").
    finish_reason: str
    handle: KVHandle | None  # pinned KV for the decode side; None when nothing is left to decode
    num_prompt_tokens: int
    num_cached_tokens: int
    queue_ms: float  # arrival at the replica -> first prefill step
    prefill_ms: float  # first prefill step -> first token
    # The first token's text, held back as the engine holds it (a possible stop-string start, an
    # incomplete UTF-8 character) unless the request ended; the decode side emits the rest.
    first_text: str = ""
    cache: CacheAttribution = field(default_factory=CacheAttribution)  # what the prefill reused, and why not

    @property
    def is_prefilled(self) -> bool:
        """The first token did not end the request: a decode replica continues from ``handle``."""
        return self.handle is not None


@dataclass(frozen=True)
class DecodeRequest:
    """Work for a decode replica: pull ``handle`` (or compute the prompt when it is None) and stream."""

    request: WorkerRequest
    first_token_id: int | None  # None in colocated mode: the decode replica prefills itself
    handle: KVHandle | None
    num_chars_sent: int = 0  # len(PrefillResult.first_text): the decode engine does not emit them again
    # A migrated stream (cluster.migration): the output tokens the client already has before
    # first_token_id (all of them when first_token_id is None); the KV of prompt + these is in ``handle``
    # (or is recomputed), and num_chars_sent counts their text too.
    resumed_output_ids: tuple[int, ...] = ()

    @property
    def known_output_ids(self) -> tuple[int, ...]:
        """Every output token the client already has (resumed ones, then the first token)."""
        first = () if self.first_token_id is None else (self.first_token_id,)
        return self.resumed_output_ids + first


@dataclass
class DecodeChunk:
    """One streamed message from a decode replica: every token produced since the previous one."""

    token_ids: list[int]
    text: str = ""  # the engine's text of these tokens (coalesced chunks: concatenated)
    finished: bool = False
    finish_reason: str | None = None
    replica_id: str = ""
    kv_transport: str = ""  # backend that moved the KV, "recompute" after a failed pull, "" colocated
    kv_transfer_ms: float = 0.0
    is_transfer_report: bool = False  # the first message after the pull: the prefill side may release
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    queue_ms: float = 0.0
    prefill_ms: float = 0.0  # colocated / recompute only
    error: str | None = None
    is_heartbeat: bool = False  # no tokens: "this replica is alive" while a stream waits (cluster.migration)
