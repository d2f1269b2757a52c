"""Calibrate the simulator on a live cluster: a :class:`~capacity.costs.ServedCost` fitted to the
cluster's own per-request server timings (``pdserve simulate --validate`` runs this on the cluster it
then validates against, so both see the same machine load).

Two short probe phases run through ``pdserve bench`` against the running cluster (never the
validation workloads themselves):

* ``probe-c1``: one request at a time, prompts of 16 .. 1,536 tokens, 16 output tokens. Gives the
  prefill replica's time per request against its uncached tokens (``timings.prefill_ms``: first
  prefill step -> first token, the step, the KV export and the result), the per-request path outside
  the engines (client TTFT minus ``prefill_ms``: client -> ingress -> the Ray call to the prefill
  replica, the first token's way back), the KV hand-off (the first token gap minus the later ones:
  the call to the decode replica, the pull, the admission), and decode steps at batch 1 over
  contexts of 16 .. 1,536 tokens.
* ``probe-c6``: six requests at a time, 64 x 32 tokens: decode steps at batches of about six, with
  the prefill replica working on the same two cores (how both replicas share them).
* ``probe-idle``: 12 short prompts (16 and 48 tokens x 16) arriving at 0.5 req/s (Poisson), as sparse
  as the validation workloads, so each mostly finds the cluster idle; those that queued under 20 ms
  give the fixed costs as an idle cluster pays them (``_after_idle``): the prefill intercept, the KV
  hand-off and the path rise by their median excess over the back-to-back fit.

Fits are non-negative least squares in relative error (``capacity.calibrate.nonnegative_fit``):
probe-c1's prefill time on (1, uncached tokens, attention pairs); each request's TPOT after its first
gap on (1, its mean decoding batch, the KV tokens that batch read), over the requests that a prefill
overlapped for at most a quarter of that time; the sharing slowdowns: probe-c6's prefills against the
fit (median ratio), and the other requests' TPOT against it per share of time overlapped; the hand-off
linear in the prompt's tokens (a straight-line fit); the load noise: every fitted request's observed /
fitted ratio (prefills and TPOTs), which the simulator applies per second of simulated time.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from capacity.calibrate import nonnegative_fit
from capacity.costs import ServedCost

PHASES = (
    ("probe-c1", {"arrival": "closed", "lengths": "16x16,256x16,768x16,1536x16", "num_requests": 16}),
    ("probe-c6", {"arrival": "closed", "concurrency": 6, "lengths": "64x32", "num_requests": 18}),
    # short prompts arriving as sparsely as the validation workloads: each mostly finds the cluster idle
    ("probe-idle", {"arrival": "poisson", "rate": 0.5, "lengths": "16x16,48x16", "num_requests": 12}),
)
IDLE_QUEUE_MS = 20.0  # a probe-idle request that queued longer found the cluster busy: not fitted


def run_phases(address: str, out_dir: Path) -> dict[str, list]:
    """Run the probe phases against the cluster at ``address``; their request records by phase."""
    from cluster.bench.config import BenchConfig, parse_length_mix
    from cluster.bench.report import load_records
    from cluster.bench.suite import external_target, run_suite
    from cluster.bench.workload import Workload

    records = {}
    for name, phase in PHASES:
        config = BenchConfig(
            arrival=phase["arrival"],
            rate=phase.get("rate", 1.0),
            concurrency=phase.get("concurrency", 1),
            lengths=parse_length_mix(phase["lengths"]),
            num_requests=phase["num_requests"],
            max_context=2048,
            warmup_requests=0 if phase["arrival"] == "poisson" else 1,
            seed=7,  # prompts unlike any validation request's (no shared prefix with them)
        )
        documents = run_suite(
            config,
            Workload(config),
            [external_target(address, name)],
            out_dir / name,
            show_progress=False,
            echo=lambda _: None,
        )
        records[name] = [r for r in load_records(documents[0]) if r.is_ok]
    return records


def _prefill_intervals(records: Sequence) -> list[tuple[float, float]]:
    """(start, end) of each request's prefill on the client's clock: its first token minus prefill_ms."""
    return [
        (r.message_times_s[0] - r.timings["prefill_ms"] / 1e3, r.message_times_s[0])
        for r in records
        if r.message_times_s
    ]


def _decode_requests(records: Sequence) -> list[tuple[float, float, float, float]]:
    """Per request with at least three tokens: (mean batch, mean KV tokens read, its TPOT after the
    first gap (which holds the hand-off), the share of that time a prefill ran). A request's mean,
    not each gap: a starved client gets tokens in bursts (gaps of 2 ms, then 800), a mean does not
    care. The batch at a token is the requests decoding then."""
    spans = [(r.message_times_s[0], r.end_s, r.num_prompt_tokens, r) for r in records if r.message_times_s]
    prefills = _prefill_intervals(records)
    rows = []
    for r in records:
        times = r.message_times_s
        if len(times) < 3 or times[-1] <= times[1]:
            continue
        batches, contexts = [], []
        for t in times[2:]:
            live = [
                prompt + sum(1 for m in other.message_times_s if m < t)
                for first, last, prompt, other in spans
                if first < t <= last
            ]
            batches.append(len(live))
            contexts.append(sum(live))
        span = times[-1] - times[1]
        overlap = sum(max(0.0, min(b, times[-1]) - max(a, times[1])) for a, b in prefills) / span
        rows.append(
            (float(np.mean(batches)), float(np.mean(contexts)), span / (len(times) - 2), min(1.0, overlap))
        )
    return rows


def _prefill_rows(records: Sequence) -> tuple[np.ndarray, np.ndarray]:
    rows, seconds = [], []
    for r in records:
        cached = int(r.usage.get("cached_tokens", 0))
        n = r.num_prompt_tokens - cached
        rows.append([1.0, n, n * cached + n * (n + 1) / 2])
        seconds.append(r.timings["prefill_ms"] / 1e3)
    return np.array(rows), np.array(seconds)


def _median_path(records: Sequence) -> float:
    """The per-request path outside the engines: client TTFT minus the prefill replica's time, median."""
    paths = [r.message_times_s[0] - r.send_s - r.timings["prefill_ms"] / 1e3 for r in records]
    return float(np.median(paths))


def _slowdown(observed: np.ndarray, predicted: np.ndarray) -> float:
    return max(0.0, float(np.median(observed / predicted)) - 1.0) if len(observed) else 0.0


def fit_served(records: dict[str, list], kv_bytes_per_token: int, source: str) -> ServedCost:
    """The :class:`ServedCost` of the probe phases' records (see the module docstring)."""
    single, shared = records["probe-c1"], records["probe-c6"]
    rows, seconds = _prefill_rows(single)
    prefill = nonnegative_fit(rows, seconds)
    prefill_noise = seconds / (rows @ np.array(prefill))
    rows, seconds = _prefill_rows(shared)  # prefills while the decode replica works: the sharing
    prefill_shared = _slowdown(seconds, rows @ np.array(prefill))
    requests = np.array(_decode_requests(single) + _decode_requests(shared))
    alone = requests[requests[:, 3] <= 0.25] if (requests[:, 3] <= 0.25).sum() >= 4 else requests
    decode = nonnegative_fit(np.c_[np.ones(len(alone)), alone[:, :2]], alone[:, 2])
    decode_noise = alone[:, 2] / (np.c_[np.ones(len(alone)), alone[:, :2]] @ np.array(decode))
    both = requests[requests[:, 3] > 0.25]  # decoding while a prefill ran: the sharing, per share of time
    predicted = np.c_[np.ones(len(both)), both[:, :2]] @ np.array(decode)
    decode_shared = (
        max(0.0, float(np.median((both[:, 2] / predicted - 1) / both[:, 3]))) if len(both) else 0.0
    )
    handoff = [  # first token gap minus the later ones' mean, against the prompt's tokens
        (r.num_prompt_tokens, (t[1] - t[0]) - float(np.mean(np.diff(t[1:]))))
        for r in single
        if len(t := r.message_times_s) >= 3
    ]
    h0, h_token = np.polyfit([n for n, _ in handoff], [h for _, h in handoff], 1)[::-1]
    path = _median_path(single)
    idle = [r for r in records.get("probe-idle", ()) if r.timings.get("queue_ms", 0.0) < IDLE_QUEUE_MS]
    if len(idle) >= 4:
        prefill, h0, path = _after_idle(idle, prefill, float(h0), float(h_token))
    return ServedCost(
        kv_bytes_per_token,
        *prefill,
        *decode,
        max(0.0, float(h0)),
        max(0.0, float(h_token)),
        max(0.0, path),
        prefill_shared,
        decode_shared,
        source,
        tuple(round(float(x), 4) for x in (*prefill_noise, *decode_noise)),
    )


def _after_idle(
    idle: Sequence, prefill: Sequence[float], h0: float, h_token: float
) -> tuple[list[float], float, float]:
    """The fixed costs as a request that finds the cluster idle pays them (``probe-idle``): back-to-back
    probes run warm, and a request after an idle second pays more for its prefill, its KV hand-off and
    its path (a 16-token prefill: 37-39 ms back to back, 50-80 ms after idle seconds). The per-token
    slopes stay probe-c1's; each intercept rises by the median excess of the idle requests, if any."""
    rows, seconds = _prefill_rows(idle)
    excess = float(np.median(seconds - rows @ np.array(prefill)))
    fitted = [prefill[0] + max(0.0, excess), *prefill[1:]]
    gaps = [
        (t[1] - t[0]) - float(np.mean(np.diff(t[1:]))) - (h0 + h_token * r.num_prompt_tokens)
        for r in idle
        if len(t := r.message_times_s) >= 3
    ]
    handoff = h0 + max(0.0, float(np.median(gaps))) if gaps else h0
    path = _median_path(idle)
    return fitted, handoff, path


def calibrate_served(address: str, out_dir: Path, kv_bytes_per_token: int) -> tuple[ServedCost, str]:
    """Probe the cluster at ``address`` and fit; (cost, a line on the phases: requests, load average)."""
    load_before = os.getloadavg()[0]
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    records = run_phases(address, out_dir)
    load_after = os.getloadavg()[0]
    source = f"{platform.node()}, probes of {started}, load {load_before:.1f} -> {load_after:.1f}"
    cost = fit_served(records, kv_bytes_per_token, source)
    counts = ", ".join(f"{name} {len(rs)} requests" for name, rs in records.items())
    return cost, f"served calibration: {counts}; load average {load_before:.1f} -> {load_after:.1f}"
