"""Router configuration: one frozen, validated pydantic model.

Watermarks are in **queued prefill tokens** (what a prefill worker still has to compute: the uncached
tokens of its waiting requests plus what is left of the running ones), because that is what turns
into time-to-first-token for the next request. Each watermark is the larger of an absolute floor and
a multiple of the pool's mean:

    high(pool) = max(high_watermark_tokens, high_load_factor * mean_queued_tokens)
    low(pool)  = max(low_watermark_tokens,  low_load_factor  * mean_queued_tokens)

A worker becomes *hot* when a report shows it strictly above ``high`` and becomes *cool* again only
when a report shows it strictly below ``low`` (hysteresis: between the two it keeps its state). The
absolute floors keep the router on the cache owner while queues are short (a few thousand tokens
queued cost a few milliseconds on a GPU; losing the cache costs more); the relative part is the
"bounded load" of consistent hashing with bounded loads (Mirrokni et al., 2018): under heavy load no
worker is sent work while it holds more than ``high_load_factor`` times the mean. Set a factor to 0 to
use the absolute floor alone.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

RouterPolicy = Literal["cache_aware", "prefix_hash", "round_robin", "least_loaded", "consistent_hash"]
"""The router's policies: the one list of their names."""

PositiveInt = Annotated[int, Field(gt=0)]
NonNegative = Annotated[float, Field(ge=0)]


class RouterConfig(BaseModel):
    """How the router picks prefill and decode workers (the cluster YAML's ``router:`` section).

    Attributes:
        policy: ``"cache_aware"`` (default: expected cached tokens from the workers' prefix summaries
            against their queued work, ring for prefixes nobody holds, hot prefixes split; see
            docs/router.md), ``"prefix_hash"`` (ring owner of the prompt's prefix key, load-watermark
            fallback),
            ``"round_robin"``, ``"least_loaded"`` (fewest queued prefill tokens) or
            ``"consistent_hash"`` (ring owner always, no load fallback; a baseline).
        block_size: tokens per KV block; must equal the engine's block size so the prefix key is
            the chain hash the workers compute (the cluster config derives it from ``engine.block_size``).
        prefix_depth_blocks: how many leading full blocks the prefix key covers (fewer if the prompt
            has fewer). Deep enough to get past prompts' shared preamble (system prompt) so that
            distinct conversations spread over the ring; each block costs one BLAKE2b call (~2 us).
        virtual_nodes: points per worker on the hash ring (more: smoother key shares).
        high_watermark_tokens: absolute floor of the high watermark, in queued prefill tokens.
        low_watermark_tokens: absolute floor of the low watermark; must be below the high one.
        high_load_factor: relative high watermark as a multiple of the pool's mean queued prefill
            tokens (bounded load, ``1 + epsilon``); 0 disables the relative part.
        low_load_factor: relative low watermark; below ``high_load_factor`` when that is on.
        hash_seed: seeds the ring's virtual-node positions; every ingress replica must use the same.
        load_report_period_s: how often replicas publish the load reports the router reads.
        replicate_margin_tokens: cache_aware: a prompt leaves the holders of its prefix (a new copy
            goes along the ring) only when the best holder's cost exceeds the cheapest worker's by
            more than this (cost = queued tokens + uncached prompt tokens).
        replicate_margin_factor: cache_aware: the margin above is at most this many times the
            tokens the holders have cached (a short shared preamble is no reason to queue); 0: off
            (the default: on the Mooncake replay any factor up to 16 cost hit rate).
        split_margin_tokens: cache_aware: another holder of the prefix takes the prompt instead of
            the primary (first holder along the ring) only when it is cheaper by more than this.
        new_prefix_slack_tokens: cache_aware: a prefix nobody holds goes to the first worker along
            its ring walk whose cost is within this of the cheapest.
        new_prefix_work_factor: cache_aware: a prefix nobody holds skips (along its ring walk) a
            worker whose work taken on (prompt tokens computed since it started plus queued ones,
            from its reports) exceeds ``max(new_prefix_work_floor_tokens, this * the pool's mean)``:
            consistent hashing with bounded loads on the work each worker's conversations brought,
            since their later turns follow their cache; 0: off. Default 1.0 (epsilon 0: a new
            conversation goes to the first ring worker, among those that can start it soonest, that
            has not taken on more than its share; see docs/router.md).
        new_prefix_work_floor_tokens: cache_aware: the absolute floor of that bound (default 8,192,
            about one long prompt: while the pool's mean work is below it, the ring alone places).
        summary_max_keys: cap on the probe keys a worker publishes in one summary.
        summary_period_s: how often a worker rebuilds its summary (between rebuilds it re-sends the
            same one).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    policy: RouterPolicy = "cache_aware"
    block_size: PositiveInt = 16
    prefix_depth_blocks: PositiveInt = 4
    virtual_nodes: PositiveInt = 256
    high_watermark_tokens: int = 8192
    low_watermark_tokens: Annotated[int, Field(ge=0)] = 4096
    high_load_factor: NonNegative = 1.5
    low_load_factor: NonNegative = 1.2
    hash_seed: str = Field("pdserve/ring/v1", min_length=1)
    load_report_period_s: Annotated[float, Field(gt=0)] = 0.2
    replicate_margin_tokens: Annotated[int, Field(ge=0)] = 49152
    replicate_margin_factor: NonNegative = 0.0
    split_margin_tokens: Annotated[int, Field(ge=0)] = 4096
    new_prefix_slack_tokens: Annotated[int, Field(ge=0)] = 0
    new_prefix_work_factor: NonNegative = 1.0
    new_prefix_work_floor_tokens: Annotated[int, Field(ge=0)] = 8192
    summary_max_keys: PositiveInt = 4096
    summary_period_s: Annotated[float, Field(gt=0)] = 1.0

    @model_validator(mode="after")
    def _check_watermarks(self) -> RouterConfig:
        if self.high_watermark_tokens <= self.low_watermark_tokens:
            raise ValueError(
                f"high_watermark_tokens: must be above low_watermark_tokens ({self.low_watermark_tokens}), "
                f"got {self.high_watermark_tokens}"
            )
        work_factor = self.new_prefix_work_factor
        if work_factor != 0 and work_factor < 1:
            raise ValueError(f"new_prefix_work_factor: must be 0 (off) or >= 1, got {work_factor}")
        if self.high_load_factor != 0 and self.high_load_factor < 1:
            raise ValueError(f"high_load_factor: must be 0 (off) or >= 1, got {self.high_load_factor}")
        if self.high_load_factor == 0 and self.low_load_factor != 0:
            raise ValueError(
                f"low_load_factor: must be 0 when high_load_factor is 0 (relative watermark off), "
                f"got {self.low_load_factor}"
            )
        if self.high_load_factor != 0 and self.low_load_factor >= self.high_load_factor:
            raise ValueError(
                f"low_load_factor: must be below high_load_factor ({self.high_load_factor}), "
                f"got {self.low_load_factor}"
            )
        return self

    @property
    def prefix_depth_tokens(self) -> int:
        """Tokens covered by a full-depth prefix key."""
        return self.block_size * self.prefix_depth_blocks
