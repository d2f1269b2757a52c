"""cluster.rate_limit on a fake clock: token buckets charged at admission (input) and per token (output)."""

from __future__ import annotations

import pytest

from cluster.rate_limit import MAX_BUCKETS, NeverFits, RateLimitConfig, RateLimited, RateLimiter, TokenBucket


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _limiter(clock: FakeClock, **default: int) -> RateLimiter:
    return RateLimiter(RateLimitConfig.model_validate({"default": default}), clock)


def test_bucket_refills_at_its_rate_up_to_capacity() -> None:
    bucket = TokenBucket(capacity=60, rate=1.0, now=0.0)
    bucket.level = -30
    assert bucket.seconds_until(10, now=0.0) == 40
    assert bucket.refill(20.0) == -10
    assert bucket.refill(1e6) == 60


def test_input_is_charged_at_admission_and_refused_with_the_wait() -> None:
    clock = FakeClock()
    limiter = _limiter(clock, input_tokens_per_minute=600)  # 10 tokens/s, 600 burst
    limiter.admit("a", 500)
    with pytest.raises(RateLimited) as refused:
        limiter.admit("a", 200)  # 100 left: 100 more needed at 10/s
    assert refused.value.retry_after_s == pytest.approx(10.0)
    assert "input tokens per minute (600)" in refused.value.message
    clock.now += 9.9
    with pytest.raises(RateLimited):
        limiter.admit("a", 200)
    clock.now += 0.2
    limiter.admit("a", 200)  # the refused attempts charged nothing
    limiter.admit("b", 600)  # each tenant has its own bucket


def test_a_prompt_over_the_whole_budget_never_fits() -> None:
    limiter = _limiter(FakeClock(), input_tokens_per_minute=100)
    with pytest.raises(NeverFits, match="101 tokens is over"):
        limiter.admit("a", 101)


def test_output_is_charged_per_token_and_debt_blocks_admission_until_paid() -> None:
    clock = FakeClock()
    limiter = _limiter(clock, output_tokens_per_minute=60)  # 1 token/s
    limiter.admit("a", 5)
    for _ in range(90):  # a running stream is never cut: 30 tokens of debt
        limiter.charge_output("a", 1)
    with pytest.raises(RateLimited) as refused:
        limiter.admit("a", 5)
    assert refused.value.retry_after_s == pytest.approx(30.0, abs=1e-6)
    assert "output tokens per minute (60)" in refused.value.message
    clock.now += 30.5
    limiter.admit("a", 5)


def test_tenant_entry_replaces_the_default_and_unlimited_tenants_get_no_bucket() -> None:
    config = RateLimitConfig.model_validate(
        {"default": {"input_tokens_per_minute": 10}, "tenants": {"big": {"output_tokens_per_minute": 5}}}
    )
    limiter = RateLimiter(config, FakeClock())
    limiter.admit("big", 1000)  # its entry has no input limit
    with pytest.raises(RateLimited):
        limiter.admit("small", 8) or limiter.admit("small", 8)
    off = RateLimiter(RateLimitConfig(), FakeClock())
    off.admit("x", 10**9)
    off.charge_output("x", 10**9)
    assert not off.is_enabled and off.num_buckets == 0


def test_bucket_table_stays_bounded_under_many_tenant_names() -> None:
    clock = FakeClock()
    limiter = _limiter(clock, input_tokens_per_minute=60)
    for index in range(3 * MAX_BUCKETS):
        limiter.admit(f"t{index}", 1)
        clock.now += 1.0  # each earlier bucket refills to full and may be dropped
    assert limiter.num_buckets <= MAX_BUCKETS
