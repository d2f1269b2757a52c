"""Acceptance 5 and the sampler/stop rules: seeds, top-k/top-p, stop tokens and strings, limits."""

from __future__ import annotations

import pytest
import torch

from engine.config import EngineConfig
from engine.sampler import filter_logits, sample_one
from engine.sampling import SamplingParams
from engine.tokenizer import ByteTokenizer
from tests.engine.engine_helpers import (
    assert_pool_empty,
    build_model,
    greedy,
    make_engine,
    make_prompts,
    run_to_completion,
    tokens_of,
)


@pytest.fixture(scope="module")
def model():
    return build_model("qwen2")


def _generate(engine, params: SamplingParams, prompt: list[int], request_id: str = "r") -> list[int]:
    engine.add_request(request_id, prompt, params)
    return tokens_of(run_to_completion(engine)[request_id])


def test_same_seed_same_tokens_different_seed_different(model) -> None:
    engine = make_engine(model)
    prompt = make_prompts([20], seed=3)[0]
    params = SamplingParams(temperature=1.0, top_k=50, top_p=0.95, seed=7, max_tokens=32, ignore_eos=True)
    first = _generate(engine, params, prompt, "a")
    second = _generate(engine, params, prompt, "b")
    other = _generate(engine, SamplingParams(**{**params.__dict__, "seed": 8}), prompt, "c")
    assert first == second
    assert first != other
    assert first != _generate(engine, greedy(32), prompt, "d")  # really sampled, not greedy
    assert_pool_empty(engine)


def test_seed_is_independent_of_batch_company(model) -> None:
    """Position seeding: the same request gives the same tokens alone or batched with others."""
    engine = make_engine(model, max_num_batched_tokens=16)
    prompts = make_prompts([20, 33, 9], seed=4)
    params = SamplingParams(temperature=0.8, seed=11, max_tokens=20, ignore_eos=True)
    alone = _generate(engine, params, prompts[0], "alone")
    for index, prompt in enumerate(prompts):
        engine.add_request(f"r{index}", prompt, params)
    assert tokens_of(run_to_completion(engine)["r0"]) == alone
    assert_pool_empty(engine)


def test_top_k_one_and_tiny_top_p_are_greedy() -> None:
    logits = torch.randn(300, generator=torch.Generator().manual_seed(0))
    best = int(torch.argmax(logits))
    for position in range(20):
        assert sample_one(logits, SamplingParams(temperature=2.0, top_k=1), 5, position) == best
        assert sample_one(logits, SamplingParams(temperature=2.0, top_p=1e-6), 5, position) == best


def test_filter_logits_keeps_top_k_and_nucleus() -> None:
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert torch.isfinite(filter_logits(logits, 2, 1.0)).tolist() == [True, True, False, False]
    assert torch.isfinite(filter_logits(logits, 0, 0.8)).tolist() == [True, True, False, False]
    assert torch.isfinite(filter_logits(logits, 0, 0.81)).tolist() == [True, True, True, False]


def test_sampling_follows_the_distribution() -> None:
    logits = torch.log(torch.tensor([0.7, 0.2, 0.1]))
    counts = torch.zeros(3)
    for position in range(2000):
        counts[sample_one(logits, SamplingParams(temperature=1.0), 3, position)] += 1
    assert torch.allclose(counts / 2000, torch.tensor([0.7, 0.2, 0.1]), atol=0.04)


def test_stop_token_id_max_tokens_and_context(model) -> None:
    engine = make_engine(model)
    prompt = make_prompts([10], seed=6)[0]
    reference = _generate(engine, greedy(12), prompt, "ref")
    engine.add_request("stop", prompt, greedy(12, stop_token_ids=(reference[4],)))
    outputs = run_to_completion(engine)["stop"]
    first_hit = reference.index(reference[4])
    assert tokens_of(outputs) == reference[: first_hit + 1]
    assert outputs[-1].finish_reason == "stop"
    assert run_to_completion_reason(engine, prompt, greedy(3)) == "length"
    small = make_engine(model, max_model_len=24)
    small.add_request("ctx", prompt, greedy(100))
    outputs = run_to_completion(small)["ctx"]
    assert outputs[-1].finish_reason == "context" and len(tokens_of(outputs)) == 24 - len(prompt)
    assert_pool_empty(engine)
    assert_pool_empty(small)


def run_to_completion_reason(engine, prompt: list[int], params: SamplingParams) -> str | None:
    engine.add_request("x", prompt, params)
    return run_to_completion(engine)["x"][-1].finish_reason


def test_eos_stops_unless_ignored(model) -> None:
    engine = make_engine(model)
    prompt = make_prompts([10], seed=6)[0]
    reference = _generate(engine, greedy(12), prompt, "ref")

    class EosTokenizer(ByteTokenizer):
        eos_token_id = reference[2]

    from engine.llm_engine import LLMEngine

    eos_engine = LLMEngine(EngineConfig(kv_cache_bytes=2**20), hf_model=model, tokenizer=EosTokenizer())
    eos_engine.add_request("e", prompt, SamplingParams(max_tokens=12))
    outputs = run_to_completion(eos_engine)["e"]
    assert outputs[-1].finish_reason == "eos"
    assert tokens_of(outputs) == reference[: reference.index(reference[2]) + 1]
    eos_engine.add_request("i", prompt, SamplingParams(max_tokens=12, ignore_eos=True))
    assert tokens_of(run_to_completion(eos_engine)["i"]) == reference
    assert_pool_empty(engine)
    assert_pool_empty(eos_engine)


def test_stop_string_is_cut_from_text() -> None:
    engine = make_engine(None)  # built-in model, byte tokenizer
    prompt = engine.tokenizer.encode("Once upon a time")
    engine.add_request("full", prompt, greedy(40, detokenize=True))
    full = run_to_completion(engine)["full"]
    text = "".join(o.new_text or "" for o in full)
    assert len(text) >= 8, "the built-in model should emit some bytes"
    stop = text[5:8]
    engine.add_request("stopped", prompt, greedy(40, stop=(stop,)))
    outputs = run_to_completion(engine)["stopped"]
    streamed = "".join(o.new_text or "" for o in outputs)
    assert outputs[-1].finish_reason == "stop"
    assert streamed == text[: text.index(stop)]
    assert stop not in streamed
    assert_pool_empty(engine)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"max_tokens": 0}, "max_tokens"),
    ],
)
def test_invalid_sampling_params_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"dtype": "int8"}, "dtype"), ({"block_size": 0}, "block_size"), ({"max_num_seqs": 0}, "max_num_seqs")],
)
def test_invalid_engine_config_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        EngineConfig(**kwargs)
