"""``pdserve simulate --validate``: the same workload through the real embedded cluster and through the
simulator, side by side (acceptance 2 of issue 16).

The real side is ``pdserve bench --embedded`` (``cluster.bench.suite.run_suite``: one embedded
disaggregated cluster, the trace replayed at its own timestamps x ``time_scale``, lengths x
``length_scale``). The simulated side replays the same requests (``capacity.workload.from_trace``:
the same arrival spreading and length clipping as the bench workload) through ``capacity.sim`` with
a calibrated cost model of this machine's engine. ``transfer`` (the KV hand-off plus the ingress's
per-request path: Ray calls, gRPC) is calibrated from the real runs' own server timings only when
``--fit-transfer`` asks, and then said so in the report.
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


def run_real(case: Case, cluster_config: str | None, out_dir: Path) -> dict[str, Any]:
    """The bench summary of one case on an embedded disaggregated cluster."""
    from cluster.bench.config import BenchConfig
    from cluster.bench.suite import embedded_target, run_suite
    from cluster.bench.workload import Workload
    from cluster.config import load_config

    config = BenchConfig(
        arrival="trace",
        trace=case.trace,
        time_scale=case.time_scale,
        length_scale=case.length_scale,
        num_requests=case.num_requests,
        max_context=case.max_context,
        warmup_requests=2,
    )
    base = load_config(cluster_config) if cluster_config else None
    documents = run_suite(
        config,
        Workload(config),
        [embedded_target("disaggregated", base)],
        out_dir / case.name,
        show_progress=False,
        echo=lambda _: None,
    )
    return documents[0]["summary"]


def run_sim(case: Case, cost, kv_blocks: int, block_size: int = 16) -> dict[str, Any]:
    """The simulator's summary of the same requests on 1 prefill + 1 decode worker."""
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
    config = SimConfig(shape, shape, block_size, unit, RouterConfig(policy="cache_aware", block_size=unit))
    return Simulation(config, cost).run(requests).summary()


def compare(
    real: dict[str, Any], sim: dict[str, Any]
) -> list[tuple[str, float | None, float | None, float | None]]:
    """(metric, real, simulated, relative difference) rows."""
    rows = []
    for key, pct in METRICS:
        rows.append((f"{key.removesuffix('_ms').upper()} {pct} (ms)", real[key][pct], sim[key][pct]))
    rows.append(("output tokens/s", real["output_token_throughput"], sim["output_token_throughput"]))
    return [(name, a, b, (b - a) / a if a and b is not None else None) for name, a, b in rows]


def report(results: Sequence[tuple[Case, list]], cost_line: str) -> str:
    lines = [
        f"cost model: {cost_line}",
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
