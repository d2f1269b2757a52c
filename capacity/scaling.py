"""The autoscaling policies of ``cluster.autoscaling``, applied to simulated pools.

Each tick builds the :class:`~cluster.autoscaling.PoolObservation` the Serve adapter would build
(running replicas, the current target, bounds, each replica's reported metrics), asks
``decide_num_replicas`` with the pool's own policy config, and couples the pools with
``hold_decode_while_prefill_backlogged`` as ``PDApplicationPolicy`` does. Colocated clusters scale
their one pool with the decode policy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cluster.autoscaling import (
    KV_BLOCKS_USED_FRACTION,
    QUEUED_PREFILL_TOKENS,
    RUNNING_REQUESTS,
    DecodePolicyConfig,
    PoolObservation,
    PrefillPolicyConfig,
    ScalingDecision,
    decide_num_replicas,
    hold_decode_while_prefill_backlogged,
)

if TYPE_CHECKING:
    from capacity.sim import Simulation


def _observation(sim: Simulation, pool: str) -> PoolObservation:
    scale = sim.config.autoscale
    assert scale is not None
    live = [sim.workers[w] for w in sim.pools[pool] if not sim.workers[w].draining]
    metrics = {
        QUEUED_PREFILL_TOKENS: [float(w.queued_prefill_tokens) for w in live],
        RUNNING_REQUESTS: [float(w.running_requests) for w in live],
        KV_BLOCKS_USED_FRACTION: [w.used_blocks / w.shape.kv_blocks for w in live],
    }
    if pool == "prefill":
        del metrics[KV_BLOCKS_USED_FRACTION]
    return PoolObservation(
        num_running_replicas=len(live), target_num_replicas=len(live) + sim.starting[pool],
        min_replicas=scale.min_replicas, max_replicas=scale.max_replicas, metrics=metrics,
    )  # fmt: skip


def decide_pools(sim: Simulation) -> dict[str, int]:
    """Target replica count per pool for this tick."""
    scale = sim.config.autoscale
    assert scale is not None
    decode_config = DecodePolicyConfig.model_validate(scale.decode_kwargs)
    decode_obs = _observation(sim, "decode")
    decode = decide_num_replicas(decode_obs, decode_config.targets(), decode_config.band())
    if sim.colocated:
        return {"decode": decode.num_replicas}
    prefill_config = PrefillPolicyConfig.model_validate(scale.prefill_kwargs)
    prefill: ScalingDecision = decide_num_replicas(
        _observation(sim, "prefill"), prefill_config.targets(), prefill_config.band()
    )
    decode = hold_decode_while_prefill_backlogged(
        prefill, prefill_config.band(), decode, decode_obs.target_num_replicas
    )
    sim.metrics.decisions.append((sim.now, prefill.reason, decode.reason))
    return {"prefill": prefill.num_replicas, "decode": decode.num_replicas}
