"""Write a run's results: results.json (config, summary, every request record, ClusterInfo
samples) and summary.md (one Markdown table; side by side for `--compare`)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cluster.bench.client import RequestRecord
from cluster.bench.config import BenchConfig
from cluster.bench.metrics import PERCENTILES, e2e_ms, itl_ms, tpot_ms, ttft_ms
from cluster.bench.runner import RunResult

LATENCIES = (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2e_ms", "E2E"))


def _fmt(value: float | int | None, digits: int) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}f}"


def summary_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """The Markdown table's rows `(metric, value)` in a fixed order; every value is derivable
    from results.json (tests/bench recomputes each one)."""
    rows: list[tuple[str, str]] = [
        ("requests sent", _fmt(summary["num_requests"], 0)),
        ("requests completed", _fmt(summary["num_completed"], 0)),
        ("requests failed", _fmt(summary["num_failed"], 0)),
        ("duration (s)", _fmt(summary["duration_s"], 3)),
        ("request throughput (req/s)", _fmt(summary["request_throughput"], 4)),
        ("input token throughput (tok/s)", _fmt(summary["input_token_throughput"], 2)),
        ("output token throughput (tok/s)", _fmt(summary["output_token_throughput"], 2)),
        ("total token throughput (tok/s)", _fmt(summary["total_token_throughput"], 2)),
    ]
    for key, name in LATENCIES:
        dist = summary[key]
        rows.append((f"{name} mean (ms)", _fmt(dist["mean"], 2)))
        rows.extend((f"{name} p{p} (ms)", _fmt(dist[f"p{p}"], 2)) for p in PERCENTILES)
    slo = summary["slo"]
    slo_text = ", ".join(f"{k.removesuffix('_ms')}<={v:g}ms" for k, v in slo.items() if v is not None)
    rows.append((f"goodput (req/s, SLO {slo_text or 'none'})", _fmt(summary["goodput"], 4)))
    rows.append(("requests meeting SLO", _fmt(summary["num_good"], 0)))
    rows.append(("prefix cache hit rate (cached/prompt tokens)", _fmt(summary["prefix_cache_hit_rate"], 4)))
    rows.append(("KV transfer share (sum kv_transfer_ms / sum e2e_ms)",
                 _fmt(summary["kv_transfer_share"], 4)))
    for pool, util in summary["pools"].items():
        rows.extend([
            (f"pool {pool}: replicas (mean)", _fmt(util["mean_replicas"], 2)),
            (f"pool {pool}: running requests per replica (mean)", _fmt(util["mean_running_per_replica"], 3)),
            (f"pool {pool}: queued requests per replica (mean)", _fmt(util["mean_queued_per_replica"], 3)),
            (f"pool {pool}: KV blocks in use (mean share)", _fmt(util["mean_kv_usage"], 4)),
        ])
    for status, count in summary["errors"].items():
        rows.append((f"errors: {status}", _fmt(count, 0)))
    return rows


def markdown_table(summaries: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """One Markdown table with a value column per `(label, summary)`; rows missing from a run
    (a pool the other mode has, an error code) show `-`."""
    per_run = [dict(summary_rows(summary)) for _, summary in summaries]
    metrics: list[str] = []
    for rows in per_run:
        metrics.extend(m for m in rows if m not in metrics)
    header = "| metric | " + " | ".join(label for label, _ in summaries) + " |"
    rule = "|---|" + "---:|" * len(summaries)
    lines = [header, rule]
    lines.extend("| " + metric + " | " + " | ".join(rows.get(metric, "-") for rows in per_run) + " |"
                 for metric in metrics)
    return "\n".join(lines) + "\n"


def request_entry(record: RequestRecord) -> dict[str, Any]:
    """One request of results.json: the raw record, plus its derived figures for convenience
    (first_token_s, ttft_ms, tpot_ms, e2e_ms, itl_ms; None where undefined)."""
    return {**record.to_dict(), "first_token_s": record.first_token_s, "ttft_ms": ttft_ms(record),
            "tpot_ms": tpot_ms(record), "e2e_ms": e2e_ms(record), "itl_ms": itl_ms(record)}


def results_document(config: BenchConfig, label: str, result: RunResult, summary: dict[str, Any],
                     extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The results.json document."""
    return {
        "label": label,
        "config": config.to_dict(),
        "run": {"started_at_unix": result.started_at_unix, **(extra or {})},
        "cluster": result.cluster,
        "summary": summary,
        "requests": [request_entry(r) for r in result.records],
        "cluster_samples": result.samples,
    }


def write_run(out_dir: Path, document: dict[str, Any]) -> None:
    """Write results.json and summary.md for one run into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(document, indent=1) + "\n")
    title = f"# pdserve bench: {document['label']}\n\n"
    (out_dir / "summary.md").write_text(title + markdown_table([(document["label"], document["summary"])]))


def load_records(document: dict[str, Any]) -> list[RequestRecord]:
    """The request records of a results.json document."""
    return [RequestRecord.from_dict(r) for r in document["requests"]]
