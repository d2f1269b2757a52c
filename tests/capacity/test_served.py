"""The served calibration (capacity.served) recovers a known cost from records it generated, the
decode runs' fast durations equal step_s bit for bit, and the path cost lands in TTFT only."""

from __future__ import annotations

import pytest

from capacity.costs import LinearCost, RooflineCost, ServedCost, decode_step
from capacity.model import DEVICES, MODELS, NodeSpec
from capacity.served import fit_served
from capacity.sim import PoolShape, SimConfig, Simulation
from capacity.workload import SimRequest
from cluster.bench.client import RequestRecord
from router import RouterConfig

TRUE = {
    "prefill": (0.060, 0.0007, 2e-7),  # s, s/token, s/attention pair
    "decode": (0.020, 0.004, 1e-6),  # s, s/sequence, s/KV token
    "handoff": (0.015, 5e-6),  # s, s/prompt token
    "path": 0.012,
    "prefill_shared": 0.5,
}


def _prefill_s(n: int, shared: float = 0.0) -> float:
    p0, p1, p2 = TRUE["prefill"]
    return (p0 + p1 * n + p2 * n * (n + 1) / 2) * (1 + shared)


def _record(
    index: int, prompt: int, send: float, first: float, gaps: list[float], prefill: float
) -> RequestRecord:
    times = [first]
    for gap in gaps:
        times.append(times[-1] + gap)
    return RequestRecord(
        index,
        f"r{index}",
        prompt,
        len(times),
        send,
        message_times_s=times,
        message_num_tokens=[1] * len(times),
        end_s=times[-1],
        usage={"prompt_tokens": prompt, "cached_tokens": 0, "completion_tokens": len(times)},
        timings={"prefill_ms": prefill * 1e3},
    )


def _decode_gap(batch: int, kv_tokens: float) -> float:
    d0, d1, d2 = TRUE["decode"]
    return d0 + d1 * batch + d2 * kv_tokens


def _probe_records() -> dict[str, list[RequestRecord]]:
    """One at a time over several prompt lengths, then six decoding together (their prefills end
    before their first tokens, so no decode gap overlaps a prefill), with the known costs."""
    single, now = [], 0.0
    h0, h1 = TRUE["handoff"]
    for i, prompt in enumerate([16, 256, 768, 1536, 64, 512]):
        prefill = _prefill_s(prompt)
        later = [_decode_gap(1, prompt + k + 1) for k in range(1, 9)]  # ends after message k + 1
        first_gap = h0 + h1 * prompt + sum(later) / len(later)
        record = _record(i, prompt, now, now + TRUE["path"] + prefill, [first_gap, *later], prefill)
        single.append(record)
        now = record.end_s + 1.0
    shared, start = [], now
    for i in range(6):  # every first token at the same moment: the gaps after the first are batch 6
        gaps = [0.05] + [_decode_gap(6, 6 * (64 + k + 1)) for k in range(1, 12)]
        prefill = _prefill_s(64, TRUE["prefill_shared"])
        shared.append(_record(10 + i, 64, start, start + 1.0, gaps, prefill))
    return {"probe-c1": single, "probe-c6": shared}


def test_fit_served_recovers_the_costs_that_made_the_timings() -> None:
    cost = fit_served(_probe_records(), 1000, "test")
    assert (cost.prefill_s, cost.per_prefill_token_s, cost.per_prefill_pair_s) == pytest.approx(
        TRUE["prefill"], rel=1e-6
    )
    assert (cost.decode_s, cost.per_decode_seq_s, cost.per_decode_kv_token_s) == pytest.approx(
        TRUE["decode"], rel=1e-6
    )
    assert (cost.transfer_overhead_s, cost.per_transfer_token_s) == pytest.approx(TRUE["handoff"], rel=1e-6)
    assert cost.path_s == pytest.approx(TRUE["path"], rel=1e-6)
    assert cost.prefill_shared == pytest.approx(TRUE["prefill_shared"], rel=1e-6)
    assert cost.decode_shared == 0.0  # no gap overlapped a prefill
    assert max(cost.noise) == pytest.approx(1.0, abs=1e-4) and min(cost.noise) == pytest.approx(1.0, abs=1e-4)


def test_requests_after_idle_raise_the_fixed_costs_not_the_slopes() -> None:
    """probe-idle requests that pay 20 ms more prefill, 10 ms more hand-off and a 40 ms path: the
    intercepts take exactly that, the per-token slopes stay probe-c1's; one that queued is ignored."""
    records, now = _probe_records(), 100.0
    h0, h1 = TRUE["handoff"]
    idle = []
    for i, prompt in enumerate([16, 48, 16, 48, 16, 48]):
        prefill = _prefill_s(prompt) + 0.020
        later = [_decode_gap(1, prompt + k + 1) for k in range(1, 9)]
        first_gap = h0 + 0.010 + h1 * prompt + sum(later) / len(later)
        record = _record(30 + i, prompt, now, now + 0.040 + prefill, [first_gap, *later], prefill)
        record.timings["queue_ms"] = 5.0
        idle.append(record)
        now = record.end_s + 2.0
    busy = _record(40, 16, now, now + 1.0, [0.5, 0.5, 0.5], 0.9)
    busy.timings["queue_ms"] = 400.0  # found the cluster busy: not an idle request
    records["probe-idle"] = [*idle, busy]
    cost = fit_served(records, 1000, "test")
    assert cost.prefill_s == pytest.approx(TRUE["prefill"][0] + 0.020, rel=1e-6)
    assert (cost.per_prefill_token_s, cost.per_prefill_pair_s) == pytest.approx(TRUE["prefill"][1:], rel=1e-6)
    assert cost.transfer_overhead_s == pytest.approx(h0 + 0.010, rel=1e-6)
    assert cost.per_transfer_token_s == pytest.approx(h1, rel=1e-6)
    assert cost.path_s == pytest.approx(0.040, rel=1e-6)


@pytest.mark.parametrize(
    "cost",
    [
        RooflineCost(MODELS["llama-70b"], NodeSpec(DEVICES["H100"], 8, 100e9)),
        LinearCost(1000, 0.04, 3e-4, 2e-5, 2e-9, 2e-8, 1e9, 0.002, "test"),
        ServedCost(1000, 0.06, 7e-4, 2e-7, 0.02, 0.004, 1e-6, 0.015, 5e-6, 0.012, 0.5, 0.2, "test"),
    ],
)
def test_decode_durations_are_step_s_bit_for_bit(cost) -> None:
    batch, context = 37, 37 * 3001.0
    expected = [cost.step_s(decode_step(batch, context + k * batch)) for k in range(64)]
    assert cost.decode_durations(batch, context, 64) == expected


def test_the_path_cost_is_in_ttft_and_e2e_not_in_tpot() -> None:
    cost = ServedCost(1000, 0.05, 0.0, 0.0, 0.01, 0.0, 0.0, 0.003, 0.0, 0.02, 0.0, 0.0, "test")
    shape = PoolShape(1, 1000, 2048, 64)
    sim = Simulation(SimConfig(shape, shape, 16, 64, RouterConfig(block_size=64)), cost)
    summary = sim.run([SimRequest(0, 0.0, 100, 5, (1, 2))]).summary()
    assert summary["ttft_ms"]["p50"] == pytest.approx((0.05 + 0.02) * 1e3, rel=0.005)
    # 4 decode steps of 10 ms after the first token, the first waiting 3 ms for the hand-off
    assert summary["tpot_ms"]["p50"] == pytest.approx((0.003 + 4 * 0.01) / 4 * 1e3, rel=0.005)
    assert summary["e2e_ms"]["p50"] == pytest.approx((0.05 + 0.02 + 0.003 + 0.04) * 1e3, rel=0.005)


def test_a_sorted_run_lands_in_the_same_bins_as_one_add_per_step() -> None:
    from capacity.metrics import LogHistogram

    runs = [[0.0295 + 1e-6 * k for k in range(64)], [0.01 * 1.003**k for k in range(40)], [0.02]]
    one, whole = LogHistogram(), LogHistogram()
    for run in runs:
        for value in run:
            one.add(value, 7)
        whole.add_run(run, 7, sorted_run=True)
    assert dict(whole.bins) == dict(one.bins) and whole.count == one.count
    assert whole.total == pytest.approx(one.total, rel=1e-12)
