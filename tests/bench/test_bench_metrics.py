"""Metric formulas on hand-made records: exact values, no timing noise (milliseconds to run)."""

from __future__ import annotations

import pytest

from cluster.bench.client import RequestRecord
from cluster.bench.config import SLO
from cluster.bench.metrics import (
    distribution,
    e2e_ms,
    itl_ms,
    meets_slo,
    pool_utilization,
    run_duration_s,
    summarize,
    tpot_ms,
    ttft_ms,
)


def record(send_s: float, times: list[float], sizes: list[int], status: str = "OK", **extra) -> RequestRecord:
    return RequestRecord(index=0, request_id="r", num_prompt_tokens=10, max_tokens=sum(sizes), send_s=send_s,
                         status=status, message_times_s=times, message_num_tokens=sizes,
                         end_s=times[-1] if times else send_s + 0.001, **extra)


def test_single_token_messages():
    # send at 1.0 s; tokens at 1.1, 1.12, 1.14, 1.16 s
    r = record(1.0, [1.1, 1.12, 1.14, 1.16], [1, 1, 1, 1])
    assert ttft_ms(r) == pytest.approx(100.0)
    assert e2e_ms(r) == pytest.approx(160.0)
    assert tpot_ms(r) == pytest.approx(20.0)                # (160 - 100) / (4 - 1)
    assert itl_ms(r) == pytest.approx([20.0, 20.0, 20.0])


def test_chunked_messages_give_one_gap_then_zeros():
    # first message 2 tokens at +50 ms, then 3 tokens at +110 ms, then 1 token at +130 ms
    r = record(0.0, [0.05, 0.11, 0.13], [2, 3, 1])
    assert ttft_ms(r) == pytest.approx(50.0)
    assert itl_ms(r) == pytest.approx([0.0, 60.0, 0.0, 0.0, 20.0])   # 5 gaps for 6 tokens
    assert tpot_ms(r) == pytest.approx((130.0 - 50.0) / 5)
    assert sum(itl_ms(r)) == pytest.approx(e2e_ms(r) - ttft_ms(r))  # ITLs add up to the decode time


def test_empty_messages_are_not_tokens():
    # a leading empty message (e.g. headers) and a trailing usage-only message
    r = record(0.0, [0.01, 0.05, 0.07, 0.08], [0, 1, 1, 0])
    assert ttft_ms(r) == pytest.approx(50.0)
    assert e2e_ms(r) == pytest.approx(80.0)                 # the last message ends the request
    assert itl_ms(r) == pytest.approx([20.0])
    assert tpot_ms(r) == pytest.approx(30.0)                # (80 - 50) / (2 - 1)


def test_one_token_has_no_tpot_and_meets_tpot_slo():
    r = record(0.0, [0.2], [1])
    assert tpot_ms(r) is None and itl_ms(r) == []
    assert meets_slo(r, SLO(ttft_ms=300, tpot_ms=1))
    assert not meets_slo(r, SLO(ttft_ms=100))


def test_goodput_needs_every_slo_and_success():
    fast = record(0.0, [0.1, 0.12, 0.14], [1, 1, 1])            # ttft 100, tpot 20
    slow_decode = record(0.0, [0.1, 0.2, 0.3], [1, 1, 1])       # ttft 100, tpot 100
    slow_prefill = record(0.0, [0.5, 0.52, 0.54], [1, 1, 1])    # ttft 500, tpot 20
    failed = record(0.0, [0.1], [1], status="UNAVAILABLE")
    slo = SLO(ttft_ms=200, tpot_ms=50)
    verdicts = [meets_slo(r, slo) for r in (fast, slow_decode, slow_prefill, failed)]
    assert verdicts == [True, False, False, False]
    summary = summarize([fast, slow_decode, slow_prefill, failed], [], slo)
    assert summary["num_good"] == 1
    assert summary["goodput"] == pytest.approx(1 / 0.54)       # duration: first send -> last end
    assert summary["errors"] == {"UNAVAILABLE": 1}
    assert summarize([fast], [], SLO())["goodput"] is None      # no SLO, no goodput


def test_distribution_and_duration():
    d = distribution([1.0, 2.0, 3.0, 4.0])
    assert d == pytest.approx({"mean": 2.5, "p50": 2.5, "p90": 3.7, "p99": 3.97})
    assert distribution([])["p99"] is None
    records = [record(0.5, [0.9], [1]), record(0.2, [0.6], [1])]
    assert run_duration_s(records) == pytest.approx(0.7)


def test_summary_server_side_shares():
    a = record(0.0, [0.1, 0.2], [1, 1], timings={"kv_transfer_ms": 10.0, "e2e_ms": 200.0},
               usage={"prompt_tokens": 100, "cached_tokens": 50, "completion_tokens": 2})
    b = record(0.0, [0.1, 0.3], [1, 1], timings={"kv_transfer_ms": 30.0, "e2e_ms": 300.0},
               usage={"prompt_tokens": 300, "cached_tokens": 0, "completion_tokens": 2})
    summary = summarize([a, b], [], SLO())
    assert summary["prefix_cache_hit_rate"] == pytest.approx(50 / 400)
    assert summary["kv_transfer_share"] == pytest.approx(40 / 500)
    assert summary["output_token_throughput"] == pytest.approx(4 / 0.3)


def test_pool_utilization_averages_replicas_then_samples():
    def replica(running: int, used: int) -> dict:
        return {"running_requests": running, "queued_requests": 0, "kv_blocks_used": used,
                "kv_blocks_total": 10}

    samples = [{"t_s": 0.0, "pools": {"decode": [replica(2, 5), replica(4, 10)], "prefill": []}},
               {"t_s": 0.5, "pools": {"decode": [replica(0, 0)]}}]
    util = pool_utilization(samples)
    assert set(util) == {"decode"}                              # a pool with no replicas has no figures
    assert util["decode"]["mean_replicas"] == pytest.approx(1.5)
    assert util["decode"]["mean_running_per_replica"] == pytest.approx((3 + 0) / 2)
    assert util["decode"]["mean_kv_usage"] == pytest.approx((0.75 + 0.0) / 2)
