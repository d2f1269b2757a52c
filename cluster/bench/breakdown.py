"""Per-class breakdown of finished runs: latency figures per prompt length, from results.json.

    python -m cluster.bench.breakdown bench-out/compare-60s/disaggregated bench-out/compare-60s/colocated

A mixed workload (`--lengths 32x64:0.85,1536x4:0.15`) has classes that fail for different reasons
(long prompts: TTFT; short streams: stalls behind those prefills); the overall percentiles mix them.
This prints, per run and prompt length, the count, TTFT p50/p99, TPOT p50/p99, ITL p99/max and the
server's median queue and prefill times, as a Markdown table.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from cluster.bench.client import RequestRecord
from cluster.bench.metrics import itl_ms, tpot_ms, ttft_ms
from cluster.bench.report import load_records

HEADER = ("| run | prompt tokens | requests | TTFT p50 / p99 (ms) | TPOT p50 / p99 (ms) | ITL p99 / max (ms) "
          "| server queue p50 (ms) | server prefill p50 (ms) |")


def _pair(values: list[float], low: float | str, high: float | str) -> str:
    if not values:
        return "-"
    def pick(which: float | str) -> float:
        return float(max(values)) if which == "max" else float(np.percentile(values, which))
    return f"{pick(low):.1f} / {pick(high):.1f}"


def breakdown_rows(label: str, records: list[RequestRecord]) -> list[str]:
    """Markdown rows, one per prompt length, over the completed requests of one run."""
    rows = []
    for length in sorted({r.num_prompt_tokens for r in records}):
        done = [r for r in records if r.num_prompt_tokens == length and r.is_ok]
        ttft = [v for r in done if (v := ttft_ms(r)) is not None]
        tpot = [v for r in done if (v := tpot_ms(r)) is not None]
        itl = [g for r in done for g in itl_ms(r)]
        queue = [r.timings.get("queue_ms", 0.0) for r in done]
        prefill = [r.timings.get("prefill_ms", 0.0) for r in done]
        rows.append(f"| {label} | {length} | {len(done)} | {_pair(ttft, 50, 99)} | {_pair(tpot, 50, 99)} "
                    f"| {_pair(itl, 99, 'max')} | {np.median(queue) if queue else 0:.1f} "
                    f"| {np.median(prefill) if prefill else 0:.1f} |")
    return rows


def main(paths: list[str]) -> None:
    """Print the breakdown of each run folder (or results.json) in `paths`."""
    print(HEADER)
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for path in paths:
        file = Path(path) / "results.json" if Path(path).is_dir() else Path(path)
        document = json.loads(file.read_text())
        for row in breakdown_rows(document["label"], load_records(document)):
            print(row)


if __name__ == "__main__":
    main(sys.argv[1:])
