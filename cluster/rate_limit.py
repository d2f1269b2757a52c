"""Per-tenant token rate limits: input and output tokens per minute, one token bucket each.

Each bucket holds up to one minute's worth (``limit``) and refills continuously at ``limit / 60`` per
second, the way OpenAI's TPM limits behave (a burst up to the minute's budget, then a steady rate).

- **Input** tokens are charged at admission: a request is admitted when the tenant's input bucket holds
  its prompt tokens, else refused (RESOURCE_EXHAUSTED / HTTP 429) with the seconds until it will.
  A prompt larger than the whole bucket could never pass: ``NeverFits`` (INVALID_ARGUMENT, naming both).
- **Output** tokens are charged as they are produced (each streamed token). A request is admitted while
  the output bucket is not in debt; a running stream is never cut, so the bucket may go below zero and
  the debt delays the tenant's next admission (the retry hint is the time until it is paid off).

Pure logic with an injected clock (``time.monotonic`` by default), so tests run on a fake clock.
Buckets are kept only for tenants that have a limit; idle, full buckets are dropped once there are
more than ``MAX_BUCKETS`` (a full bucket is the same as a new one), so client-chosen tenant names
cannot grow the table without bound.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

from pydantic import BaseModel, Field

from engine.config import STRICT_FROZEN

Clock = Callable[[], float]
MAX_BUCKETS = 4096

TokensPerMinute = Annotated[int, Field(ge=1)]


class TenantLimits(BaseModel):
    """One tenant's limits; None: unlimited."""

    model_config = STRICT_FROZEN

    input_tokens_per_minute: TokensPerMinute | None = None
    output_tokens_per_minute: TokensPerMinute | None = None


class RateLimitConfig(BaseModel):
    """The ``rate_limits:`` section: ``default`` applies to every tenant without its own entry.

    Example: ``{default: {output_tokens_per_minute: 60000}, tenants: {batch: {input_tokens_per_minute:
    200000}}}`` (a tenant's own entry replaces the default as a whole)."""

    model_config = STRICT_FROZEN

    default: TenantLimits = Field(default_factory=TenantLimits)
    tenants: dict[str, TenantLimits] = Field(default_factory=dict)

    def limits_for(self, tenant: str) -> TenantLimits:
        return self.tenants.get(tenant, self.default)


class RateLimited(Exception):
    """Refused now; ``retry_after_s``: when the bucket will allow it."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s


class NeverFits(Exception):
    """The prompt is larger than the tenant's whole input budget: no wait makes it pass."""


class TokenBucket:
    """``capacity`` tokens, refilled at ``rate`` per second; the level may go negative (debt)."""

    def __init__(self, capacity: float, rate: float, now: float) -> None:
        self.capacity = capacity
        self.rate = rate
        self.level = capacity
        self.updated = now

    def refill(self, now: float) -> float:
        """The level at ``now`` (refilled up to the capacity)."""
        if now > self.updated:
            self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
            self.updated = now
        return self.level

    def seconds_until(self, level: float, now: float) -> float:
        """Seconds until the bucket holds at least ``level`` (0 if it does now)."""
        missing = level - self.refill(now)
        return max(0.0, missing / self.rate)

    def is_full(self, now: float) -> bool:
        return self.refill(now) >= self.capacity


@dataclass
class _TenantBuckets:
    input: TokenBucket | None
    output: TokenBucket | None


def _bucket(per_minute: int | None, now: float) -> TokenBucket | None:
    return None if per_minute is None else TokenBucket(float(per_minute), per_minute / 60.0, now)


class RateLimiter:
    """The buckets of every limited tenant: ``admit`` at admission, ``charge_output`` per token."""

    def __init__(self, config: RateLimitConfig, clock: Clock = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self._buckets: dict[str, _TenantBuckets] = {}
        self.is_enabled = _has_limits(config)

    def admit(self, tenant: str, num_prompt_tokens: int) -> None:
        """Charge the prompt to the input bucket, or raise ``RateLimited`` / ``NeverFits`` (then
        nothing is charged)."""
        buckets = self._for(tenant)
        if buckets is None:
            return
        now = self.clock()
        waits = []
        if buckets.input is not None:
            if num_prompt_tokens > buckets.input.capacity:
                raise NeverFits(
                    f"prompt: {num_prompt_tokens} tokens is over tenant {tenant!r}'s whole input limit of "
                    f"{int(buckets.input.capacity)} tokens per minute"
                )
            wait = buckets.input.seconds_until(num_prompt_tokens, now)
            if wait > 0:
                waits.append((wait, f"input tokens per minute ({int(buckets.input.capacity)})"))
        if buckets.output is not None:
            wait = buckets.output.seconds_until(math.ulp(0.0), now)  # out of debt: level > 0
            if wait > 0:
                waits.append((wait, f"output tokens per minute ({int(buckets.output.capacity)})"))
        if waits:
            wait, what = max(waits)
            message = f"rate limit: tenant {tenant!r} is over its {what}; retry after {wait:.1f} s"
            raise RateLimited(message, wait)
        if buckets.input is not None:
            buckets.input.level -= num_prompt_tokens

    def charge_output(self, tenant: str, num_tokens: int) -> None:
        """Tokens produced for ``tenant`` (may take the bucket into debt)."""
        buckets = self._buckets.get(tenant)
        if buckets is not None and buckets.output is not None and num_tokens:
            buckets.output.refill(self.clock())
            buckets.output.level -= num_tokens

    def _for(self, tenant: str) -> _TenantBuckets | None:
        if not self.is_enabled:
            return None
        buckets = self._buckets.get(tenant)
        if buckets is None:
            limits = self.config.limits_for(tenant)
            if limits.input_tokens_per_minute is None and limits.output_tokens_per_minute is None:
                return None
            if len(self._buckets) >= MAX_BUCKETS:
                self._drop_full()
            now = self.clock()
            buckets = _TenantBuckets(
                _bucket(limits.input_tokens_per_minute, now), _bucket(limits.output_tokens_per_minute, now)
            )
            self._buckets[tenant] = buckets
        return buckets

    def _drop_full(self) -> None:
        now = self.clock()
        idle = [
            tenant
            for tenant, buckets in self._buckets.items()
            if all(bucket is None or bucket.is_full(now) for bucket in (buckets.input, buckets.output))
        ]
        for tenant in idle:
            del self._buckets[tenant]

    @property
    def num_buckets(self) -> int:
        return len(self._buckets)


def _has_limits(config: RateLimitConfig) -> bool:
    return any(
        limits.input_tokens_per_minute is not None or limits.output_tokens_per_minute is not None
        for limits in (config.default, *config.tenants.values())
    )
