"""PNG plots of one or more runs (matplotlib, Agg backend: no display needed).

- latency_cdf.png: empirical CDFs of TTFT, TPOT, ITL and E2E, one line per run.
- throughput.png: output tokens/s and completed requests/s over time (1 s bins), one line per run.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # the backend is chosen first
import numpy as np

from cluster.bench.client import RequestRecord
from cluster.bench.metrics import e2e_ms, itl_ms, tpot_ms, ttft_ms

Runs = Sequence[tuple[str, Sequence[RequestRecord]]]


def plot_latency_cdfs(runs: Runs, path: Path) -> None:
    """Four panels of empirical CDFs (x: ms, y: share of requests or of token gaps)."""
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    panels = (("TTFT", lambda rs: [v for r in rs if (v := ttft_ms(r)) is not None]),
              ("TPOT", lambda rs: [v for r in rs if (v := tpot_ms(r)) is not None]),
              ("ITL", lambda rs: [g for r in rs for g in itl_ms(r)]),
              ("E2E", lambda rs: [v for r in rs if (v := e2e_ms(r)) is not None]))
    for ax, (name, values_of) in zip(axes.flat, panels, strict=True):
        for label, records in runs:
            values = np.sort(np.asarray(values_of([r for r in records if r.is_ok]), dtype=np.float64))
            if values.size:
                ax.step(values, np.arange(1, values.size + 1) / values.size, where="post", label=label)
        ax.set_title(f"{name} CDF")
        ax.set_xlabel("ms")
        ax.set_ylabel("share")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_throughput(runs: Runs, path: Path, bin_s: float = 1.0) -> None:
    """Output tokens/s and completed requests/s per `bin_s` bin, time from the run's first send."""
    fig, (tokens_ax, requests_ax) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    for label, records in runs:
        if not records:
            continue
        origin = min(r.send_s for r in records)
        # one entry per token (a message with k tokens contributes k at its arrival time)
        token_times = [t - origin for r in records if r.is_ok
                       for t, n in zip(r.message_times_s, r.message_num_tokens, strict=True)
                       for _ in range(n)]
        done_times = [r.end_s - origin for r in records if r.is_ok and r.end_s is not None]
        horizon = max([*token_times, *done_times, bin_s])
        edges = np.arange(0.0, horizon + bin_s, bin_s)
        tokens, _ = np.histogram(token_times, bins=edges)
        done, _ = np.histogram(done_times, bins=edges)
        tokens_ax.step(edges[:-1], tokens / bin_s, where="post", label=label)
        requests_ax.step(edges[:-1], done / bin_s, where="post", label=label)
    tokens_ax.set_ylabel("output tokens/s")
    requests_ax.set_ylabel("completed req/s")
    requests_ax.set_xlabel("s since first request")
    for ax in (tokens_ax, requests_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_plots(runs: Runs, out_dir: Path) -> list[Path]:
    """Write both plots into `out_dir`; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "latency_cdf.png", out_dir / "throughput.png"]
    plot_latency_cdfs(runs, paths[0])
    plot_throughput(runs, paths[1])
    return paths
