"""``pdserve simulate``: run the cluster simulator (capacity.sim) on a trace or a synthetic workload.

``--calibrate`` times the real engine here first and writes the fitted step costs (JSON) for
``--calibration``; without a calibration the roofline of ``--device`` is used. ``--validate`` runs the
same workload through an embedded cluster (``pdserve bench``) and through the simulator and prints
both side by side with the relative differences (capacity.validate).
"""

from __future__ import annotations

import time
from pathlib import Path

import click

from capacity.cli import _node, cost_model, model_options, resolve_model, stamp, write_json
from capacity.sim import Autoscale, PoolShape, SimConfig, Simulation
from router import RouterConfig


def build_requests(
    trace: str | None,
    rate: float,
    duration: float,
    input_len: float,
    output_len: float,
    sigma: float,
    hit_rate: float,
    length_scale: float,
    time_scale: float,
    unit_tokens: int,
    max_context: int,
    num_requests: int | None,
    seed: int,
):
    from capacity.workload import from_trace, synthetic

    if trace:
        return from_trace(
            trace,
            length_scale=length_scale,
            time_scale=time_scale,
            unit_tokens=unit_tokens,
            max_context=max_context,
            num_requests=num_requests,
        )
    requests = synthetic(
        rate,
        duration,
        input_len,
        output_len,
        hit_rate=hit_rate,
        sigma=sigma,
        unit_tokens=unit_tokens,
        max_context=max_context,
        seed=seed,
    )
    if num_requests is not None:
        import itertools

        return itertools.islice(requests, num_requests)
    return requests


def print_summary(summary: dict, cost_line: str, wall_s: float, sim_s: float, echo=click.echo) -> None:
    echo(f"cost model: {cost_line}")
    echo(f"simulated {sim_s:,.1f} s in {wall_s:,.1f} s wall ({sim_s / max(wall_s, 1e-9):,.1f}x real time)")
    echo("| metric | value |\n|---|---:|")
    for key in (
        "num_completed",
        "request_throughput",
        "output_token_throughput",
        "goodput",
        "prefix_cache_hit_rate",
    ):
        value = summary[key]
        echo(f"| {key} | {'-' if value is None else f'{value:,.4g}'} |")
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        dist = summary[key]
        echo(
            f"| {key} p50 / p90 / p99 | "
            + " / ".join("-" if dist[p] is None else f"{dist[p]:,.1f}" for p in ("p50", "p90", "p99"))
            + " |"
        )
    for pool, util in summary["pools"].items():
        echo(
            f"| {pool}: replicas (mean) / busy / running per replica / KV used | {util['replicas']:.1f} / "
            f"{util['busy']:.2f} / {util['running_per_replica']:.1f} / {util['kv_used']:.2f} |"
        )


@click.command("simulate")
@model_options
@click.option("--prefill", "num_prefill", type=int, default=1, show_default=True, help="Prefill workers.")
@click.option("--decode", "num_decode", type=int, default=1, show_default=True, help="Decode workers.")
@click.option("--colocated", type=int, default=None, help="Colocated workers instead of --prefill/--decode.")
@click.option(
    "--kv-blocks", type=int, default=None, help="KV blocks per worker [default: the node's budget]."
)
@click.option("--block-size", type=int, default=16, show_default=True)
@click.option("--trace", type=click.Path(exists=True, dir_okay=False), default=None)
@click.option("--rate", type=float, default=10.0, show_default=True, help="Synthetic Poisson req/s.")
@click.option(
    "--duration", type=float, default=60.0, show_default=True, help="Synthetic: seconds of arrivals."
)
@click.option("--input-len", type=float, default=3000, show_default=True)
@click.option("--output-len", type=float, default=400, show_default=True)
@click.option(
    "--sigma", type=float, default=0.5, show_default=True, help="Log-normal length spread (0: fixed)."
)
@click.option("--length-scale", type=float, default=1.0, show_default=True)
@click.option("--time-scale", type=float, default=1.0, show_default=True)
@click.option(
    "--unit-tokens", type=int, default=512, show_default=True, help="Tokens per prefix unit (x length scale)."
)
@click.option("--max-context", type=int, default=8192, show_default=True)
@click.option(
    "--num-requests", type=int, default=None, help="Requests; --validate: per workload (30)."
)
@click.option("--concurrency", type=int, default=None, help="Closed loop with this many requests in flight.")
@click.option("--policy", default="cache_aware", show_default=True, help="Router policy.")
@click.option("--autoscale", is_flag=True, help="Scale both pools with cluster.autoscaling's policies.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--calibrate", "do_calibrate", is_flag=True, help="Time the real engine here first (--engine-model)."
)
@click.option("--engine-model", default="smollm2-135m-instruct", show_default=True)
@click.option("--engine-dtype", default="bfloat16", show_default=True)
@click.option("--engine-threads", type=int, default=1, show_default=True)
@click.option("--output-dir", type=click.Path(file_okay=False), default=None)
@click.option(
    "--validate",
    is_flag=True,
    help="Replay scaled Azure conv and Mooncake through an embedded cluster and the simulator "
    "(without --calibration: the simulator's costs fitted on that cluster first, capacity.served).",
)
@click.option(
    "--cluster-config",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="--validate: the embedded cluster's YAML (e.g. cluster/bench/configs/two-core.yaml).",
)
@click.option(
    "--sweep",
    default=None,
    metavar="N,N,...",
    help="Predict the closed-loop concurrency knee at these levels (planner and simulator).",
)
@click.option(
    "--measured",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="--sweep: a measured sweep.json (pdserve bench --concurrency ...) to compare with.",
)
def simulate(**o) -> None:
    """Simulate a cluster (the real router, scheduler rules and autoscaling policies); bench-style figures."""
    out_dir = Path(o["output_dir"] or f"sim-out/{stamp()}")
    spec = resolve_model(
        o["model"], o["layers"], o["kv_heads"], o["head_dim"], o["heads"], o["params"], o["dtype"]
    )
    calibration = o["calibration"]
    if o["do_calibrate"]:
        from capacity.calibrate import calibrate

        fitted, error = calibrate(
            o["engine_model"], o["engine_dtype"], o["engine_threads"], spec.kv_bytes_per_token
        )
        calibration = str(out_dir / "calibration.json")
        out_dir.mkdir(parents=True, exist_ok=True)
        fitted.save(calibration)
        click.echo(f"calibrated: {fitted.describe()} (median step error {error:.1%}) -> {calibration}")
    node = _node(o["device"], o["tp"], o["reserved_gb"], o["memory_gb"])
    cost = cost_model(spec, node, calibration)
    if o["validate"] or o["sweep"]:
        from capacity.validate_cli import run_checks

        run_checks(o, spec, node, cost, out_dir)
        return
    config = sim_config(o, spec, node)
    requests = build_requests(
        o["trace"],
        o["rate"],
        o["duration"],
        o["input_len"],
        o["output_len"],
        o["sigma"],
        o["hit_rate"],
        o["length_scale"],
        o["time_scale"],
        o["unit_tokens"],
        o["max_context"],
        o["num_requests"],
        o["seed"],
    )
    metrics, wall = run_simulation(config, cost, requests, o["ttft_ms"], o["tpot_ms"])
    summary = metrics.summary()
    print_summary(summary, cost.describe(), wall, metrics.end_s)
    write_json(
        out_dir / "simulation.json",
        {
            "cost_model": cost.describe(),
            "summary": summary,
            "wall_s": wall,
            "simulated_s": metrics.end_s,
            "pool_samples": metrics.samples,
        },
    )
    click.echo(f"results in {out_dir}")


def sim_config(o: dict, spec, node) -> SimConfig:
    """The simulated cluster the options describe (KV blocks per worker: the node's budget by default)."""
    block_size = o["block_size"]
    blocks = o["kv_blocks"] or int(node.kv_budget_bytes(spec) // (spec.kv_bytes_per_token * block_size))
    unit = max(1, round(o["unit_tokens"] * o["length_scale"]))
    policy = o["policy"]
    router = RouterConfig(policy=policy, block_size=unit if policy == "cache_aware" else block_size)
    budget, seqs = o["max_num_batched_tokens"], o["max_num_seqs"]
    decode = PoolShape(o["colocated"] or o["num_decode"], blocks, budget, seqs)
    prefill = None if o["colocated"] else PoolShape(o["num_prefill"], blocks, budget, seqs)
    return SimConfig(
        prefill, decode, block_size, unit, router, Autoscale() if o["autoscale"] else None, o["concurrency"]
    )


def run_simulation(config: SimConfig, cost, requests, ttft_ms: float | None, tpot_ms: float | None):
    """(metrics, wall seconds) of one simulation."""
    sim = Simulation(config, cost)
    sim.metrics.slo_ttft_s = ttft_ms / 1e3 if ttft_ms else None
    sim.metrics.slo_tpot_s = tpot_ms / 1e3 if tpot_ms else None
    start = time.perf_counter()
    metrics = sim.run(requests)
    return metrics, time.perf_counter() - start
