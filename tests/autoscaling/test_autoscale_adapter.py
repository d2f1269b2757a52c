"""The Serve adapters on real ``AutoscalingContext`` objects, and through Serve's own policy wrappers.

No Ray cluster: the contexts are built by hand the way Serve's controller builds them
(``ray.serve._private.autoscaling_state``); the wrappers are the functions the controller applies to
a custom policy (delays, scaling factors), so these tests also pin how our decisions meet them.
"""

from __future__ import annotations

from typing import Any

import pytest
from ray.serve._private.common import DeploymentID, ReplicaID
from ray.serve.autoscaling_policy import _apply_app_level_autoscaling_config, _apply_autoscaling_config
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from cluster.autoscaling import (
    DECODE_POLICY_PATH,
    KV_BLOCKS_USED_FRACTION,
    PREFILL_POLICY_PATH,
    QUEUED_PREFILL_TOKENS,
    RUNNING_REQUESTS,
    PDApplicationPolicy,
    decode_policy,
    prefill_policy,
)


def _config(policy_path: str | None, kwargs: dict[str, Any] | None = None,
            **overrides: Any) -> AutoscalingConfig:
    fields: dict[str, Any] = {"min_replicas": 1, "max_replicas": 8, "upscale_delay_s": 0.0,
                              "downscale_delay_s": 0.0, **overrides}
    if policy_path is not None:
        fields["policy"] = {"policy_function": policy_path, "policy_kwargs": kwargs or {}}
    return AutoscalingConfig(**fields)


def _context(name: str, config: AutoscalingConfig, metrics: dict[str, list[float | None]], *,
             running: int, target: int | None = None, state: dict[str, Any] | None = None,
             total_num_requests: float = 0.0) -> AutoscalingContext:
    deployment_id = DeploymentID(name=name, app_name="pdserve")
    replicas = [ReplicaID(unique_id=f"{name}-{i}", deployment_id=deployment_id) for i in range(running)]
    # aggregated_metrics: metric -> {ReplicaID: value}; None means "this replica has not reported".
    aggregated = {
        metric: {r: v for r, v in zip(replicas, values, strict=False) if v is not None}
        for metric, values in metrics.items()
    }
    return AutoscalingContext(
        deployment_id=deployment_id, deployment_name=name, app_name="pdserve",
        current_num_replicas=running, target_num_replicas=running if target is None else target,
        running_replicas=replicas, total_num_requests=total_num_requests, total_queued_requests=0.0,
        aggregated_metrics=lambda: aggregated, raw_metrics=None,
        capacity_adjusted_min_replicas=config.min_replicas,
        capacity_adjusted_max_replicas=config.max_replicas,
        policy_state=dict(state or {}), last_scale_up_time=None, last_scale_down_time=None,
        current_time=0.0, config=config,
    )


def test_prefill_policy_reads_metrics_by_replica_id_and_its_kwargs() -> None:
    config = _config(PREFILL_POLICY_PATH, {"target_queued_prefill_tokens_per_replica": 100})
    ctx = _context("prefill", config, {QUEUED_PREFILL_TOKENS: [250.0, 240.0]}, running=2)
    num_replicas, state = prefill_policy(ctx)
    assert num_replicas == 5  # 490 tokens / 100 per replica
    assert state["pdserve_last_decision"]["reason"] == "up"
    # With the default target (8192 tokens) the same backlog is nothing: scale down to 1.
    default_ctx = _context("prefill", _config(PREFILL_POLICY_PATH), {QUEUED_PREFILL_TOKENS: [250.0, 240.0]},
                           running=2)
    assert prefill_policy(default_ctx)[0] == 1


def test_a_replica_that_has_not_reported_blocks_scale_down_only() -> None:
    config = _config(DECODE_POLICY_PATH)
    # 3 running, the middle one has not reported: 0.02 / 0.7 is far below the band, but no scale-down.
    ctx = _context("decode", config, {KV_BLOCKS_USED_FRACTION: [0.01, None, 0.01]}, running=3)
    num_replicas, state = decode_policy(ctx)
    assert (num_replicas, state["pdserve_last_decision"]["reason"]) == (3, "hold:incomplete")
    # One replica reporting 300 running requests (64 per replica is the target) is already 4.7 replicas'
    # worth for 3 running: scale up on the partial sum.
    hot = _context("decode", config, {KV_BLOCKS_USED_FRACTION: [0.9, 0.9, None], RUNNING_REQUESTS: [300.0]},
                   running=3)
    assert decode_policy(hot)[0] == 5


def test_missing_aggregated_metrics_and_user_state_are_handled() -> None:
    config = _config(PREFILL_POLICY_PATH)
    ctx = _context("prefill", config, {}, running=2, state={"mine": 1})
    ctx._aggregated_metrics_value = None  # Serve may hand over no custom metrics at all
    num_replicas, state = prefill_policy(ctx)
    assert num_replicas == 2
    assert state["mine"] == 1 and state["pdserve_last_decision"]["reason"] == "hold:no-metrics"


def test_serve_wrapper_applies_delays_on_top_of_the_decision() -> None:
    # Serve wraps every custom policy with its delay logic: with a 60 s downscale delay the first
    # "down" decision is held, and the upscale path (0 s delay) goes through at once.
    config = _config(PREFILL_POLICY_PATH, {"target_queued_prefill_tokens_per_replica": 100},
                     downscale_delay_s=60.0)
    wrapped = _apply_autoscaling_config(prefill_policy)
    idle = _context("prefill", config, {QUEUED_PREFILL_TOKENS: [0.0, 0.0, 0.0]}, running=3)
    assert wrapped(idle)[0] == 3
    busy = _context("prefill", config, {QUEUED_PREFILL_TOKENS: [400.0, 400.0, 400.0]}, running=3)
    assert wrapped(busy)[0] == 8  # 1,200 tokens / 100 = 12 replicas' worth, clamped to max_replicas=8


def test_serve_wrapper_upscaling_factor_damps_the_step() -> None:
    config = _config(PREFILL_POLICY_PATH, {"target_queued_prefill_tokens_per_replica": 100},
                     upscaling_factor=0.5)
    busy = _context("prefill", config, {QUEUED_PREFILL_TOKENS: [500.0]}, running=1)
    # Our decision is 5; Serve moves half the way: ceil(1 + 0.5 * 4) = 3.
    assert _apply_autoscaling_config(prefill_policy)(busy)[0] == 3


def _app_contexts(prefill_tokens: list[float],
                  decode_kv: list[float]) -> dict[DeploymentID, AutoscalingContext]:
    prefill_config = _config(PREFILL_POLICY_PATH, {"target_queued_prefill_tokens_per_replica": 100})
    prefill = _context("Prefill", prefill_config, {QUEUED_PREFILL_TOKENS: prefill_tokens},
                       running=len(prefill_tokens))
    decode = _context("Decode", _config(DECODE_POLICY_PATH), {KV_BLOCKS_USED_FRACTION: decode_kv},
                      running=len(decode_kv))
    ingress = _context("Ingress", _config(None, target_ongoing_requests=2), {}, running=1,
                       total_num_requests=6.0)
    return {ctx.deployment_id: ctx for ctx in (prefill, decode, ingress)}


@pytest.mark.parametrize("is_coupled", [True, False])
def test_application_policy_holds_decode_while_prefill_is_backlogged(is_coupled: bool) -> None:
    policy = _apply_app_level_autoscaling_config(PDApplicationPolicy(is_coupled))
    contexts = _app_contexts(prefill_tokens=[300.0], decode_kv=[0.01, 0.01, 0.01])
    decisions, states = policy(contexts)
    by_name = {dep.name: n for dep, n in decisions.items()}
    assert by_name["Prefill"] == 3  # 300 tokens / 100
    assert by_name["Ingress"] == 3  # Serve's default policy: 6 ongoing / 2 per replica
    assert by_name["Decode"] == (3 if is_coupled else 1)
    decode_state = states[DeploymentID(name="Decode", app_name="pdserve")]
    expected_reason = "hold:prefill-backlog" if is_coupled else "down"
    assert decode_state["pdserve_last_decision"]["reason"] == expected_reason


def test_application_policy_lets_decode_shrink_when_prefill_is_calm() -> None:
    decisions, _ = _apply_app_level_autoscaling_config(PDApplicationPolicy())(
        _app_contexts(prefill_tokens=[90.0], decode_kv=[0.01, 0.01, 0.01])
    )
    assert {dep.name: n for dep, n in decisions.items()}["Decode"] == 1
