"""``pdserve simulate --validate``: the same workload through the real embedded cluster and through the
simulator, side by side (acceptance 2 of issue 16).

The real side is ``pdserve bench --embedded`` (``cluster.bench.suite.run_suite``: one embedded
disaggregated cluster, the trace replayed at its own timestamps x ``time_scale``, lengths x
``length_scale``). The simulated side replays the same requests (``capacity.workload.from_trace``:
the same arrival spreading and length clipping as the bench workload) through ``capacity.sim`` with
a cost model fitted on the same cluster just before (``capacity.served``: probe workloads, never the
validation requests) or given with ``--calibration``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

METRICS = (("ttft_ms", "p50"), ("ttft_ms", "p99"), ("tpot_ms", "p50"), ("tpot_ms", "p99"))
TOLERANCE = 0.25


@dataclass(frozen=True)
class Case:
    name: str
    trace: str
    length_scale: float
    time_scale: float
    num_requests: int
    max_context: int = 2048


def run_real(case: Case, address: str, out_dir: Path) -> dict[str, Any]:
    """The bench summary of one case against the running cluster at ``address``."""
    from cluster.bench.config import BenchConfig
    from cluster.bench.suite import external_target, run_suite
    from cluster.bench.workload import Workload

    config = BenchConfig(
        arrival="trace",
        trace=case.trace,
        time_scale=case.time_scale,
        length_scale=case.length_scale,
        num_requests=case.num_requests,
        max_context=case.max_context,
        warmup_requests=2,
    )
    documents = run_suite(
        config,
        Workload(config),
        [external_target(address, case.name)],
        out_dir / case.name,
        show_progress=False,
        echo=lambda _: None,
    )
    return documents[0]["summary"]


def validate(
    cases: Sequence[Case], cluster_config: str | None, out_dir: Path, cost, kv_bytes_per_token: int
) -> tuple[Any, list[tuple[Case, dict[str, Any]]], list[str]]:
    """One embedded disaggregated cluster for everything: the served calibration first when ``cost``
    is None (``capacity.served``: the same cluster, the same machine load), then each case.
    Returns (the cost model, (case, real summary) pairs, notes for the report)."""
    import os

    from cluster.bench.suite import embedded_target
    from cluster.config import load_config

    base = load_config(cluster_config) if cluster_config else None
    notes, reals = [], []
    with embedded_target("disaggregated", base).open() as addresses:
        if cost is None:
            from capacity.served import calibrate_served

            cost, line = calibrate_served(addresses.grpc, out_dir, kv_bytes_per_token)
            notes.append(line)
        for case in cases:
            load = os.getloadavg()[0]
            reals.append((case, run_real(case, addresses.grpc, out_dir)))
            notes.append(f"{case.name}: load average {load:.1f} -> {os.getloadavg()[0]:.1f}")
    return cost, reals, notes


def run_sim(case: Case, cost, kv_blocks: int, block_size: int = 16, seeds: int = 25) -> dict[str, Any]:
    """The simulator's figures for the same requests on 1 prefill + 1 decode worker sharing the cores:
    with a noisy (served) cost, the median of each figure over ``seeds`` draws of the step noise (the
    p99 of 30 requests is about their maximum, a noisy figure on both sides: the median over draws
    is the simulator's expectation of it)."""
    import numpy as np

    from capacity.sim import PoolShape, SimConfig, Simulation
    from capacity.workload import from_trace
    from router import RouterConfig

    unit = max(1, round(512 * case.length_scale))
    requests = from_trace(
        case.trace,
        length_scale=case.length_scale,
        time_scale=case.time_scale,
        unit_tokens=512,
        max_context=case.max_context,
        num_requests=case.num_requests,
    )
    shape = PoolShape(1, kv_blocks, 2048, 64)
    router = RouterConfig(policy="cache_aware", block_size=unit)
    noisy = bool(getattr(cost, "noise", ()))
    summaries = [
        Simulation(SimConfig(shape, shape, block_size, unit, router, shared_cores=True, seed=seed), cost)
        .run(requests)
        .summary()
        for seed in range(seeds if noisy else 1)
    ]
    median = summaries[0] | {
        "output_token_throughput": float(np.median([s["output_token_throughput"] for s in summaries]))
    }
    for key, pct in METRICS:
        median[key] = median[key] | {pct: float(np.median([s[key][pct] for s in summaries]))}
    return median


def compare(
    real: dict[str, Any], sim: dict[str, Any]
) -> list[tuple[str, float | None, float | None, float | None]]:
    """(metric, real, simulated, relative difference) rows."""
    rows = []
    for key, pct in METRICS:
        rows.append((f"{key.removesuffix('_ms').upper()} {pct} (ms)", real[key][pct], sim[key][pct]))
    rows.append(("output tokens/s", real["output_token_throughput"], sim["output_token_throughput"]))
    return [(name, a, b, (b - a) / a if a and b is not None else None) for name, a, b in rows]


def report(results: Sequence[tuple[Case, list]], cost_line: str, notes: Sequence[str] = ()) -> str:
    held = sum(1 for _, rows in results for *_, diff in rows if diff is not None and abs(diff) <= TOLERANCE)
    total = sum(len(rows) for _, rows in results)
    lines = [
        f"cost model: {cost_line}",
        *notes,
        f"within 25 %: {held} of {total}",
        "",
        "| workload | metric | real cluster | simulator | difference | within 25 % |",
        "|---|---|---:|---:|---:|---|",
    ]
    for case, rows in results:
        for name, real, sim, diff in rows:
            ok = diff is not None and abs(diff) <= TOLERANCE
            lines.append(
                f"| {case.name} | {name} | {_f(real)} | {_f(sim)} | "
                f"{'-' if diff is None else f'{diff:+.1%}'} | {'yes' if ok else 'NO'} |"
            )
    return "\n".join(lines) + "\n"


def _f(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"
