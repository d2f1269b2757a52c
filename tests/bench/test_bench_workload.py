"""Workload construction: arrivals, lengths, clipping, determinism, options parsing."""

from __future__ import annotations

import numpy as np
import pytest

from cluster.bench.config import SLO, BenchConfig, LengthClass, parse_length_mix
from cluster.bench.workload import Workload, clip_lengths, spread_ties, trace_arrivals
from router.traces import TraceRecord
from tests.shared_data import require_shared

AZURE = "data/azure/AzureLLMInferenceTrace_conv.csv"  # under ../shared
MOONCAKE = "data/mooncake/conversation_trace.jsonl"


def test_spread_ties_spreads_runs_up_to_the_next_timestamp():
    assert spread_ties([0.0, 0.0, 0.0, 3.0, 3.0, 6.0]) == pytest.approx([0.0, 1.0, 2.0, 3.0, 4.5, 6.0])
    assert spread_ties([1.0, 2.0]) == [1.0, 2.0]


def test_trace_arrivals_scale_and_start():
    records = [TraceRecord(t, 10, 5, None, i) for i, t in enumerate([10.0, 10.5, 12.0, 20.0])]
    assert trace_arrivals(records, 2.0) == pytest.approx([0.0, 1.0, 4.0, 20.0])
    assert trace_arrivals(records, 1.0, start_s=1.0) == pytest.approx([0.0, 8.0])   # 12.0 and 20.0


def test_clip_lengths_keeps_prompt_first():
    assert clip_lengths(100, 50, 4096) == (100, 50, False)
    assert clip_lengths(5000, 50, 4096) == (4095, 1, True)
    assert clip_lengths(4000, 200, 4096) == (4000, 96, True)
    assert clip_lengths(0, 0, 4096) == (1, 1, True)


def test_synthetic_mix_is_deterministic_and_weighted():
    config = BenchConfig(arrival="poisson", rate=10.0, num_requests=400, seed=1,
                         lengths=parse_length_mix("16x4:3,64x2:1"))
    first, second = list(Workload(config)), list(Workload(config))
    assert first == second
    assert all(r.prompt_token_ids and max(r.prompt_token_ids) < 256 for r in first)
    long_share = sum(len(r.prompt_token_ids) == 64 for r in first) / len(first)
    assert 0.18 < long_share < 0.32                      # weight 1/4; 400 draws: sd ~0.02
    gaps = np.diff([r.arrival_s for r in first])
    assert np.mean(gaps) == pytest.approx(0.1, rel=0.2)  # Poisson at 10 req/s
    assert len({r.prompt_token_ids for r in first}) == len(first)   # no accidental shared prompts


def test_duration_bounds_open_loop_and_closed_loop_has_no_arrivals():
    config = BenchConfig(arrival="poisson", rate=5.0, duration_s=10.0, seed=0)
    requests = list(Workload(config))
    assert all(r.arrival_s < 10.0 for r in requests) and 30 < len(requests) < 75
    closed = BenchConfig(arrival="closed", concurrency=2, num_requests=5)
    assert [r.arrival_s for r in Workload(closed)] == [None] * 5


def test_azure_trace_replay_scaled():
    config = BenchConfig(arrival="trace", trace=str(require_shared(AZURE)), time_scale=2.0,
                         length_scale=0.25, duration_s=20.0, seed=0)
    requests = list(Workload(config))
    # the first rows of the file: 2023-11-16 18:15:46.68 374/44, 18:15:50.99 396/109
    assert requests[0].arrival_s == 0.0 and len(requests[0].prompt_token_ids) == round(374 * 0.25)
    assert requests[0].max_tokens == 11
    assert requests[1].arrival_s == pytest.approx((50.995169 - 46.68059) * 2.0)
    assert all(r.arrival_s < 20.0 for r in requests)
    assert all(len(r.prompt_token_ids) + r.max_tokens <= 4096 for r in requests)


def test_mooncake_shared_hash_ids_share_prefixes():
    trace = str(require_shared(MOONCAKE))
    config = BenchConfig(arrival="trace", trace=trace, length_scale=1 / 16, num_requests=3)
    first, second, _ = list(Workload(config))
    # both records start with hash id 0 (512 tokens -> 32 after scaling), then differ
    assert first.prompt_token_ids[:32] == second.prompt_token_ids[:32]
    assert first.prompt_token_ids[32:64] != second.prompt_token_ids[32:64]
    # Mooncake's first records share timestamp 0: spread, not a burst
    assert first.arrival_s == 0.0 < second.arrival_s


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="duration_s or num_requests"):
        BenchConfig()
    with pytest.raises(ValueError, match=r"BenchConfig\.rate"):
        BenchConfig(rate=0.0, num_requests=1)
    with pytest.raises(ValueError, match="trace"):
        BenchConfig(arrival="trace", num_requests=1)
    with pytest.raises(ValueError, match="LengthClass"):
        LengthClass(0, 1)


def test_option_parsing():
    assert SLO.parse(["ttft:500 tpot:50"]) == SLO(ttft_ms=500, tpot_ms=50)
    assert SLO.parse(["ttft:500", "e2e:2000"]) == SLO(ttft_ms=500, e2e_ms=2000)
    with pytest.raises(ValueError, match="ttft:MS"):
        SLO.parse(["latency:5"])
    assert parse_length_mix("32x64:0.9, 1536x2:0.1") == (LengthClass(32, 64, 0.9), LengthClass(1536, 2, 0.1))
    with pytest.raises(ValueError, match="INPUTxOUTPUT"):
        parse_length_mix("32-64")
