"""engine.bench's step breakdown: operators land in the right rows, and the rows add up to the time."""

from __future__ import annotations

import time

import pytest
import torch

from engine.bench import OTHER_OPS, UNTRACKED, PdserveSide, categorize, step_breakdown
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from tests.engine.engine_helpers import assert_pool_empty


def test_categorize_sorts_operators_and_keeps_the_rest_as_untracked() -> None:
    ops = {"aten::mm": 3.0, "aten::addmm": 1.0, "aten::cat": 0.5, "aten::softmax": 0.25}
    rows = categorize(ops, wall_ms=10.0)
    assert rows["matmul (weights)"] == 4.0
    assert rows["KV cache copies"] == 0.5
    assert rows["attention kernel"] == 0.0
    assert rows[OTHER_OPS] == 0.25
    assert rows[UNTRACKED] == pytest.approx(10.0 - 4.75)
    assert sum(rows.values()) == pytest.approx(10.0)


def test_step_breakdown_of_the_engine_profiles_real_decode_steps() -> None:
    engine = LLMEngine(EngineConfig(kv_cache_bytes=16 * 2**20))
    side = PdserveSide(engine, time.perf_counter)
    rows = step_breakdown(side, batch=4, prompt_len=20, new_tokens=6)
    assert set(rows) == {"matmul (weights)", "attention kernel", "KV cache copies", OTHER_OPS, UNTRACKED}
    # Decode steps run the model: the profiler must have seen its matmuls and its attention.
    assert rows["matmul (weights)"] > 0
    assert rows["attention kernel"] > 0
    assert_pool_empty(engine)


def test_kernel_floor_times_every_projection_of_the_model() -> None:
    from engine.bench import kernel_floor
    from engine.builtin import build_builtin_hf_model

    engine = LLMEngine(EngineConfig(kv_cache_bytes=16 * 2**20))
    floor = kernel_floor(engine, batch=4, context=24)
    # The reference count comes from transformers' own model of the same config: its nn.Linear modules.
    hf_linears = [m for m in build_builtin_hf_model().modules() if isinstance(m, torch.nn.Linear)]
    assert floor["projections"] == len(hf_linears)
    for kind in ("weight matmuls", "weight matmuls, oneDNN packed", "attention", "KV read"):
        assert floor[kind] > 0, kind
    assert_pool_empty(engine)
