"""The figures of one ``run_aiperf.sh`` output folder as a Markdown table (issue 13, acceptance 2).

    .venv/bin/python bench/peers/aiperf_summary.py LABEL OUT_DIR

Reads aiperf's own export (``OUT_DIR/c<N>/**/profile_export_aiperf.json``) for each concurrency N: requests
completed and failed, TTFT p50 / p99, ITL p50 / p99, output tokens/s (aiperf's ``output_token_throughput``:
output tokens of the run / its duration) and request latency p50.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

COLUMNS = (
    "| server | concurrency | requests ok / errors | TTFT p50 / p99 (ms) | ITL p50 / p99 (ms) | output tok/s "
    "| latency p50 (ms) |"
)


def _metric(export: dict[str, Any], tag: str) -> dict[str, Any]:
    found = export.get(tag)
    if found is None and isinstance(export.get("records"), dict):
        found = export["records"].get(tag)
    return found if isinstance(found, dict) else {}


def _stat(export: dict[str, Any], tag: str, stat: str) -> float | None:
    value = _metric(export, tag).get(stat)
    return float(value) if isinstance(value, (int, float)) else None


def _fmt(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _pair(export: dict[str, Any], tag: str, digits: int) -> str:
    return f"{_fmt(_stat(export, tag, 'p50'), digits)} / {_fmt(_stat(export, tag, 'p99'), digits)}"


def row(label: str, concurrency: int, export: dict[str, Any]) -> str:
    ok = _stat(export, "request_count", "avg")
    errors = _stat(export, "error_request_count", "avg") or 0.0
    ttft = f"{_pair(export, 'time_to_first_token', 0)}"
    itl = f"{_pair(export, 'inter_token_latency', 1)}"
    throughput = _fmt(_stat(export, "output_token_throughput", "avg"), 1)
    latency = _fmt(_stat(export, "request_latency", "p50"))
    return (
        f"| {label} | {concurrency} | {_fmt(ok)} / {errors:.0f} | {ttft} | {itl} | {throughput} | {latency} |"
    )


def main(label: str, out_dir: str) -> None:
    print(COLUMNS)
    print("|---|---:|---:|---:|---:|---:|---:|")
    runs = sorted(
        Path(out_dir).glob("c*/"), key=lambda path: int(path.name[1:]) if path.name[1:].isdigit() else 0
    )
    for run in runs:
        exports = sorted(run.rglob("profile_export_aiperf.json"))
        if not run.name[1:].isdigit():
            continue
        if not exports:
            print(f"| {label} | {run.name[1:]} | no export (see {run}.log) | | | | |")
            continue
        print(row(label, int(run.name[1:]), json.loads(exports[-1].read_text())))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
