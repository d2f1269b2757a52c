"""The simulator's metrics, with ``pdserve bench``'s definitions (cluster/bench/metrics.py):

TTFT = arrival -> first token; E2E = arrival -> last token; TPOT = (E2E - TTFT) / (tokens - 1) for
requests with at least two tokens; ITL = every gap between successive tokens, pooled; goodput =
requests meeting every SLO set, per second; hit rate = cached / prompt tokens; throughputs over the
first arrival -> last finish. Distributions are kept in log-spaced bins (0.5 % wide), so a simulated
day costs constant memory; percentiles are read from the bins (within 0.5 %).
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from capacity.sim import Job, Simulation

_LOG_STEP = math.log(1.005)


class LogHistogram:
    """Weighted values in 0.5 %-wide log bins; exact count, sum and max."""

    def __init__(self) -> None:
        self.bins: defaultdict[int, float] = defaultdict(float)
        self.count = 0.0
        self.total = 0.0

    def add(self, value: float, weight: float = 1.0) -> None:
        if weight <= 0:
            return
        self.bins[math.floor(math.log(max(value, 1e-9)) / _LOG_STEP)] += weight
        self.count += weight
        self.total += value * weight

    def add_run(self, values: list[float], weight: float, sorted_run: bool) -> None:
        """``add(v, weight)`` for each of ``values``; a ``sorted_run`` (non-decreasing: a decode run's
        steps, whose context only grows) whose ends share a bin lands in it whole, one addition instead
        of one per step (the same bins and count; the total to float rounding)."""
        if weight <= 0 or not values:
            return
        first, last = values[0], values[-1]
        if sorted_run and math.floor(math.log(max(first, 1e-9)) / _LOG_STEP) == math.floor(
            math.log(max(last, 1e-9)) / _LOG_STEP
        ):
            self.bins[math.floor(math.log(max(first, 1e-9)) / _LOG_STEP)] += weight * len(values)
            self.count += weight * len(values)
            self.total += sum(values) * weight
            return
        for value in values:
            self.add(value, weight)

    def percentile(self, p: float) -> float | None:
        if self.count <= 0:
            return None
        target, seen = self.count * p / 100.0, 0.0
        for index in sorted(self.bins):
            seen += self.bins[index]
            if seen >= target:
                return math.exp((index + 0.5) * _LOG_STEP)
        return math.exp((max(self.bins) + 0.5) * _LOG_STEP)

    def summary(self, scale: float = 1000.0) -> dict[str, float | None]:
        """mean, p50, p90, p99, in ms by default (values are seconds)."""
        if self.count <= 0:
            return {"mean": None, "p50": None, "p90": None, "p99": None}
        return {
            "mean": self.total / self.count * scale,
            **{f"p{p}": (self.percentile(p) or 0.0) * scale for p in (50, 90, 99)},
        }


class SimMetrics:
    """What a simulation measured (``summary`` has the keys of ``pdserve bench``'s summary)."""

    def __init__(self, slo_ttft_s: float | None = None, slo_tpot_s: float | None = None) -> None:
        self.ttft, self.tpot, self.itl, self.e2e = (
            LogHistogram(),
            LogHistogram(),
            LogHistogram(),
            LogHistogram(),
        )
        self.slo_ttft_s, self.slo_tpot_s = slo_ttft_s, slo_tpot_s
        self.num_open = 0
        # outside the engines, the same for every request (a served cost's path: client -> ingress ->
        # prefill replica, the tokens' way back): a constant shift of each request's timeline, so it is
        # added to TTFT and E2E here instead of delaying every event (TPOT / ITL are unchanged by it)
        self.path_s = 0.0
        self.record_from_s = 0.0  # requests arriving earlier are warm-up: simulated, not recorded
        self.num_done = 0
        self.num_good = 0
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.output_tokens = 0
        self.decode_tokens = 0
        self.first_arrival_s = math.inf
        self.last_finish_s = 0.0
        self.end_s = 0.0
        self.retired_busy_s = 0.0
        self.samples: list[dict[str, Any]] = []
        self.decisions: list[tuple[float, str, str]] = []
        self._last_busy: dict[str, float] = {}
        self._last_sample_s = 0.0

    def on_first_token(self, job: Job) -> None:
        if job.req.arrival_s < self.record_from_s:
            return
        self.ttft.add(job.first_token_s - job.req.arrival_s + self.path_s)
        self.prompt_tokens += job.req.input_len
        self.cached_tokens += job.cached

    def on_token_gap(self, gap_s: float, weight: int) -> None:
        self.itl.add(gap_s, weight)

    def on_finish(self, job: Job, now: float) -> None:
        req = job.req
        self.num_open -= 1
        if req.arrival_s < self.record_from_s:
            return  # a warm-up request (caches and queues filling): not in the figures
        self.num_done += 1
        self.output_tokens += req.output_len
        self.first_arrival_s = min(self.first_arrival_s, req.arrival_s)
        self.last_finish_s = max(self.last_finish_s, now)
        ttft = job.first_token_s - req.arrival_s + self.path_s
        self.e2e.add(now - req.arrival_s + self.path_s)
        tpot = (now - job.first_token_s) / (req.output_len - 1) if req.output_len > 1 else None
        if tpot is not None:
            self.tpot.add(tpot)
        good = self.slo_ttft_s is None or ttft <= self.slo_ttft_s
        good = good and (self.slo_tpot_s is None or tpot is None or tpot <= self.slo_tpot_s)
        self.num_good += int(good)

    def on_sample(self, sim: Simulation) -> None:
        period = max(sim.now - self._last_sample_s, 1e-9)
        sample: dict[str, Any] = {"t_s": sim.now}
        for pool, ids in sim.pools.items():
            workers = [sim.workers[w] for w in ids]
            if not workers:
                continue
            busy = [min(1.0, (w.busy_s - self._last_busy.get(w.id, 0.0)) / period) for w in workers]
            for w in workers:
                self._last_busy[w.id] = w.busy_s
            sample[pool] = {
                "replicas": len(workers),
                "starting": sim.starting[pool],
                "busy": sum(busy) / len(busy),
                "running_per_replica": sum(w.running_requests for w in workers) / len(workers),
                "kv_used": sum(w.used_blocks / w.shape.kv_blocks for w in workers) / len(workers),
            }
        self._last_sample_s = sim.now
        self.samples.append(sample)

    def finish(self, now: float, sim: Simulation) -> None:
        self.end_s = now

    def summary(self) -> dict[str, Any]:
        duration = max(self.last_finish_s - self.first_arrival_s, 1e-9) if self.num_done else 0.0
        per_s = 1.0 / duration if duration else 0.0
        pools: dict[str, dict[str, float]] = {}
        for pool in ("prefill", "decode"):
            rows = [s[pool] for s in self.samples if pool in s]
            if rows:
                pools[pool] = {
                    key: sum(r[key] for r in rows) / len(rows)
                    for key in ("replicas", "busy", "running_per_replica", "kv_used")
                }
        return {
            "num_completed": self.num_done, "duration_s": duration,
            "request_throughput": self.num_done * per_s,
            "output_token_throughput": self.output_tokens * per_s,
            "input_token_throughput": self.prompt_tokens * per_s,
            "ttft_ms": self.ttft.summary(), "tpot_ms": self.tpot.summary(), "itl_ms": self.itl.summary(),
            "e2e_ms": self.e2e.summary(),
            "goodput": self.num_good * per_s if (self.slo_ttft_s or self.slo_tpot_s) else None,
            "num_good": self.num_good,
            "prefix_cache_hit_rate": self.cached_tokens / self.prompt_tokens if self.prompt_tokens else None,
            "pools": pools,
        }  # fmt: skip
