"""Benchmark metrics, derived from the raw per-request records and ClusterInfo samples.

Definitions (the same as vLLM's `bench serve` where it has one; see docs/bench.md):

- TTFT: send -> arrival of the first message carrying a token.
- E2E: send -> arrival of the last message.
- TPOT (per request): (E2E - TTFT) / (completion_tokens - 1); requests with one token have none.
- ITL: gaps between successive token arrivals, pooled over all requests. A message carrying k
  tokens contributes one gap (since the previous message) for its first token and k - 1 zero gaps.
- Goodput (DistServe): completed requests meeting every SLO that is set, per second of the run; a
  request with a single token meets any TPOT SLO (it has no TPOT, as in vLLM).
- Duration: first send -> last end over all requests (failed ones included).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from cluster.bench.client import RequestRecord
from cluster.bench.config import SLO

PERCENTILES = (50, 90, 99)


def ttft_ms(record: RequestRecord) -> float | None:
    """Time to first token (ms), None when no token arrived."""
    first = record.first_token_s
    return None if first is None else (first - record.send_s) * 1000.0


def e2e_ms(record: RequestRecord) -> float | None:
    """Send -> last message (ms), None when nothing arrived."""
    return (record.message_times_s[-1] - record.send_s) * 1000.0 if record.message_times_s else None


def tpot_ms(record: RequestRecord) -> float | None:
    """Time per output token after the first (ms), None with fewer than two tokens."""
    ttft, e2e, num_tokens = ttft_ms(record), e2e_ms(record), record.num_completion_tokens
    if ttft is None or e2e is None or num_tokens < 2:
        return None
    return (e2e - ttft) / (num_tokens - 1)


def itl_ms(record: RequestRecord) -> list[float]:
    """Inter-token latencies (ms): per message after the first token, one gap then k - 1 zeros."""
    gaps: list[float] = []
    previous: float | None = None
    for when, num_tokens in zip(record.message_times_s, record.message_num_tokens, strict=True):
        if num_tokens == 0:
            continue
        if previous is not None:
            gaps.append((when - previous) * 1000.0)
            gaps.extend([0.0] * (num_tokens - 1))
        else:   # the first message: its extra tokens arrived together with the first token
            gaps.extend([0.0] * (num_tokens - 1))
        previous = when
    return gaps


def meets_slo(record: RequestRecord, slo: SLO) -> bool:
    """DistServe: a completed request that meets every objective set."""
    if not record.is_ok:
        return False
    ttft, tpot, e2e = ttft_ms(record), tpot_ms(record), e2e_ms(record)
    if slo.ttft_ms is not None and (ttft is None or ttft > slo.ttft_ms):
        return False
    if slo.tpot_ms is not None and tpot is not None and tpot > slo.tpot_ms:
        return False
    return not (slo.e2e_ms is not None and (e2e is None or e2e > slo.e2e_ms))


def distribution(values: Sequence[float]) -> dict[str, float | None]:
    """Mean and p50/p90/p99 (numpy's linear interpolation, as vLLM) of `values` (None if empty)."""
    if not values:
        return {"mean": None, **{f"p{p}": None for p in PERCENTILES}}
    array = np.asarray(values, dtype=np.float64)
    return {"mean": float(array.mean()), **{f"p{p}": float(np.percentile(array, p)) for p in PERCENTILES}}


def run_duration_s(records: Sequence[RequestRecord]) -> float:
    """First send -> last end over all requests."""
    if not records:
        return 0.0
    end = max(r.end_s if r.end_s is not None else r.send_s for r in records)
    return end - min(r.send_s for r in records)


def pool_utilization(samples: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per pool, averaged over ClusterInfo samples: replicas, and per replica the running and
    queued requests and the share of KV blocks in use (used / total).

    A sample is `{"t_s": float, "pools": {name: [{"running_requests", "queued_requests",
    "kv_blocks_used", "kv_blocks_total", ...}, ...]}}`.
    """
    per_pool: dict[str, dict[str, list[float]]] = {}
    for sample in samples:
        for name, replicas in sample["pools"].items():
            if not replicas:
                continue
            acc = per_pool.setdefault(name, {"replicas": [], "running": [], "queued": [], "kv": []})
            acc["replicas"].append(len(replicas))
            acc["running"].append(float(np.mean([r["running_requests"] for r in replicas])))
            acc["queued"].append(float(np.mean([r["queued_requests"] for r in replicas])))
            acc["kv"].append(float(np.mean([r["kv_blocks_used"] / r["kv_blocks_total"]
                                             if r["kv_blocks_total"] else 0.0 for r in replicas])))
    return {name: {"num_samples": len(acc["replicas"]),
                   "mean_replicas": float(np.mean(acc["replicas"])),
                   "mean_running_per_replica": float(np.mean(acc["running"])),
                   "mean_queued_per_replica": float(np.mean(acc["queued"])),
                   "mean_kv_usage": float(np.mean(acc["kv"]))}
            for name, acc in sorted(per_pool.items())}


def summarize(records: Sequence[RequestRecord], samples: Sequence[dict[str, Any]],
              slo: SLO) -> dict[str, Any]:
    """The run's summary: counts, throughputs, latency distributions, goodput, cache and
    transfer shares, per-pool utilization and errors by status code."""
    done = [r for r in records if r.is_ok]
    duration = run_duration_s(records)
    per_second = (1.0 / duration) if duration > 0 else 0.0
    prompt_tokens = sum(r.num_prompt_tokens for r in done)
    completion_tokens = sum(r.num_completion_tokens for r in done)
    server_prompt = sum(r.usage.get("prompt_tokens", 0) for r in done)
    server_cached = sum(r.usage.get("cached_tokens", 0) for r in done)
    transfer_ms = sum(r.timings.get("kv_transfer_ms", 0.0) for r in done)
    server_e2e_ms = sum(r.timings.get("e2e_ms", 0.0) for r in done)
    num_good = sum(meets_slo(r, slo) for r in records) if not slo.is_empty else None
    summary: dict[str, Any] = {
        "num_requests": len(records),
        "num_completed": len(done),
        "num_failed": len(records) - len(done),
        "duration_s": duration,
        "request_throughput": len(done) * per_second,
        "input_token_throughput": prompt_tokens * per_second,
        "output_token_throughput": completion_tokens * per_second,
        "total_token_throughput": (prompt_tokens + completion_tokens) * per_second,
        "total_prompt_tokens": prompt_tokens,
        "total_completion_tokens": completion_tokens,
        "ttft_ms": distribution([v for r in done if (v := ttft_ms(r)) is not None]),
        "tpot_ms": distribution([v for r in done if (v := tpot_ms(r)) is not None]),
        "itl_ms": distribution([gap for r in done for gap in itl_ms(r)]),
        "e2e_ms": distribution([v for r in done if (v := e2e_ms(r)) is not None]),
        "slo": {"ttft_ms": slo.ttft_ms, "tpot_ms": slo.tpot_ms, "e2e_ms": slo.e2e_ms},
        "num_good": num_good,
        "goodput": None if num_good is None else num_good * per_second,
        "prefix_cache_hit_rate": server_cached / server_prompt if server_prompt else None,
        "kv_transfer_share": transfer_ms / server_e2e_ms if server_e2e_ms else None,
        "pools": pool_utilization(samples),
        "errors": dict(sorted(Counter(r.status for r in records if not r.is_ok).items())),
    }
    return summary
