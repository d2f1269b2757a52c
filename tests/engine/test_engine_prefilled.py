"""The prefilled state: a prefill_only request whose first token does not end it leaves the engine as
"prefilled" (blocks pinned), never "length"; one whose first token ends it reports the engine's real
reason, with the stop rules checked in the engine's own order (stop ids, eos, stop strings, max_tokens,
context). Nothing outside the engine re-derives a stop."""

from __future__ import annotations

import pytest

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.outputs import PREFILLED
from engine.sampling import SamplingParams
from engine.tokenizer import ByteTokenizer
from tests.engine.engine_helpers import assert_pool_empty, build_model, greedy, make_engine, make_prompts

PROMPT = make_prompts([21], seed=4)[0]


@pytest.fixture(scope="module")
def model():
    return build_model("llama")


def _first_token(engine: LLMEngine, prompt: list[int]) -> int:
    engine.add_request("probe", prompt, greedy(1))
    (output,) = engine.step()
    return output.new_token_ids[0]


def _prefill(engine: LLMEngine, request_id: str, prompt: list[int], params: SamplingParams):
    engine.add_request(request_id, prompt, params, prefill_only=True)
    (output,) = engine.step()
    assert output.finished and len(output.new_token_ids) == 1
    assert engine.pinned_blocks(request_id)  # pinned in every case; the worker unpins an ended one
    engine.release_pinned(request_id)
    return output


def test_a_prefill_that_goes_on_is_prefilled_not_length(model) -> None:
    engine = make_engine(model)
    output = _prefill(engine, "r", PROMPT, greedy(8))
    assert output.finish_reason == PREFILLED == "prefilled" and output.is_prefilled
    assert_pool_empty(engine)


def test_a_first_token_that_ends_the_request_reports_the_real_reason(model) -> None:
    engine = make_engine(model)
    first = _first_token(engine, PROMPT)
    cases = {
        "stop": greedy(8, stop_token_ids=(first,)),
        "length": greedy(1),
    }
    for reason, params in cases.items():
        output = _prefill(engine, reason, PROMPT, params)
        assert output.finish_reason == reason and not output.is_prefilled
    assert_pool_empty(engine)


def test_stop_ids_come_before_eos_as_in_decode(model) -> None:
    probe = make_engine(model)
    first = _first_token(probe, PROMPT)

    class EosTokenizer(ByteTokenizer):
        eos_token_id = first

    engine = LLMEngine(EngineConfig(kv_cache_bytes=2**20), hf_model=model, tokenizer=EosTokenizer())
    both = SamplingParams(max_tokens=8, stop_token_ids=(first,))
    assert _prefill(engine, "both", PROMPT, both).finish_reason == "stop"  # the stop id is checked first
    assert _prefill(engine, "eos", PROMPT, SamplingParams(max_tokens=8)).finish_reason == "eos"
    ignored = SamplingParams(max_tokens=8, ignore_eos=True)
    assert _prefill(engine, "ignored", PROMPT, ignored).finish_reason == PREFILLED
    assert_pool_empty(engine)


def test_a_full_context_is_context_not_prefilled(model) -> None:
    engine = make_engine(model, max_model_len=len(PROMPT) + 1)
    output = _prefill(engine, "full", PROMPT, greedy(8))
    assert output.finish_reason == "context"
    assert_pool_empty(engine)
