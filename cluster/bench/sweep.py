"""``pdserve bench --concurrency 1,2,4,8,16,32,64``: a closed-loop concurrency sweep in one command.

One cluster (embedded or external) serves every level in turn; each level is a closed-loop run of
its own (``--num-requests`` per level, default 4 x the level, at least 8). For each level the sweep
records output tokens/s, TTFT and TPOT percentiles and the KV memory in use (mean and peak share of
the decode pool's blocks from the ClusterInfo samples, and MiB when the pool's KV budget is known),
then finds the **knee**: the first level after which doubling the concurrency raises output tokens/s
by less than ``KNEE_GROWTH`` (10 %) while TPOT or TTFT keep climbing. Outputs: sweep.md (the table),
sweep.json, sweep.png (throughput and latency against concurrency), and each level's own run folder.
``capacity.knee`` predicts the same sweep with the planner and the simulator (``find_knee`` is shared).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cluster.bench.config import BenchConfig
from cluster.bench.metrics import summarize
from cluster.bench.report import results_document, write_run
from cluster.bench.runner import BenchRunner
from cluster.bench.suite import Target
from cluster.bench.workload import Workload

KNEE_GROWTH = 0.10  # a doubling that adds under 10 % output tokens/s is past the knee


def parse_levels(text: str) -> list[int]:
    """``"1,2,4"`` -> [1, 2, 4] (strictly increasing positive ints)."""
    try:
        levels = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise ValueError(f"--concurrency: expected N or N,N,..., got {text!r}") from None
    if not levels or any(c < 1 for c in levels) or levels != sorted(set(levels)):
        raise ValueError(f"--concurrency: levels must be positive and increasing, got {text!r}")
    return levels


def find_knee(levels: Sequence[int], throughputs: Sequence[float], growth: float = KNEE_GROWTH) -> int | None:
    """The first level whose next level adds under ``growth`` of its throughput (None: still growing)."""
    for index in range(len(levels) - 1):
        if throughputs[index + 1] < throughputs[index] * (1 + growth):
            return levels[index]
    return None


def latency_fields(summary: dict[str, Any]) -> dict[str, float | None]:
    """``ttft_p50_ms`` ... ``tpot_p99_ms`` of a summary (``pdserve bench``'s or the simulator's: the same
    keys), the latency columns of every sweep row, measured or predicted (capacity.knee)."""
    return {f"{k}_{p}_ms": summary[f"{k}_ms"][p] for k in ("ttft", "tpot") for p in ("p50", "p99")}


def level_row(concurrency: int, summary: dict[str, Any], kv_budget_bytes: float | None) -> dict[str, Any]:
    """One row of the sweep table from a run's summary (and its ClusterInfo samples' KV use)."""
    decode = summary["pools"].get("decode") or next(iter(summary["pools"].values()), {})
    kv_share = decode.get("mean_kv_usage")
    return {
        "concurrency": concurrency,
        "output_tokens_per_s": summary["output_token_throughput"],
        "request_throughput": summary["request_throughput"],
        **latency_fields(summary),
        "kv_used_share": kv_share, "kv_used_peak_share": summary.get("kv_peak_share"),
        "kv_used_mib": (kv_share * kv_budget_bytes / 2**20
                        if kv_share is not None and kv_budget_bytes else None),
        "num_completed": summary["num_completed"], "num_failed": summary.get("num_failed", 0),
    }  # fmt: skip


def _kv_peak_share(samples: Sequence[dict[str, Any]]) -> float | None:
    shares = [r["kv_blocks_used"] / r["kv_blocks_total"] for s in samples for name, rs in s["pools"].items()
              if name == "decode" for r in rs if r["kv_blocks_total"]]
    return max(shares) if shares else None


def sweep_table(rows: Sequence[dict[str, Any]], knee: int | None, title: str) -> str:
    def fmt(value: Any, digits: int = 1) -> str:
        return "-" if value is None else f"{value:,.{digits}f}"

    lines = [f"# {title}", "",
             "| concurrency | output tok/s | req/s | TTFT p50 / p99 (ms) | TPOT p50 / p99 (ms) "
             "| KV in use: mean share (MiB) / peak share | failed |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        mark = " **knee**" if r["concurrency"] == knee else ""
        lines.append(
            f"| {r['concurrency']}{mark} | {fmt(r['output_tokens_per_s'])} | "
            f"{fmt(r['request_throughput'], 2)} | {fmt(r['ttft_p50_ms'])} / {fmt(r['ttft_p99_ms'])} | "
            f"{fmt(r['tpot_p50_ms'])} / {fmt(r['tpot_p99_ms'])} | "
            f"{fmt(r['kv_used_share'], 3)} ({fmt(r['kv_used_mib'])}) / {fmt(r['kv_used_peak_share'], 3)} | "
            f"{r['num_failed']} |")
    knee_text = (f"knee at concurrency {knee}: the next doubling adds under {KNEE_GROWTH:.0%} output tokens/s"
                 if knee is not None else "no knee: output tokens/s still grows at the last level")
    return "\n".join([*lines, "", knee_text]) + "\n"


def plot_sweep(series: Sequence[tuple[str, Sequence[dict[str, Any]]]], path: Path) -> None:
    """Output tokens/s, TTFT p50 and TPOT p50 against concurrency (log2 x), one line per series."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    panels = (("output_tokens_per_s", "output tokens/s"), ("ttft_p50_ms", "TTFT p50 (ms)"),
              ("tpot_p50_ms", "TPOT p50 (ms)"))
    for ax, (key, label) in zip(axes, panels, strict=True):
        for name, rows in series:
            points = [(r["concurrency"], r[key]) for r in rows if r[key] is not None]
            ax.plot([c for c, _ in points], [v for _, v in points], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency (requests in flight)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_sweep(config: BenchConfig, levels: Sequence[int], target: Target, out_dir: Path, *,
              kv_budget_bytes: float | None = None, show_progress: bool = True,
              echo: Callable[[str], None] = print, requests_per_level: int | None = None) -> dict[str, Any]:
    """Run every level against one cluster (``requests_per_level`` requests each, default 4 x the level
    and at least 8; ``config.duration_s`` still stops a level early); write the table, the PNG and
    each level's run."""
    rows: list[dict[str, Any]] = []
    with target.open() as addresses:
        for concurrency in levels:
            level = dataclasses.replace(config, arrival="closed", concurrency=concurrency,
                                        num_requests=requests_per_level or max(8, 4 * concurrency))
            echo(f"[pdserve bench] sweep: concurrency {concurrency} ({level.num_requests} requests)")
            result = BenchRunner(level, Workload(level), addresses.grpc, show_progress=show_progress,
                                 label=f"c{concurrency}").run()
            summary = summarize(result.records, result.samples, level.slo)
            summary["kv_peak_share"] = _kv_peak_share(result.samples)
            label = f"c{concurrency}"
            write_run(out_dir / label, results_document(level, label, result, summary))
            rows.append(level_row(concurrency, summary, kv_budget_bytes))
    knee = find_knee(levels, [r["output_tokens_per_s"] for r in rows])
    table = sweep_table(rows, knee, f"pdserve bench: concurrency sweep ({target.label})")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "sweep.md").write_text(table)
    document = {"levels": list(levels), "knee": knee, "rows": rows, "config": config.to_dict()}
    (out_dir / "sweep.json").write_text(json.dumps(document, indent=1) + "\n")
    plot_sweep([(target.label, rows)], out_dir / "sweep.png")
    echo(table)
    echo(f"[pdserve bench] sweep results in {out_dir}")
    return document


def embedded_kv_budget(cluster_config: str | None) -> float:
    """KV bytes of one decode replica of the embedded cluster (the YAML's, or the default config's)."""
    from cluster.config import ClusterConfig, load_config

    config = load_config(cluster_config) if cluster_config else ClusterConfig()
    return float(config.engine_for("decode").kv_cache_bytes)
