"""Per-pool autoscaling policies for the prefill and decode deployments (Ray Serve custom policies).

The two pools saturate on different resources, so each has its own policy:

* prefill is compute-bound: its backlog is the number of prompt tokens waiting to be prefilled,
  ``queued_prefill_tokens``, plus ``running_requests``;
* decode is memory-bandwidth-bound and limited by KV memory: ``kv_blocks_used_fraction`` (0..1) and
  ``running_requests``.

Both are the same plain decision (:func:`decide_num_replicas`) over a small typed observation
(:class:`PoolObservation`) with a per-pool set of metric targets; ``prefill_policy`` and
``decode_policy`` are the thin adapters that Ray Serve calls with its ``AutoscalingContext``
(``autoscaling_config.policy.policy_function: "cluster.autoscaling:prefill_policy"``). Their knobs
come from the same place in the Serve config, ``policy.policy_kwargs`` (validated by
:class:`PrefillPolicyConfig` / :class:`DecodePolicyConfig`); Serve keeps the kwargs in
``ctx.config.policy.policy_kwargs`` for plain-function policies too.

The decision, per tick:

1. ``load`` = max over the pool's metrics of ``sum(metric over replicas) / target_per_replica``: the
   number of replicas that would put every replica exactly at its target on the binding resource.
2. ``utilization`` = ``load / running replicas``. Inside the hysteresis band
   ``[downscale_threshold, upscale_threshold]`` nothing changes (the current target is held).
3. Above the band: ``ceil(load)`` replicas (never below the current target). Below it: ``ceil(load)``,
   but only when every running replica has reported every metric in use; a replica that has not
   reported yet could hold load we cannot see. A partial sum is a lower bound, so scaling up on it is
   safe, scaling down is not.
4. The result is clamped to Serve's capacity-adjusted ``[min_replicas, max_replicas]``.

Because both directions move to the same count, ``ceil(load)``, a constant load never flaps: after a
move the new count is exactly what the opposite rule would ask for. Serve's own ``upscale_delay_s``,
``downscale_delay_s`` and ``upscaling_factor`` are applied by Serve on top of the returned count.

``PDApplicationPolicy`` is an optional application-level policy (only through a config deploy:
``applications[].autoscaling_policy``) that runs each deployment's own policy and adds one coupling:
the decode pool is not scaled down while the prefill pool is backlogged, because that backlog becomes
decode load a moment later.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, Field

from engine.config import STRICT_FROZEN

logger = logging.getLogger(__name__)

# Metric names: the contract with the prefill/decode deployments' record_autoscaling_stats().
QUEUED_PREFILL_TOKENS = "queued_prefill_tokens"
RUNNING_REQUESTS = "running_requests"
KV_BLOCKS_USED_FRACTION = "kv_blocks_used_fraction"

PREFILL_POLICY_PATH = "cluster.autoscaling:prefill_policy"
DECODE_POLICY_PATH = "cluster.autoscaling:decode_policy"

# Config models are STRICT_FROZEN: unknown fields refused, frozen, no coercion (an int is a valid float).
PositiveFinite = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class MetricTarget(BaseModel):
    """One metric a pool scales on and the value per replica it should settle at."""

    model_config = STRICT_FROZEN

    name: str = Field(min_length=1)
    target_per_replica: PositiveFinite  # the operating point, in the metric's own unit

    def __init__(self, name: str, target_per_replica: float) -> None:
        super().__init__(name=name, target_per_replica=target_per_replica)


class HysteresisBand(BaseModel):
    """Utilization band (load / replicas, 1.0 = every replica at its target) where nothing changes."""

    model_config = STRICT_FROZEN

    # scale down only below this utilization, in [0, 1)
    downscale_threshold: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.5
    # scale up only above this utilization, >= 1 (so the band never inverts)
    upscale_threshold: Annotated[float, Field(ge=1.0, allow_inf_nan=False)] = 1.2


@dataclass(frozen=True)
class PoolObservation:
    """What one policy tick sees of a pool; plain data, built from Serve's context by the adapters."""

    num_running_replicas: int  # replicas Serve counts as running (the ones that can report)
    target_num_replicas: int  # Serve's current target: what "no change" returns (may be mid-scale)
    min_replicas: int  # capacity-adjusted bounds from Serve
    max_replicas: int
    # metric name -> the values of the running replicas that have reported it (missing ones absent)
    metrics: Mapping[str, Sequence[float]]

    def __post_init__(self) -> None:
        for name in ("num_running_replicas", "target_num_replicas", "min_replicas", "max_replicas"):
            if getattr(self, name) < 0:
                raise ValueError(f"PoolObservation.{name} must be >= 0, got {getattr(self, name)!r}")
        if self.max_replicas < self.min_replicas:
            raise ValueError(
                f"PoolObservation.max_replicas ({self.max_replicas}) must be >= min_replicas "
                f"({self.min_replicas})"
            )


@dataclass(frozen=True)
class ScalingDecision:
    """A policy's answer: the replica count and why (kept in the policy state for debugging)."""

    num_replicas: int
    reason: str  # "up" | "down" | "hold:band" | "hold:no-metrics" | "hold:incomplete" | "hold:bounds"
    load: float | None  # replicas' worth of load on the binding metric; None when nothing reported
    utilization: float | None  # load / running replicas


def _clamp(value: int, observation: PoolObservation) -> int:
    return max(observation.min_replicas, min(observation.max_replicas, value))


def decide_num_replicas(
    observation: PoolObservation, targets: Sequence[MetricTarget], band: HysteresisBand
) -> ScalingDecision:
    """Pure decision: the replica count for a pool given its per-replica metrics (see module doc)."""
    if not targets:
        raise ValueError("decide_num_replicas needs at least one MetricTarget")
    hold = _clamp(observation.target_num_replicas, observation)
    loads: list[float] = []
    is_complete = True
    for target in targets:
        values = [v for v in observation.metrics.get(target.name, ()) if math.isfinite(v)]
        if not values:
            continue  # no replica reports this metric (yet): it gives no signal either way
        loads.append(sum(max(0.0, v) for v in values) / target.target_per_replica)
        is_complete = is_complete and len(values) >= observation.num_running_replicas
    if not loads or observation.num_running_replicas == 0:
        return ScalingDecision(hold, "hold:no-metrics", None, None)

    load = max(loads)
    utilization = load / observation.num_running_replicas
    needed = max(1, math.ceil(load - 1e-9))  # 1e-9: 2.0000000001 from float sums is still 2 replicas
    if utilization > band.upscale_threshold:
        decision = ScalingDecision(_clamp(max(needed, observation.target_num_replicas), observation),
                                   "up", load, utilization)
    elif utilization < band.downscale_threshold and needed < observation.target_num_replicas:
        if not is_complete:
            return ScalingDecision(hold, "hold:incomplete", load, utilization)
        decision = ScalingDecision(_clamp(needed, observation), "down", load, utilization)
    else:
        return ScalingDecision(hold, "hold:band", load, utilization)
    if decision.num_replicas == hold:
        return dataclasses.replace(decision, reason="hold:bounds")
    return decision


# ---- per-pool configuration (Serve: autoscaling_config.policy.policy_kwargs) ----


class _PolicyConfig(HysteresisBand):
    """A pool policy's knobs: its hysteresis band plus per-pool targets (``targets``)."""

    def band(self) -> HysteresisBand:
        """The hysteresis band."""
        return HysteresisBand(
            downscale_threshold=self.downscale_threshold, upscale_threshold=self.upscale_threshold
        )


class PrefillPolicyConfig(_PolicyConfig):
    """Knobs of the prefill pool policy; every field can be set in ``policy_kwargs``."""

    # Prompt tokens waiting per replica at the operating point: about (prefill tokens/s of one replica)
    # x (queueing delay you accept before TTFT suffers). 8192 ~ 0.25 s on an H100 for an 8B model.
    target_queued_prefill_tokens_per_replica: PositiveFinite = 8192.0
    # Requests admitted or queued per replica at the operating point.
    target_running_requests_per_replica: PositiveFinite = 16.0

    def targets(self) -> tuple[MetricTarget, ...]:
        """The metrics this pool scales on."""
        return (
            MetricTarget(QUEUED_PREFILL_TOKENS, self.target_queued_prefill_tokens_per_replica),
            MetricTarget(RUNNING_REQUESTS, self.target_running_requests_per_replica),
        )


class DecodePolicyConfig(_PolicyConfig):
    """Knobs of the decode pool policy; every field can be set in ``policy_kwargs``."""

    # Fraction of KV blocks in use per replica at the operating point; the band's upper edge
    # (0.7 x 1.2 = 0.84 by default) leaves room for running sequences to grow before preemption.
    target_kv_blocks_used_fraction: Annotated[float, Field(gt=0.0, le=1.0)] = 0.7
    # Sequences in the continuous batch per replica at the operating point (bandwidth-bound step time).
    target_running_requests_per_replica: PositiveFinite = 64.0

    def targets(self) -> tuple[MetricTarget, ...]:
        """The metrics this pool scales on."""
        return (
            MetricTarget(KV_BLOCKS_USED_FRACTION, self.target_kv_blocks_used_fraction),
            MetricTarget(RUNNING_REQUESTS, self.target_running_requests_per_replica),
        )


PolicyConfig = TypeVar("PolicyConfig", PrefillPolicyConfig, DecodePolicyConfig)


def policy_config_from_kwargs(config_type: type[PolicyConfig], kwargs: Mapping[str, Any]) -> PolicyConfig:
    """Build and validate a policy config from ``policy_kwargs``; unknown keys are errors naming the key."""
    return config_type.model_validate(dict(kwargs))


@lru_cache(maxsize=64)
def _cached_config(config_type: type[PolicyConfig], kwargs_json: str) -> PolicyConfig:
    # Called every control-loop tick (~0.1 s): parse each distinct kwargs once.
    return policy_config_from_kwargs(config_type, json.loads(kwargs_json))


# ---- Ray Serve adapters ----


def observe(ctx: Any) -> PoolObservation:
    """Read a :class:`PoolObservation` from a Ray Serve ``AutoscalingContext``."""
    aggregated: Mapping[str, Mapping[Any, float]] = ctx.aggregated_metrics or {}
    running = list(ctx.running_replicas)
    metrics = {
        name: [float(per_replica[r]) for r in running if per_replica.get(r) is not None]
        for name, per_replica in aggregated.items()
    }
    return PoolObservation(
        num_running_replicas=len(running),
        target_num_replicas=int(ctx.target_num_replicas),
        min_replicas=int(ctx.capacity_adjusted_min_replicas),
        max_replicas=int(ctx.capacity_adjusted_max_replicas),
        metrics=metrics,
    )


def _policy_kwargs(ctx: Any) -> dict[str, Any]:
    policy = getattr(ctx.config, "policy", None) if ctx.config is not None else None
    return dict(getattr(policy, "policy_kwargs", None) or {})


def _run_policy(ctx: Any, config_type: type[PolicyConfig]) -> tuple[int, dict[str, Any]]:
    config = _cached_config(config_type, _kwargs_json(ctx))
    decision = decide_num_replicas(observe(ctx), config.targets(), config.band())
    state = dict(ctx.policy_state or {})
    state["pdserve_last_decision"] = asdict(decision)
    return decision.num_replicas, state


def prefill_policy(ctx: Any) -> tuple[int, dict[str, Any]]:
    """Ray Serve deployment policy for the prefill pool (``cluster.autoscaling:prefill_policy``)."""
    return _run_policy(ctx, PrefillPolicyConfig)


def decode_policy(ctx: Any) -> tuple[int, dict[str, Any]]:
    """Ray Serve deployment policy for the decode pool (``cluster.autoscaling:decode_policy``)."""
    return _run_policy(ctx, DecodePolicyConfig)


# ---- application-level policy (config deploy only: applications[].autoscaling_policy) ----


def hold_decode_while_prefill_backlogged(
    prefill: ScalingDecision, prefill_band: HysteresisBand, decode: ScalingDecision,
    decode_target_num_replicas: int,
) -> ScalingDecision:
    """Cross-pool rule: no decode scale-down while prefill is backlogged, or while prefill has not reported.

    A prefill backlog (utilization above its upscale threshold) is decode load a few hundred
    milliseconds later; shrinking decode then would trade a short-lived KV dip for a scale-up (and cold
    replicas) right after. A prefill pool with no metrics yet (start-up) is treated the same way: no
    information is no licence to remove decode capacity.
    """
    if prefill.utilization is None:
        reason = "hold:prefill-unknown"
    elif prefill.utilization > prefill_band.upscale_threshold:
        reason = "hold:prefill-backlog"
    else:
        return decode
    if decode.num_replicas < decode_target_num_replicas:
        return dataclasses.replace(decode, num_replicas=decode_target_num_replicas, reason=reason)
    return decode


class PDApplicationPolicy:
    """Application-level policy seeing both pools; Serve instantiates it once with ``policy_kwargs``.

    Each deployment is decided by the policy its own ``autoscaling_config.policy.policy_function``
    names (``prefill_policy``, ``decode_policy``, or Serve's default for others such as the ingress),
    with that deployment's own ``policy_kwargs``; then :func:`hold_decode_while_prefill_backlogged`
    couples the two pools. Serve applies each deployment's delays and bounds to the result.
    """

    def __init__(self, hold_decode_while_prefill_backlogged: bool = True) -> None:
        self.is_coupled = bool(hold_decode_while_prefill_backlogged)

    def __call__(self, contexts: Mapping[Any, Any]) -> tuple[dict[Any, int], dict[Any, dict[str, Any]]]:
        """Decide every autoscaling deployment of the application; returns (counts, states) by id."""
        from ray.serve.autoscaling_policy import replica_queue_length_autoscaling_policy

        counts: dict[Any, int] = {}
        states: dict[Any, dict[str, Any]] = {}
        prefill: list[tuple[ScalingDecision, HysteresisBand]] = []
        decode: dict[Any, ScalingDecision] = {}
        for deployment_id, ctx in contexts.items():
            path = getattr(getattr(ctx.config, "policy", None), "policy_function", None)
            if path not in (PREFILL_POLICY_PATH, DECODE_POLICY_PATH):
                num_replicas, state = replica_queue_length_autoscaling_policy(ctx)
                counts[deployment_id], states[deployment_id] = math.ceil(num_replicas), dict(state)
                continue
            config_type = PrefillPolicyConfig if path == PREFILL_POLICY_PATH else DecodePolicyConfig
            pool_config = _cached_config(config_type, _kwargs_json(ctx))
            decision = decide_num_replicas(observe(ctx), pool_config.targets(), pool_config.band())
            if path == PREFILL_POLICY_PATH:
                prefill.append((decision, pool_config.band()))
            else:
                decode[deployment_id] = decision
            counts[deployment_id] = decision.num_replicas
            states[deployment_id] = {**(ctx.policy_state or {}), "pdserve_last_decision": asdict(decision)}
        for deployment_id, decision in decode.items():
            for prefill_decision, prefill_band in prefill if self.is_coupled else ():
                decision = hold_decode_while_prefill_backlogged(
                    prefill_decision, prefill_band, decision, int(contexts[deployment_id].target_num_replicas)
                )
            counts[deployment_id] = decision.num_replicas
            states[deployment_id]["pdserve_last_decision"] = asdict(decision)
        return counts, states


def _kwargs_json(ctx: Any) -> str:
    return json.dumps(_policy_kwargs(ctx), sort_keys=True)
