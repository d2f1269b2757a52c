"""The concurrency sweep's pure parts (cluster/bench/sweep.py) and the knee predictors (capacity.knee)."""

from __future__ import annotations

import pytest

from capacity.costs import LinearCost
from capacity.knee import planner_throughput, predicted_knees
from cluster.bench.sweep import find_knee, parse_levels, plot_sweep, sweep_table

# 5 ms per step + 50 us per token + 1 ms per sequence: a prefill of 128 tokens takes 12.4 ms
COST = LinearCost(1000, 0.005, 50e-6, 0.001, 0.0, 0.0, 1e9, 0.001, "test")


def test_parse_levels() -> None:
    assert parse_levels("1,2,4, 8") == [1, 2, 4, 8]
    for bad in ("", "0,1", "4,2", "1,x", "2,2"):
        with pytest.raises(ValueError):
            parse_levels(bad)


def test_knee_is_the_first_level_whose_doubling_adds_under_10_percent() -> None:
    levels = [1, 2, 4, 8, 16]
    assert find_knee(levels, [10, 19, 35, 37, 38]) == 4
    assert find_knee(levels, [10, 20, 40, 80, 160]) is None
    assert find_knee(levels, [10, 10.5, 40, 80, 160]) == 1


def test_table_and_png(tmp_path) -> None:
    rows = [
        {
            "concurrency": c,
            "output_tokens_per_s": t,
            "request_throughput": t / 32,
            "ttft_p50_ms": 10.0 * c,
            "ttft_p99_ms": 20.0 * c,
            "tpot_p50_ms": 5.0,
            "tpot_p99_ms": 6.0,
            "kv_used_share": 0.01 * c,
            "kv_used_peak_share": 0.02 * c,
            "kv_used_mib": 4.0 * c,
            "num_failed": 0,
        }
        for c, t in ((1, 100.0), (2, 190.0), (4, 200.0))
    ]
    table = sweep_table(rows, find_knee([1, 2, 4], [100.0, 190.0, 200.0]), "t")
    assert "| 2 **knee** | 190.0 |" in table and "knee at concurrency 2" in table
    plot_sweep([("measured", rows)], tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_planner_throughput_at_one_is_one_request_cycle_and_never_beats_prefill() -> None:
    from capacity.costs import decode_step, prefill_step

    prefill = COST.step_s(prefill_step([(0, 128)]))  # 12.4 ms
    transfer = COST.transfer_s(128 * 1000)
    decode = 31 * COST.step_s(decode_step(1, 144))  # 31 decode steps of one sequence
    one = planner_throughput(COST, 1, 128, 32, kv_blocks=100_000, block_size=16, max_num_seqs=64)
    assert one["output_tokens_per_s"] == pytest.approx(32 / (prefill + transfer + decode), rel=1e-6)
    for concurrency in (8, 64, 512):
        row = planner_throughput(COST, concurrency, 128, 32, kv_blocks=100_000, block_size=16, max_num_seqs=8)
        assert row["output_tokens_per_s"] <= 32 / prefill + 1e-9


def test_both_predictors_find_a_knee_on_a_saturating_machine() -> None:
    result = predicted_knees(COST, [1, 2, 4, 8, 16, 32, 64, 128], 128, 32, kv_blocks=2000)
    for name in ("planner", "simulator"):
        throughputs = [r["output_tokens_per_s"] for r in result[name]["rows"]]
        assert result[name]["knee"] is not None, (name, throughputs)
        assert throughputs[0] < throughputs[-1]
