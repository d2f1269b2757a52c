"""The planner's arithmetic against the issue's worked 70B check and hand-computed references."""

from __future__ import annotations

import json
import struct
from dataclasses import replace

import pytest
from click.testing import CliRunner

from capacity.costs import RooflineCost
from capacity.model import DEVICES, MIB, MODELS, NodeSpec, model_from_checkpoint
from capacity.plan import SLOs, WorkloadStats, kv_concurrency, max_batch_within, plan
from engine.kv_memory import kv_bytes_per_token

LLAMA_70B = replace(MODELS["llama-70b"], num_params=70e9)  # fp16: 140 GB of weights, as in the issue
NODE = NodeSpec(DEVICES["H100"], tp=8, reserved_bytes=100e9)


def test_70b_kv_per_token_is_0_3125_mib() -> None:
    by_hand = 2 * 80 * 8 * 128 * 2  # K and V x layers x KV heads x head dim x fp16 bytes
    assert LLAMA_70B.kv_bytes_per_token == by_hand == kv_bytes_per_token(80, 8, 128, "float16")
    assert by_hand / MIB == 0.3125


def test_70b_node_holds_about_1_28m_tokens_and_300_4k_requests() -> None:
    budget, tokens, concurrent_4k = kv_concurrency(LLAMA_70B, NODE, 4096)
    assert budget == 8 * 80e9 - 140e9 - 100e9 == 400e9
    # 400 GB / 327,680 B = 1.22M tokens; the "~1.28M" divides by 312,500 B (0.3125 "MB"): within 5 %
    assert tokens == int(400e9 // 327_680)
    assert tokens == pytest.approx(1.28e6, rel=0.05)
    assert concurrent_4k == tokens // 4096 == pytest.approx(300, abs=5)


def test_decode_batch_is_the_largest_within_the_tpot_budget() -> None:
    cost = RooflineCost(LLAMA_70B, NODE)
    batch, step = max_batch_within(cost, 0.036, 3200, 10_000)
    from capacity.costs import decode_step

    assert step <= 0.036 < cost.step_s(decode_step(batch + 1, (batch + 1) * 3200))


def test_plan_for_the_10m_dau_product_is_kv_bound_and_shrinks_prefill_with_hits() -> None:
    cost = RooflineCost(LLAMA_70B, NODE)
    workload = WorkloadStats(3000, 400, 6000, 5000)
    plans = [plan(LLAMA_70B, NODE, cost, workload, hit, SLOs(0.7, 0.04)) for hit in (0.0, 0.4, 0.8)]
    assert [p.prefill_nodes for p in plans] == sorted((p.prefill_nodes for p in plans), reverse=True)
    assert plans[0].prefill_nodes > 3 * plans[2].prefill_nodes  # misses cost prefill super-linearly
    assert len({p.decode_nodes for p in plans}) == 1  # decode does not depend on the hit rate
    for p in plans:
        assert p.decode_batch == p.concurrency_per_node  # KV fills before TPOT binds at 3.4k tokens
        # the decode pool carries the peak's tokens: nodes x tokens/s/node >= rate x output tokens
        assert p.decode_nodes * p.decode_tokens_per_s_per_node >= 5000 * 400
        assert p.prefill_nodes * p.prefill_max_utilization / p.prefill_service_s >= 5000 * 0.999


def test_model_from_checkpoint_reads_config_and_safetensors_header(tmp_path) -> None:
    config = {
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "hidden_size": 576,
        "vocab_size": 49152,
        "torch_dtype": "bfloat16",
        "max_position_embeddings": 8192,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    header = json.dumps(
        {
            "a": {"dtype": "BF16", "shape": [49152, 576], "data_offsets": [0, 0]},
            "b": {"dtype": "BF16", "shape": [3, 5, 7], "data_offsets": [0, 0]},
        }
    ).encode()
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    spec = model_from_checkpoint(tmp_path)
    assert (spec.num_layers, spec.num_heads, spec.num_kv_heads, spec.head_dim) == (30, 9, 3, 64)
    assert spec.num_params == 49152 * 576 + 105
    assert (
        spec.kv_bytes_per_token == MODELS["smollm2-135m-instruct"].kv_bytes_per_token == 2 * 30 * 3 * 64 * 2
    )


def test_pdserve_plan_prints_the_worked_figures() -> None:
    from cluster.cli import main

    result = CliRunner().invoke(main, ["plan", "--model", "llama-70b", "--params", "70e9", "--json"])
    assert result.exit_code == 0, result.output
    figures = json.loads(result.output)
    assert figures["kv_bytes_per_token"] == 327_680
    assert figures["concurrency_4k_per_node"] == int(400e9 // 327_680) // 4096
    assert figures["prefill_nodes"] > 0 and figures["decode_nodes"] > 0
