"""Acceptance 1: greedy tokens identical to transformers generate, logits within 1e-4, in four modes."""

from __future__ import annotations

import pytest
import torch

from tests.engine.engine_helpers import (
    assert_pool_empty,
    build_model,
    greedy,
    hf_greedy,
    logits_of,
    make_engine,
    make_prompts,
    run_to_completion,
    tokens_of,
)

PROMPT_LENGTHS = [1, 5, 16, 31, 64, 127, 200, 300]
NEW_TOKENS = 64
LOGITS_ATOL = 1e-4


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3"])
def case(request):
    model = build_model(request.param)
    prompts = make_prompts(PROMPT_LENGTHS, seed=1)
    references = [hf_greedy(model, prompt, NEW_TOKENS) for prompt in prompts]
    return request.param, model, prompts, references


def _check(outputs, prompts, references) -> None:
    for index, (prompt, reference) in enumerate(zip(prompts, references, strict=True)):
        got = outputs[f"r{index}"]
        assert tokens_of(got) == reference.token_ids, f"prompt {index} ({len(prompt)} tokens): tokens differ"
        diff = (logits_of(got) - reference.logits).abs().max().item()
        assert diff <= LOGITS_ATOL, f"prompt {index}: logits differ by {diff}"
        assert got[-1].finished and got[-1].finish_reason == "length"


def _add_all(engine, prompts) -> None:
    for index, prompt in enumerate(prompts):
        engine.add_request(f"r{index}", prompt, greedy(NEW_TOKENS, return_logits=True))


def test_one_at_a_time(case) -> None:
    _, model, prompts, references = case
    engine = make_engine(model)
    outputs = {}
    for index, prompt in enumerate(prompts):
        engine.add_request(f"r{index}", prompt, greedy(NEW_TOKENS, return_logits=True))
        outputs.update(run_to_completion(engine))
    _check(outputs, prompts, references)
    assert_pool_empty(engine)


def test_continuous_batching_then_prefix_cache(case) -> None:
    _, model, prompts, references = case
    engine = make_engine(model)
    _add_all(engine, prompts)
    _check(run_to_completion(engine), prompts, references)
    assert_pool_empty(engine)
    # (d) the same prompts again: their full blocks come from the prefix cache.
    _add_all(engine, prompts)
    outputs = run_to_completion(engine)
    _check(outputs, prompts, references)
    for index, prompt in enumerate(prompts):
        expected_cached = (len(prompt) - 1) // 16 * 16
        assert outputs[f"r{index}"][0].num_cached_tokens == expected_cached
    assert engine.stats().num_cached_tokens > 0
    assert_pool_empty(engine)


@pytest.mark.parametrize("decode_mirror_bytes", [0, 2**20], ids=["gather", "mirror"])
def test_chunked_prefill_32(case, decode_mirror_bytes: int) -> None:
    """Chunks of 32 tokens mixed with decodes; decode attention gathers blocks or reads the mirror."""
    _, model, prompts, references = case
    engine = make_engine(model, max_num_batched_tokens=32, decode_mirror_bytes=decode_mirror_bytes)
    _add_all(engine, prompts)
    _check(run_to_completion(engine), prompts, references)
    assert_pool_empty(engine)


def test_chunked_prefill_with_prefix_cache_and_preemption(case) -> None:
    """A pool too small for all 8 at once: requests are preempted and recomputed, tokens still exact."""
    name, model, prompts, references = case
    probe = make_engine(model)
    block_bytes = probe.kv_layout.block_bytes
    engine = make_engine(model, max_num_batched_tokens=48, kv_cache_bytes=40 * block_bytes)
    _add_all(engine, prompts)
    _check(run_to_completion(engine), prompts, references)
    assert engine.stats().num_preemptions > 0, name
    assert_pool_empty(engine)


def test_mistral_greedy_matches() -> None:
    model = build_model("mistral")
    prompts = make_prompts([3, 40, 90], seed=2)
    engine = make_engine(model, max_num_batched_tokens=32)
    _add_all(engine, prompts)
    references = [hf_greedy(model, prompt, 24) for prompt in prompts]
    outputs = run_to_completion(engine)
    for index, reference in enumerate(references):
        assert tokens_of(outputs[f"r{index}"])[:24] == reference.token_ids
        diff = (logits_of(outputs[f"r{index}"])[:24] - reference.logits).abs().max().item()
        assert diff <= LOGITS_ATOL
    assert_pool_empty(engine)


def test_builtin_model_matches_transformers() -> None:
    from engine.builtin import build_builtin_hf_model

    engine = make_engine(None)
    model = build_builtin_hf_model()
    prompt = engine.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 3)
    engine.add_request("b", prompt, greedy(32, return_logits=True))
    outputs = run_to_completion(engine)["b"]
    reference = hf_greedy(model, prompt, 32)
    assert tokens_of(outputs) == reference.token_ids
    assert (logits_of(outputs) - reference.logits).abs().max().item() <= LOGITS_ATOL
    assert torch.equal(engine.model.lm_head.weight, model.lm_head.weight)
    assert_pool_empty(engine)
