"""``python -m capacity.scenario``: the 10M-DAU scenario of docs/capacity.md, recomputed.

10M daily users x 15 turns = 150M requests a day, 3k prompt + 400 output tokens a turn, a 70B dense
GQA model (fp16) on 8 x H100 nodes (tensor parallel 8), TTFT p99 < 700 ms, TPOT p99 < 40 ms, a peak
of 5k requests/s. Printed: the planner's pool sizes at the peak for prefix hit rates 0 / 40 / 80 %
(disaggregated and colocated), the simulator's check of those sizes (run at ``--scale`` of the rate
and of the pools: per-node behaviour is the same, queueing with fewer servers is a little worse, so
the check is conservative), the hourly pool sizes over a day with Azure conv's arrival shape, an
autoscaled simulated window with the real policies, and the simulator's speed at 1,000 workers.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import click

from capacity.costs import RooflineCost
from capacity.model import DEVICES, MODELS, NodeSpec
from capacity.plan import Plan, SLOs, WorkloadStats, plan
from capacity.sim import Autoscale, PoolShape, SimConfig, Simulation
from capacity.workload import rate_profile, synthetic
from router import RouterConfig
from router.traces import load_trace

MODEL = MODELS["llama-70b"]
NODE = NodeSpec(DEVICES["H100"], 8, 100e9)
COST = RooflineCost(MODEL, NODE)
SLO = SLOs(0.7, 0.04)
PEAK = 5000.0
DAY_REQUESTS = 10e6 * 15
AZURE_CONV = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "azure" / "AzureLLMInferenceTrace_conv.csv"
)
KV_BLOCKS = int(NODE.kv_budget_bytes(MODEL) // (MODEL.kv_bytes_per_token * 16))


def _plans() -> dict[float, Plan]:
    workload = WorkloadStats(3000, 400, 6000, PEAK)
    return {hit: plan(MODEL, NODE, COST, workload, hit, SLO) for hit in (0.0, 0.4, 0.8)}


def check(
    num_prefill: int,
    num_decode: int,
    hit: float,
    scale: float,
    seconds: float,
    cells: int,
    colocated: int | None = None,
    until_s: float | None = None,
    autoscale: Autoscale | None = None,
    profile=None,
) -> tuple[dict, float, float]:
    """Simulate ``scale`` of the peak on ``scale`` of the pools; (summary, wall s, simulated s)."""
    unit = 128  # prefix units of 128 tokens: a 3k prompt at 80 % shares 18 units (2,304 tokens, 77 %)
    prefill = None if colocated else PoolShape(max(1, round(num_prefill * scale)), KV_BLOCKS, 8192, 256)
    decode = PoolShape(max(1, round((colocated or num_decode) * scale)), KV_BLOCKS, 8192, 512)
    config = SimConfig(
        prefill,
        decode,
        16,
        unit,
        RouterConfig(block_size=unit),
        autoscale,
        num_cells=cells,
        sample_period_s=10.0 if autoscale else 1.0,
    )
    sim = Simulation(config, COST)
    sim.metrics.slo_ttft_s, sim.metrics.slo_tpot_s = SLO.ttft_p99_s, SLO.tpot_p99_s
    sim.metrics.record_from_s = (
        0.0 if autoscale else min(10.0, seconds / 3)
    )  # caches and queues warm up first
    requests = synthetic(
        PEAK * scale,
        seconds,
        3000,
        400,
        hit_rate=hit,
        sigma=0.5,
        max_context=8192,
        rate_profile=profile,
        unit_tokens=unit,
    )
    start = time.perf_counter()
    metrics = sim.run(requests, until_s=until_s)
    wall = time.perf_counter() - start
    summary = metrics.summary()
    summary["samples"] = metrics.samples
    return summary, wall, metrics.end_s


def sim_sized_prefill(p: Plan, hit: float, scale: float, seconds: float) -> tuple[int, dict]:
    """The fewest prefill nodes (at ``scale``, by bisection between 10 % and 3 x the plan) whose simulated
    TTFT p99 meets the SLO, with the planner's decode pool; (nodes at full scale, that run's summary)."""
    low, high = max(1, round(p.prefill_nodes * scale * 0.1)), max(2, round(p.prefill_nodes * scale * 3))
    best = None
    while low < high:
        mid = (low + high) // 2
        summary, _, _ = check(round(mid / scale), p.decode_nodes, hit, scale, seconds, 1)
        if summary["ttft_ms"]["p99"] <= SLO.ttft_p99_s * 1e3:
            high, best = mid, summary
        else:
            low = mid + 1
    if best is None:
        best, _, _ = check(round(low / scale), p.decode_nodes, hit, scale, seconds, 1)
    return round(low / scale), best


def peak_table(scale: float, seconds: float) -> str:
    lines = [
        "| prefix hit rate | planner: prefill / decode nodes (P:D) "
        "| sim at planner size: TTFT p99 / TPOT p99 ms (realized hits) "
        "| sim-sized prefill nodes (TTFT p99 ms) | disagg. GPUs (sim-sized) "
        "| colocated nodes: planner (sim TTFT / TPOT p99 ms) | colocated GPUs |",
        "|---:|---|---|---|---:|---|---:|",
    ]
    for hit, p in _plans().items():
        disagg, _, _ = check(p.prefill_nodes, p.decode_nodes, hit, scale, seconds, 1)
        colo, _, _ = check(0, 0, hit, scale, seconds, 1, colocated=p.colocated_nodes)
        sized, sized_summary = sim_sized_prefill(p, hit, scale, seconds)
        lines.append(
            f"| {hit:.0%} | {p.prefill_nodes} / {p.decode_nodes} ({p.pd_ratio:.2f}) | "
            f"{disagg['ttft_ms']['p99']:,.0f} / {disagg['tpot_ms']['p99']:,.1f} "
            f"({disagg['prefix_cache_hit_rate']:.0%}) | "
            f"{sized} ({sized_summary['ttft_ms']['p99']:,.0f}) | {8 * (sized + p.decode_nodes):,} | "
            f"{p.colocated_nodes} ({colo['ttft_ms']['p99']:,.0f} / {colo['tpot_ms']['p99']:,.1f}) | "
            f"{8 * p.colocated_nodes:,} |"
        )
    return "\n".join(lines) + "\n"


def day_table(num_bins: int = 24) -> tuple[str, list[float]]:
    profile = rate_profile(load_trace(AZURE_CONV), num_bins)
    mean = sum(profile) / len(profile)
    peak = DAY_REQUESTS / 86400 / mean  # the day's 150M requests spread with Azure conv's shape
    profile = [f * peak / PEAK for f in profile]
    lines = [
        f"Azure conv's arrival shape in {num_bins} bins stretched over 24 h and scaled to 150M requests/day "
        f"(mean {DAY_REQUESTS / 86400:,.0f} req/s, peak {peak:,.0f} req/s: Azure's hour is flatter than the "
        f"issue's 5k peak implies); pool sizes = the peak plan scaled by each hour's rate.",
        "",
        "| hour | req/s | P / D at 0 % | P / D at 40 % | P / D at 80 % |",
        "|---:|---:|---:|---:|---:|",
    ]
    plans = _plans()
    for hour, factor in enumerate(profile):
        cells = [
            f"{math.ceil(p.prefill_nodes * factor)} / {math.ceil(p.decode_nodes * factor)}"
            for p in plans.values()
        ]
        lines.append(f"| {hour} | {PEAK * factor:,.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n", profile


def speed(seconds: float, profile: list[float] | None, label: str) -> str:
    """The 1,000-worker simulation's speed: ``seconds`` simulated (the peak's 5k req/s, or the day's
    rates when ``profile`` is given), wall and CPU seconds of the run, the load average around it."""
    import os

    p40 = _plans()[0.4]
    n_p = round(p40.prefill_nodes * 1000 / (p40.prefill_nodes + p40.decode_nodes))
    n_d = 1000 - n_p
    load = os.getloadavg()[0]
    cpu = time.process_time()
    summary, wall, simulated = check(n_p, n_d, 0.4, 1.0, seconds, 20, until_s=seconds, profile=profile)
    cpu = time.process_time() - cpu
    return (
        f"speed, {label}: 1,000 workers ({n_p} prefill + {n_d} decode, 20 routing cells), 40 % hits, "
        f"{summary['num_completed']:,} requests completed: {simulated:.1f} simulated s in {wall:.1f} s wall "
        f"({cpu:.1f} CPU s with the set-up) = {simulated / wall:.2f} x real time "
        f"({simulated / cpu:.2f} x per CPU second); load average {load:.1f} -> {os.getloadavg()[0]:.1f}; "
        f"TTFT p99 {summary['ttft_ms']['p99']:,.0f} ms, TPOT p99 {summary['tpot_ms']['p99']:,.1f} ms"
    )


@click.command()
@click.option(
    "--scale", type=float, default=0.05, show_default=True, help="Share of the peak and pools simulated."
)
@click.option("--seconds", type=float, default=30.0, show_default=True, help="Simulated seconds per check.")
@click.option(
    "--speed-seconds",
    type=float,
    default=10.0,
    show_default=True,
    help="Simulated seconds of the full-size (1,000-worker) run at the 5k req/s peak.",
)
@click.option(
    "--hour-seconds",
    type=float,
    default=10.0,
    show_default=True,
    help="Simulated seconds per hour of the day in the 1,000-worker day run (its 24 hourly rates).",
)
@click.option("--speed-only", is_flag=True, help="Only the two 1,000-worker speed runs.")
def main(scale: float, seconds: float, speed_seconds: float, hour_seconds: float, speed_only: bool) -> None:
    click.echo(f"cost model: {COST.describe()}\n")
    table, profile = day_table()
    if not speed_only:
        click.echo(peak_table(scale, seconds))
        click.echo(table)
    rates = f"{min(profile) * PEAK:,.0f}-{max(profile) * PEAK:,.0f} req/s"
    click.echo(
        speed(24 * hour_seconds, profile, f"the day's 24 hourly rates ({rates}), {hour_seconds:g} s each")
    )
    click.echo(speed(speed_seconds, None, f"the {PEAK:,.0f} req/s peak"))


if __name__ == "__main__":
    main()
