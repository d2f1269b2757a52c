"""Acceptance 2: against a fake gRPC server with known injected delays, the bench's TTFT, TPOT, ITL
and goodput (and cache, transfer, pool and error figures) come out as the delays imply.

The formulas themselves are checked exactly, without timing noise, on hand-made records in
test_bench_metrics.py, and the summary's arithmetic in test_bench_report.py; this test checks that
what the bench measures over a real gRPC stream is what the server did. Every check compares values
one by one (request by request, gap by gap) with a reference, then bounds the median and the 75th
percentile of the errors:

- The plan (the injected delays: TTFT 150 or 600 ms, one token per 60 or 140 ms, some messages of
  2 tokens). The fake server sends at absolute times (start + offset), so a late send does not
  shift later ones; but sends are late while the process waits for a core.
- The server's truth: the fake server stamps, on the same `time.perf_counter` clock (one process),
  when each request arrived and each message left. The bench's value differs only by the loopback
  hops. Causality makes TTFT and E2E errors >= 0 exactly (so the bench's percentiles can never be
  below the truth's).

Bounds, from measurements on the shared 2-core VM at load average 11-12 (teammates' test suites
running; four runs of this fixture): |bench - plan| median <= 8.4 ms, p75 <= 23 ms, but p90 up to
132 ms and max up to 340 ms when one stall of the process delays every message in flight;
|bench - truth| median <= 2.2 ms, p75 <= 14 ms, p90 up to 131 ms. A quiet machine gives p99 ~10 ms.
We assert median <= 25 ms and p75 <= 100 ms against the plan, median <= 10 ms and p75 <= 60 ms
against the truth, and divide both by 5.5 for TPOT (two sends spread over 11 gaps). The classes
differ by 450 ms (TTFT) and 80 ms per token, so the checks still tell every class apart.

The largest errors are not bounded: that would test the machine's scheduler, not the bench. The
ITL convention (one gap, then k - 1 zeros per k-token message) is checked exactly, message by
message. The request rate is low (8 req/s, ~5 streams open) so the test adds little load itself.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from cluster.bench.config import SLO, BenchConfig, parse_length_mix
from cluster.bench.metrics import e2e_ms, itl_ms, summarize, tpot_ms, ttft_ms
from cluster.bench.runner import BenchRunner
from cluster.bench.workload import Workload
from protos import pdserve_pb2
from tests.bench.fake_server import FakeServer, Plan

NUM_TOKENS = 12
NUM_REQUESTS = 30
# by prompt length: fast (meets the SLO), slow prefill (misses TTFT), slow decode (misses TPOT), error
PLANS = {
    32: Plan(ttft_ms=150, gap_ms=60, chunk_pattern=(1, 2), cached_tokens=16, kv_transfer_ms=5.0),
    200: Plan(ttft_ms=600, gap_ms=60, chunk_pattern=(1, 2), cached_tokens=100, kv_transfer_ms=5.0),
    64: Plan(ttft_ms=150, gap_ms=140, chunk_pattern=(2, 1), cached_tokens=0, kv_transfer_ms=5.0),
    48: Plan(ttft_ms=10, gap_ms=1, chunk_pattern=(1,), error=grpc.StatusCode.RESOURCE_EXHAUSTED),
}
WARMUP_PLAN = Plan(ttft_ms=1, gap_ms=1, chunk_pattern=(1,))
SLO_UNDER_TEST = SLO(ttft_ms=400, tpot_ms=100)
PLAN_BOUNDS_MS = (25.0, 100.0)      # (median, p75) of |bench - plan|
TRUTH_BOUNDS_MS = (10.0, 60.0)     # (median, p75) of |bench - server's stamps|
PER_TPOT = (NUM_TOKENS - 1) / 2    # TPOT: two sends or hops spread over 11 gaps
ALL_STATS = ("mean", "p50", "p90", "p99")


def plan_for(request: pdserve_pb2.GenerateRequest) -> Plan:
    return PLANS.get(len(request.token_ids.ids), WARMUP_PLAN)


@pytest.fixture(scope="module")
def run():
    config = BenchConfig(arrival="poisson", rate=8.0, num_requests=NUM_REQUESTS, seed=3, slo=SLO_UNDER_TEST,
                         lengths=parse_length_mix(f"32x{NUM_TOKENS}:4,200x{NUM_TOKENS}:1,"
                                                  f"64x{NUM_TOKENS}:1,48x{NUM_TOKENS}:1"),
                         poll_interval_s=0.1)
    with FakeServer(plan_for) as server:
        result = BenchRunner(config, Workload(config), server.address, show_progress=False).run()
        log = dict(server.servicer.log)
    return result, log, summarize(result.records, result.samples, config.slo)


def stats(values: list[float]) -> dict[str, float]:
    percentiles = {f"p{p}": float(np.percentile(values, p)) for p in (50, 90, 99)}
    return {"mean": float(np.mean(values)), **percentiles}


def true_itl(sent: list[float], sizes: list[int]) -> list[float]:
    gaps: list[float] = []
    for i in range(1, len(sent)):
        gaps += [sent[i] - sent[i - 1]] + [0.0] * (sizes[i] - 1)
    return gaps


def paired(result, log, measured_of, reference_of) -> list[tuple[float, float]]:
    """(bench value, reference value) per completed request, lists zipped element by element.
    `reference_of(plan, sent, sizes)`: `sent` are the server's send stamps in ms after arrival."""
    pairs: list[tuple[float, float]] = []
    for record in result.records:
        if record.is_ok:
            entry = log[record.request_id]
            sent = [(t - entry.received_s) * 1000.0 for t in entry.sent_s]
            measured = measured_of(record)
            reference = reference_of(PLANS[record.num_prompt_tokens], sent, entry.sent_num_tokens)
            if isinstance(measured, list):
                pairs.extend(zip(measured, reference, strict=True))
            else:
                pairs.append((measured, reference))
    return pairs


def assert_errors(pairs: list[tuple[float, float]], bounds: tuple[float, float], *, causal: bool = False,
                  scale: float = 1.0) -> None:
    """|bench - reference|: median and p75 within `bounds` / `scale`; >= 0 if `causal`."""
    errors = np.array([m - r for m, r in pairs])
    if causal:   # the client sends before the server receives and receives after it sends
        assert errors.min() >= 0.0, sorted(errors)
    assert float(np.median(np.abs(errors))) <= bounds[0] / scale, sorted(errors)
    assert float(np.percentile(np.abs(errors), 75)) <= bounds[1] / scale, sorted(errors)


def assert_not_below(measured: dict, truth_values: list[float]) -> None:
    """Elementwise bench >= truth implies every order statistic is >= the truth's (and the mean)."""
    reference = stats(truth_values)
    for key in ALL_STATS:
        assert measured[key] >= reference[key] - 1e-9, (key, measured, reference)


def test_requests_sent_as_planned(run):
    result, log, _ = run
    measured = [entry.request for entry in log.values() if len(entry.request.token_ids.ids) in PLANS]
    assert len(measured) == NUM_REQUESTS == len(result.records)
    assert all(r.ignore_eos and r.max_tokens == NUM_TOKENS for r in measured)
    # every class of the mix occurs, so every check below is exercised
    assert {len(r.token_ids.ids) for r in measured} == set(PLANS)


def test_ttft(run):
    result, log, summary = run
    assert_errors(paired(result, log, ttft_ms, lambda plan, sent, _: plan.ttft_ms), PLAN_BOUNDS_MS)
    truth = paired(result, log, ttft_ms, lambda plan, sent, _: sent[0])
    assert_errors(truth, TRUTH_BOUNDS_MS, causal=True)
    assert_not_below(summary["ttft_ms"], [t for _, t in truth])


def test_tpot(run):
    result, log, _ = run
    assert all(r.num_completion_tokens == NUM_TOKENS for r in result.records if r.is_ok)
    assert_errors(paired(result, log, tpot_ms, lambda plan, sent, _: plan.gap_ms), PLAN_BOUNDS_MS,
                  scale=PER_TPOT)
    truth = paired(result, log, tpot_ms, lambda plan, sent, _: (sent[-1] - sent[0]) / (NUM_TOKENS - 1))
    assert_errors(truth, TRUTH_BOUNDS_MS, scale=PER_TPOT)


def test_itl_follows_chunk_convention(run):
    result, log, _ = run
    for record in result.records:
        if record.is_ok:
            # the structure is exact: one measured gap per message after the first, then k - 1 zeros
            sizes = log[record.request_id].sent_num_tokens
            assert record.message_num_tokens == sizes
            zeros = [g == 0.0 for g in itl_ms(record)]
            assert zeros == [z for size in sizes[1:] for z in [False] + [True] * (size - 1)]
    planned = paired(result, log, itl_ms, lambda plan, sent, _: plan.itl_ms(NUM_TOKENS))
    assert_errors([(m, p) for m, p in planned if p > 0.0], PLAN_BOUNDS_MS)   # zeros are exact
    truth = paired(result, log, itl_ms, lambda plan, sent, sizes: true_itl(sent, sizes))
    assert_errors([(m, t) for m, t in truth if t > 0.0], TRUTH_BOUNDS_MS)


def test_e2e(run):
    result, log, summary = run
    assert_errors(paired(result, log, e2e_ms, lambda plan, sent, _: plan.e2e_ms(NUM_TOKENS)), PLAN_BOUNDS_MS)
    truth = paired(result, log, e2e_ms, lambda plan, sent, _: sent[-1])
    assert_errors(truth, TRUTH_BOUNDS_MS, causal=True)
    assert_not_below(summary["e2e_ms"], [t for _, t in truth])


def test_goodput_counts_requests_meeting_every_slo(run):
    result, _, summary = run
    good = [r for r in result.records if r.num_prompt_tokens == 32]   # the only class meeting both
    assert summary["num_good"] == len(good) > 0
    starts = [r.send_s for r in result.records]
    ends = [r.end_s for r in result.records]
    assert summary["goodput"] == pytest.approx(len(good) / (max(ends) - min(starts)))
    # with only a TTFT objective, the slow-decode class counts too
    relaxed = summarize(result.records, result.samples, SLO(ttft_ms=400))
    assert relaxed["num_good"] == len(good) + sum(r.num_prompt_tokens == 64 for r in result.records)


def test_server_side_figures_and_errors(run):
    result, _, summary = run
    ok = [r for r in result.records if r.is_ok]
    failed = [r for r in result.records if not r.is_ok]
    assert {r.num_prompt_tokens for r in failed} == {48}
    assert summary["errors"] == {"RESOURCE_EXHAUSTED": len(failed)}
    assert summary["num_completed"] == len(ok) and summary["num_failed"] == len(failed)
    cached = sum(PLANS[r.num_prompt_tokens].cached_tokens for r in ok)
    assert summary["prefix_cache_hit_rate"] == pytest.approx(cached / sum(r.num_prompt_tokens for r in ok))
    transfer = 5.0 * len(ok)
    planned_e2e = sum(PLANS[r.num_prompt_tokens].e2e_ms(NUM_TOKENS) for r in ok)
    assert summary["kv_transfer_share"] == pytest.approx(transfer / planned_e2e)


def test_pool_utilization_from_cluster_info(run):
    result, _, summary = run
    assert len(result.samples) >= 3
    prefill, decode = summary["pools"]["prefill"], summary["pools"]["decode"]
    assert prefill["mean_replicas"] == 2 and decode["mean_replicas"] == 1
    assert prefill["mean_running_per_replica"] == pytest.approx(2.0)   # replicas at 1 and 3
    assert prefill["mean_queued_per_replica"] == pytest.approx(1.0)    # 2 and 0
    assert prefill["mean_kv_usage"] == pytest.approx(0.5)              # 25 % and 75 %
    assert decode["mean_kv_usage"] == 0.0
