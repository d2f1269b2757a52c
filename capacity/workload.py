"""Workloads for the planner and the simulator: requests with lengths, arrivals and prefix blocks.

A request's prompt is a chain of prefix units (``unit_tokens`` tokens each, Mooncake's 512 by
default): requests sharing leading unit ids share that prompt prefix, which is what a prefix cache
can reuse. Sources:

* a trace (``router.traces``: Mooncake JSONL with hash ids, Azure CSV without), lengths and times
  scaled like ``pdserve bench --length-scale / --time-scale``;
* a synthetic workload: Poisson arrivals, log-normal lengths around the given means (or fixed
  lengths), and a shared prefix of ``hit_rate`` x the prompt drawn from ``num_prefix_groups``
  groups (Zipf-like popularity), so a cache-aware router can reach about ``hit_rate``.

Arrival-rate shapes (``rate_profile``) stretch a trace's per-bin request counts over any duration.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from capacity.plan import WorkloadStats
from router.traces import TraceRecord, load_trace


@dataclass(frozen=True)
class SimRequest:
    index: int
    arrival_s: float
    input_len: int
    output_len: int
    prefix_ids: tuple[int, ...]  # one id per ``unit_tokens`` of the prompt (the last unit may be partial)


def from_trace(
    path: str,
    *,
    length_scale: float = 1.0,
    time_scale: float = 1.0,
    unit_tokens: int = 512,
    max_context: int = 4096,
    num_requests: int | None = None,
    start_s: float = 0.0,
) -> list[SimRequest]:
    """A trace's requests in arrival order (ties spread as ``pdserve bench`` does), lengths x
    ``length_scale`` clipped to ``max_context`` the same way, prefix ids from Mooncake's hash ids
    (fresh ids when the trace has none)."""
    from cluster.bench.workload import clip_lengths, trace_arrivals

    records = load_trace(path)
    arrivals = trace_arrivals(records, time_scale, start_s)
    origin = records[0].timestamp_s + start_s
    selected = [r for r in records if r.timestamp_s >= origin][: len(arrivals)]
    unit = max(1, round(unit_tokens * length_scale))
    fresh = 1 << 40
    out: list[SimRequest] = []
    for record, arrival in zip(selected, arrivals, strict=True):
        if num_requests is not None and len(out) >= num_requests:
            break
        input_len, output_len, _ = clip_lengths(
            round(record.input_length * length_scale), round(record.output_length * length_scale), max_context
        )
        num_units = math.ceil(input_len / unit)
        ids = list(record.hash_ids or ())[:num_units]
        while len(ids) < num_units:
            ids.append(fresh)
            fresh += 1
        out.append(SimRequest(len(out), arrival, input_len, output_len, tuple(ids)))
    return out


def _lengths(rng: np.random.Generator, mean: float, sigma: float, n: int, cap: int) -> np.ndarray:
    if sigma <= 0:
        return np.full(n, max(1, round(mean)), dtype=np.int64)
    mu = math.log(mean) - sigma**2 / 2  # log-normal with this mean
    return np.clip(np.rint(rng.lognormal(mu, sigma, n)), 1, cap).astype(np.int64)


def synthetic(
    rate: float,
    duration_s: float,
    mean_input: float,
    mean_output: float,
    *,
    hit_rate: float = 0.0,
    sigma: float = 0.0,
    unit_tokens: int = 512,
    num_prefix_groups: int = 1000,
    max_context: int = 8192,
    seed: int = 0,
    rate_profile: Sequence[float] | None = None,
) -> Iterator[SimRequest]:
    """Poisson arrivals at ``rate`` (times ``rate_profile``'s bin factor when given: bins spread evenly
    over ``duration_s``), lengths around the means; lazily generated in arrival order."""
    rng = np.random.default_rng(seed)
    index, now, chunk = 0, 0.0, 4096
    bins = list(rate_profile) if rate_profile else [1.0]
    fresh = 1 << 40
    while True:
        inputs = _lengths(rng, mean_input, sigma, chunk, max_context - 1).tolist()
        outputs = _lengths(rng, mean_output, sigma, chunk, max_context).tolist()
        gaps = rng.exponential(1.0, chunk).tolist()  # Python numbers: numpy scalars cost ~10x per read
        groups = np.minimum(rng.zipf(1.2, chunk), num_prefix_groups).tolist()
        for k in range(chunk):
            factor = bins[min(len(bins) - 1, int(now / duration_s * len(bins)))]
            now += gaps[k] / (rate * max(factor, 1e-9))
            if now >= duration_s:
                return
            input_len = inputs[k]
            output_len = min(outputs[k], max_context - input_len)
            shared_units = int(input_len * hit_rate) // unit_tokens
            num_units = -(-input_len // unit_tokens)
            shared = groups[k] * 1_000_003
            ids = (*range(shared, shared + shared_units), *range(fresh, fresh + num_units - shared_units))
            fresh += num_units - shared_units
            yield SimRequest(index, now, input_len, max(1, output_len), ids)
            index += 1


def rate_profile(records: Sequence[TraceRecord], num_bins: int) -> list[float]:
    """A trace's arrival shape: requests per bin over its span, normalized to a peak of 1."""
    start, end = records[0].timestamp_s, records[-1].timestamp_s
    counts = [0] * num_bins
    for record in records:
        counts[min(num_bins - 1, int((record.timestamp_s - start) / max(end - start, 1e-9) * num_bins))] += 1
    peak = max(counts)
    return [c / peak for c in counts]


def stats(requests: Sequence[SimRequest], peak_rate: float | None = None) -> WorkloadStats:
    """Means, p99 prompt and (unless given) the mean arrival rate of a request list."""
    inputs = np.array([r.input_len for r in requests], dtype=np.float64)
    outputs = np.array([r.output_len for r in requests], dtype=np.float64)
    span = requests[-1].arrival_s - requests[0].arrival_s if len(requests) > 1 else 1.0
    rate = peak_rate if peak_rate is not None else len(requests) / max(span, 1e-9)
    return WorkloadStats(float(inputs.mean()), float(outputs.mean()), float(np.percentile(inputs, 99)), rate)
