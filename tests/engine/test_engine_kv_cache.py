"""KV pool: memory math logged at start, allocation through kv_allocator, stats snapshot."""

from __future__ import annotations

import logging

import pytest
import torch

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from tests.engine.engine_helpers import (
    assert_pool_empty,
    build_model,
    greedy,
    make_prompts,
    run_to_completion,
)


def test_memory_math_is_logged_and_sizes_the_pool(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="engine.kv_cache")
    engine = LLMEngine(EngineConfig(kv_cache_bytes=10 * 2**20 + 5), hf_model=build_model("llama"))
    bytes_per_token = 2 * 2 * 2 * 16 * 4  # K and V x 2 layers x 2 kv heads x head_dim 16 x float32
    assert engine.kv_layout.bytes_per_token == bytes_per_token
    num_blocks = (10 * 2**20 + 5) // (bytes_per_token * 16)
    assert engine.kv_cache.shape == (num_blocks, 2, 2, 16, 2, 16)
    assert f"= {bytes_per_token};" in caplog.text and f"-> {num_blocks} blocks" in caplog.text
    assert engine.max_model_len == 1024  # the model's context is shorter than the pool
    assert_pool_empty(engine)


def test_kv_allocator_memory_is_the_pool() -> None:
    handed_out: list[torch.Tensor] = []

    def allocator(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        # garbage: the engine must zero it
        tensor = torch.full(shape, float("nan"), dtype=dtype, device=device)
        handed_out.append(tensor)
        return tensor

    model = build_model("llama")
    engine = LLMEngine(EngineConfig(kv_cache_bytes=2**20), kv_allocator=allocator, hf_model=model)
    assert len(handed_out) == 1 and engine.kv_cache.data_ptr() == handed_out[0].data_ptr()
    reference = LLMEngine(EngineConfig(kv_cache_bytes=2**20), hf_model=model)
    prompt = make_prompts([45], seed=8)[0]
    results = []
    for current in (engine, reference):
        current.add_request("r", prompt, greedy(10))
        results.append([t for o in run_to_completion(current)["r"] for t in o.new_token_ids])
    assert results[0] == results[1]
    assert int(torch.count_nonzero(handed_out[0])) > 0  # the KV really went into the handed-out memory
    for current in (engine, reference):
        assert_pool_empty(current)


def test_stats_snapshot() -> None:
    engine = LLMEngine(
        EngineConfig(kv_cache_bytes=2**20, max_num_batched_tokens=32), hf_model=build_model("llama")
    )
    prompts = make_prompts([40, 70], seed=8)
    engine.add_request("a", prompts[0], greedy(3), tenant="t1")
    engine.add_request("b", prompts[1], greedy(3), tenant="t2")
    engine.step()
    stats = engine.stats()
    assert stats.num_running == 1 and stats.num_waiting == 1  # the 32-token budget admits one chunk
    assert stats.num_queued_prefill_tokens == (40 - 32) + 70
    assert stats.num_blocks_used == 2 and 0 < stats.kv_usage < 1
    run_to_completion(engine)
    stats = engine.stats()
    assert stats.num_prompt_tokens == 110 and stats.num_generated_tokens == 6 and stats.num_cached_tokens == 0
    assert stats.num_blocks_cached == 40 // 16 + 70 // 16  # full prompt blocks stay cached
    assert_pool_empty(engine)
