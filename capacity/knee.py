"""The concurrency knee predicted two ways, for the sweep ``pdserve bench --concurrency 1,2,4,...`` runs:

* **planner** (closed form): a closed loop of C requests cycles through prefill (one server, service
  S per request), the KV transfer T and decode ((output - 1) steps at the batch N in decode). The
  throughput X solves ``X = min(C / (S + T + D(N)), 1 / S)`` with ``N = X x D(N)`` (Little's law) and
  ``D(N) = (output - 1) x step(N)``, N capped by the decode worker's KV blocks and max_num_seqs;
  iterated to a fixed point.
* **simulator**: ``capacity.sim`` in closed loop at each level (the real router and scheduler rules).

Both use the same cost model (a calibration of this machine's engine) and the knee rule of
``cluster.bench.sweep.find_knee``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from capacity.costs import CostModel, decode_step, prefill_step
from capacity.sim import PoolShape, SimConfig, Simulation
from capacity.workload import SimRequest
from cluster.bench.sweep import find_knee, latency_fields
from engine.scheduling_rules import blocks_for
from router import RouterConfig


def planner_throughput(
    cost: CostModel,
    concurrency: int,
    input_len: int,
    output_len: int,
    kv_blocks: int,
    block_size: int,
    max_num_seqs: int,
) -> dict[str, float]:
    """Closed-loop output tokens/s, TTFT and TPOT at ``concurrency`` (see the module docstring)."""
    service = cost.step_s(prefill_step([(0, input_len)]))
    transfer = cost.transfer_s(input_len * cost.kv_bytes_per_token)
    cap = min(max_num_seqs, kv_blocks // blocks_for(input_len + output_len, block_size), concurrency)
    batch = float(min(concurrency, cap))
    throughput = 0.0
    for _ in range(200):
        step = cost.step_s(
            decode_step(max(1, round(batch)), max(1, round(batch)) * (input_len + output_len / 2))
        )
        decode = (output_len - 1) * step
        throughput = min(concurrency / (service + transfer + decode), 1.0 / service)
        new_batch = min(cap, throughput * decode)
        if abs(new_batch - batch) < 1e-3:
            break
        batch = 0.5 * (batch + new_batch)
    in_prefill = max(0.0, concurrency - throughput * (transfer + decode))
    ttft = in_prefill / throughput if throughput else 0.0  # Little's law on the prefill station
    return {
        "concurrency": concurrency,
        "output_tokens_per_s": throughput * output_len,
        "ttft_p50_ms": max(ttft, service) * 1e3,
        "tpot_p50_ms": (transfer + decode) / (output_len - 1) * 1e3,
    }


def simulated_sweep(
    cost: CostModel,
    levels: Sequence[int],
    input_len: int,
    output_len: int,
    kv_blocks: int,
    block_size: int = 16,
    max_num_batched_tokens: int = 2048,
    max_num_seqs: int = 64,
    requests_per_level: int = 4,
) -> list[dict[str, Any]]:
    """One closed-loop simulation per level (``requests_per_level`` x the level requests, at least 8)."""
    rows = []
    for concurrency in levels:
        shape = PoolShape(1, kv_blocks, max_num_batched_tokens, max_num_seqs)
        config = SimConfig(
            shape,
            shape,
            block_size,
            512,
            RouterConfig(policy="round_robin", block_size=block_size),
            concurrency=concurrency,
            sample_period_s=0.5,
        )
        count = max(8, requests_per_level * concurrency)
        requests = [SimRequest(i, 0.0, input_len, output_len, ((1 << 40) + i,)) for i in range(count)]
        metrics = Simulation(config, cost).run(requests)
        summary = metrics.summary()
        decode = summary["pools"].get("decode", {})
        rows.append(
            {
                "concurrency": concurrency,
                "output_tokens_per_s": summary["output_token_throughput"],
                **latency_fields(summary),
                "kv_used_share": decode.get("kv_used"),
            }
        )
    return rows


def predicted_knees(
    cost: CostModel,
    levels: Sequence[int],
    input_len: int,
    output_len: int,
    kv_blocks: int,
    block_size: int = 16,
    max_num_seqs: int = 64,
) -> dict[str, Any]:
    """Planner and simulator rows and knees for the sweep's levels."""
    planner = [
        planner_throughput(cost, c, input_len, output_len, kv_blocks, block_size, max_num_seqs)
        for c in levels
    ]
    simulator = simulated_sweep(
        cost, levels, input_len, output_len, kv_blocks, block_size, max_num_seqs=max_num_seqs
    )
    return {
        "planner": {"rows": planner, "knee": find_knee(levels, [r["output_tokens_per_s"] for r in planner])},
        "simulator": {
            "rows": simulator,
            "knee": find_knee(levels, [r["output_tokens_per_s"] for r in simulator]),
        },
    }
