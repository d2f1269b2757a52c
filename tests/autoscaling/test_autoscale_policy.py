"""Pure-logic tests of the per-pool scaling decision (no Ray)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.autoscaling import (
    KV_BLOCKS_USED_FRACTION,
    QUEUED_PREFILL_TOKENS,
    RUNNING_REQUESTS,
    DecodePolicyConfig,
    HysteresisBand,
    MetricTarget,
    PoolObservation,
    PrefillPolicyConfig,
    decide_num_replicas,
    hold_decode_while_prefill_backlogged,
    policy_config_from_kwargs,
)

PREFILL = PrefillPolicyConfig(target_queued_prefill_tokens_per_replica=1000.0,
                              target_running_requests_per_replica=10.0)
DECODE = DecodePolicyConfig(target_kv_blocks_used_fraction=0.5, target_running_requests_per_replica=32.0)


def _obs(metrics: dict[str, list[float]], *, running: int, target: int | None = None,
         min_replicas: int = 1, max_replicas: int = 16) -> PoolObservation:
    return PoolObservation(num_running_replicas=running,
                           target_num_replicas=running if target is None else target,
                           min_replicas=min_replicas, max_replicas=max_replicas, metrics=metrics)


def _prefill(obs: PoolObservation):
    return decide_num_replicas(obs, PREFILL.targets(), PREFILL.band())


def test_prefill_scales_up_to_the_replicas_the_backlog_needs() -> None:
    # 1 replica with 3,500 queued tokens against a target of 1,000 per replica: 3.5 replicas' worth.
    decision = _prefill(_obs({QUEUED_PREFILL_TOKENS: [3500.0], RUNNING_REQUESTS: [4.0]}, running=1))
    assert (decision.num_replicas, decision.reason) == (4, "up")
    assert decision.load == pytest.approx(3.5)


def test_prefill_scales_on_running_requests_when_that_binds() -> None:
    # Tokens are low, but 2 replicas hold 50 requests against 10 each: 5 replicas' worth.
    metrics = {QUEUED_PREFILL_TOKENS: [10.0, 10.0], RUNNING_REQUESTS: [25.0, 25.0]}
    decision = _prefill(_obs(metrics, running=2))
    assert (decision.num_replicas, decision.reason) == (5, "up")


@pytest.mark.parametrize("num_replicas", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("utilization", [0.5, 0.75, 1.0, 1.19999, 1.2])
def test_no_change_inside_the_hysteresis_band(num_replicas: int, utilization: float) -> None:
    per_replica = 1000.0 * utilization
    decision = _prefill(_obs({QUEUED_PREFILL_TOKENS: [per_replica] * num_replicas}, running=num_replicas))
    assert decision.num_replicas == num_replicas
    assert decision.reason == "hold:band"


def test_scale_down_just_below_the_band_and_up_just_above_it() -> None:
    below = _prefill(_obs({QUEUED_PREFILL_TOKENS: [490.0] * 4}, running=4))  # load 1.96
    assert (below.num_replicas, below.reason) == (2, "down")
    above = _prefill(_obs({QUEUED_PREFILL_TOKENS: [1210.0] * 4}, running=4))  # load 4.84
    assert (above.num_replicas, above.reason) == (5, "up")


def _decide_after_spreading(total_tokens: float, num_replicas: int, min_replicas: int,
                            max_replicas: int) -> int:
    obs = _obs({QUEUED_PREFILL_TOKENS: [total_tokens / num_replicas] * num_replicas}, running=num_replicas,
               min_replicas=min_replicas, max_replicas=max_replicas)
    return _prefill(obs).num_replicas


def _assert_stable(total_tokens: float, num_replicas: int, min_replicas: int, max_replicas: int) -> None:
    # Apply a decision, spread the same total load over the new replica count, decide again:
    # the second decision must not move (the band plus the shared ceil(load) target make it stable).
    num_replicas = max(min_replicas, min(max_replicas, num_replicas))
    first = _decide_after_spreading(total_tokens, num_replicas, min_replicas, max_replicas)
    assert min_replicas <= first <= max_replicas
    second = _decide_after_spreading(total_tokens, first, min_replicas, max_replicas)
    assert second == first, (total_tokens, num_replicas, first, second)


def test_a_constant_load_never_flaps_on_a_grid() -> None:
    # Every load from 0 to 16 replicas' worth in steps of 0.05, every start from 1 to 10 replicas,
    # several bounds: the narrow windows where an off-by-one would flap (e.g. load 1.2..1.5 from 1
    # replica) are all visited.
    for min_replicas, max_replicas in ((1, 16), (1, 3), (2, 8), (3, 3)):
        for num_replicas in range(1, 11):
            for twentieths in range(0, 321):
                _assert_stable(twentieths * 50.0, num_replicas, min_replicas, max_replicas)


@settings(max_examples=200, deadline=None)
@given(
    num_replicas=st.integers(1, 64),
    total_tokens=st.floats(0.0, 100_000.0, allow_nan=False),
    min_replicas=st.integers(0, 4),
    extra=st.integers(0, 64),
)
def test_a_constant_load_never_flaps(num_replicas: int, total_tokens: float, min_replicas: int,
                                     extra: int) -> None:
    _assert_stable(total_tokens, num_replicas, max(1, min_replicas), max(1, min_replicas) + extra)


def test_bounds_are_respected() -> None:
    up = _prefill(_obs({QUEUED_PREFILL_TOKENS: [50_000.0]}, running=1, max_replicas=3))
    assert (up.num_replicas, up.reason) == (3, "up")
    at_max = _prefill(_obs({QUEUED_PREFILL_TOKENS: [50_000.0] * 3}, running=3, max_replicas=3))
    assert (at_max.num_replicas, at_max.reason) == (3, "hold:bounds")
    down = _prefill(_obs({QUEUED_PREFILL_TOKENS: [0.0] * 6}, running=6, min_replicas=2))
    assert (down.num_replicas, down.reason) == (2, "down")
    # A target outside new (capacity-adjusted) bounds is pulled back inside even on hold.
    held = _prefill(_obs({}, running=5, target=5, max_replicas=4))
    assert held.num_replicas == 4


def test_no_replica_reported_holds_the_current_target() -> None:
    decision = _prefill(_obs({}, running=3, target=3))
    assert (decision.num_replicas, decision.reason, decision.load) == (3, "hold:no-metrics", None)
    # NaN / inf reports carry no signal either.
    nan = _prefill(_obs({QUEUED_PREFILL_TOKENS: [math.nan, math.inf]}, running=2))
    assert (nan.num_replicas, nan.reason) == (2, "hold:no-metrics")


def test_missing_reports_allow_scale_up_but_not_scale_down() -> None:
    # 3 running, only 1 has reported: its 5,000 tokens alone are a lower bound that needs 5 replicas.
    up = _prefill(_obs({QUEUED_PREFILL_TOKENS: [5000.0]}, running=3))
    assert (up.num_replicas, up.reason) == (5, "up")
    # Same 3 running, 1 reported with an idle queue: the other two are unknown, so no scale-down.
    partial = _prefill(_obs({QUEUED_PREFILL_TOKENS: [0.0]}, running=3))
    assert (partial.num_replicas, partial.reason) == (3, "hold:incomplete")
    # Once all have reported idle, it scales down.
    full = _prefill(_obs({QUEUED_PREFILL_TOKENS: [0.0, 0.0, 0.0]}, running=3))
    assert (full.num_replicas, full.reason) == (1, "down")


def test_a_metric_no_replica_reports_is_ignored_not_blocking() -> None:
    # Replicas report only running_requests: scale-down on it still works.
    decision = _prefill(_obs({RUNNING_REQUESTS: [1.0, 1.0, 1.0, 1.0]}, running=4))
    assert (decision.num_replicas, decision.reason) == (1, "down")


def test_an_in_flight_scale_up_is_not_cancelled_by_a_hold() -> None:
    # Serve's target is already 4 while 2 replicas run; load 2.2 is inside the band for 2 replicas.
    decision = _prefill(_obs({QUEUED_PREFILL_TOKENS: [1100.0, 1100.0]}, running=2, target=4))
    assert decision.num_replicas == 4
    # An up decision never lowers the in-flight target either.
    up = _prefill(_obs({QUEUED_PREFILL_TOKENS: [1500.0, 1500.0]}, running=2, target=4))
    assert up.num_replicas == 4


def test_decode_scales_on_kv_usage() -> None:
    decide = lambda obs: decide_num_replicas(obs, DECODE.targets(), DECODE.band())  # noqa: E731
    # 2 replicas at 90 % KV against a 50 % target: 3.6 replicas' worth.
    hot = decide(_obs({KV_BLOCKS_USED_FRACTION: [0.9, 0.9], RUNNING_REQUESTS: [8.0, 8.0]}, running=2))
    assert (hot.num_replicas, hot.reason) == (4, "up")
    # KV is fine but the batch is long: running_requests binds (3 x 60 / 32 = 5.6).
    busy = decide(_obs({KV_BLOCKS_USED_FRACTION: [0.3] * 3, RUNNING_REQUESTS: [60.0] * 3}, running=3))
    assert (busy.num_replicas, busy.reason) == (6, "up")
    idle = decide(_obs({KV_BLOCKS_USED_FRACTION: [0.05] * 4, RUNNING_REQUESTS: [1.0] * 4}, running=4))
    assert (idle.num_replicas, idle.reason) == (1, "down")


def test_decode_is_held_while_prefill_is_backlogged() -> None:
    decode = decide_num_replicas(_obs({KV_BLOCKS_USED_FRACTION: [0.05] * 4}, running=4),
                                 DECODE.targets(), DECODE.band())
    assert decode.num_replicas == 1
    backlogged = _prefill(_obs({QUEUED_PREFILL_TOKENS: [3000.0]}, running=1))
    calm = _prefill(_obs({QUEUED_PREFILL_TOKENS: [900.0]}, running=1))
    held = hold_decode_while_prefill_backlogged(backlogged, PREFILL.band(), decode, 4)
    assert (held.num_replicas, held.reason) == (4, "hold:prefill-backlog")
    assert hold_decode_while_prefill_backlogged(calm, PREFILL.band(), decode, 4) == decode
    # A prefill pool that has not reported yet is no licence to shrink decode either.
    unknown = _prefill(_obs({}, running=1))
    held_unknown = hold_decode_while_prefill_backlogged(unknown, PREFILL.band(), decode, 4)
    assert (held_unknown.num_replicas, held_unknown.reason) == (4, "hold:prefill-unknown")
    # Scale-up of decode is never held back by the rule.
    up = decide_num_replicas(_obs({KV_BLOCKS_USED_FRACTION: [0.95]}, running=1),
                             DECODE.targets(), DECODE.band())
    assert hold_decode_while_prefill_backlogged(backlogged, PREFILL.band(), up, 1) == up


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"target_queued_prefill_tokens_per_replica": 0}, "target_queued_prefill_tokens_per_replica"),
        ({"target_running_requests_per_replica": -1}, "target_running_requests_per_replica"),
        ({"upscale_threshold": 0.9}, "upscale_threshold"),
        ({"downscale_threshold": 1.0}, "downscale_threshold"),
        ({"target_queued_prefil_tokens_per_replica": 10}, "target_queued_prefil_tokens_per_replica"),
    ],
)
def test_bad_prefill_policy_kwargs_name_the_field(kwargs: dict[str, float], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        policy_config_from_kwargs(PrefillPolicyConfig, kwargs)


def test_bad_decode_policy_kwargs_name_the_field() -> None:
    with pytest.raises(ValueError, match="target_kv_blocks_used_fraction"):
        policy_config_from_kwargs(DecodePolicyConfig, {"target_kv_blocks_used_fraction": 1.5})
    config = policy_config_from_kwargs(DecodePolicyConfig, {"target_kv_blocks_used_fraction": 0.6})
    assert config.targets()[0] == MetricTarget(KV_BLOCKS_USED_FRACTION, 0.6)


def test_observation_and_band_validation() -> None:
    with pytest.raises(ValueError, match="max_replicas"):
        _obs({}, running=1, min_replicas=3, max_replicas=2)
    with pytest.raises(ValueError, match="num_running_replicas"):
        _obs({}, running=-1, target=1)
    with pytest.raises(ValueError, match="downscale_threshold"):
        HysteresisBand(downscale_threshold=-0.1)
    with pytest.raises(ValueError, match="at least one"):
        decide_num_replicas(_obs({}, running=1), (), HysteresisBand())
