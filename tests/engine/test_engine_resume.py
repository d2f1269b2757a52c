"""A request resumed on another engine from the output tokens already reported (decode-replica
migration, cluster.migration): by KV pulled from a prefill of prompt + sent tokens, or by recomputing
them, the rest equals the single-process engine's tokens and text (greedy and seeded sampling)."""

from __future__ import annotations

import pytest

from engine.sampling import SamplingParams
from tests.engine.engine_helpers import (
    assert_pool_empty,
    build_model,
    greedy,
    make_engine,
    make_prompts,
    run_to_completion,
    tokens_of,
)

PARAMS = [
    greedy(20, detokenize=True),
    SamplingParams(temperature=0.9, top_k=40, seed=5, max_tokens=20, ignore_eos=True, detokenize=True),
]


def _undisturbed(model, prompt: list[int], params: SamplingParams) -> tuple[list[int], str]:
    engine = make_engine(model)
    engine.add_request("r", prompt, params)
    outputs = run_to_completion(engine)["r"]
    return tokens_of(outputs), "".join(o.new_text or "" for o in outputs)


@pytest.mark.parametrize("params", PARAMS, ids=["greedy", "seeded"])
@pytest.mark.parametrize("num_sent", [1, 7])
def test_resume_from_pulled_kv_of_prompt_and_sent_tokens(params: SamplingParams, num_sent: int) -> None:
    model = build_model("llama")
    prompt = make_prompts([29], seed=4)[0]
    expected, text = _undisturbed(model, prompt, params)
    sent = expected[:num_sent]
    prefill, decode = make_engine(model), make_engine(model)
    kv_prompt = prompt + sent[:-1]  # the KV a migration re-prefills; the last sent token has none yet
    prefill.add_request("m", kv_prompt, greedy(2), prefill_only=True)
    run_to_completion(prefill)
    remote = prefill.pinned_blocks("m")
    local = decode.allocate_blocks("m", len(kv_prompt))
    decode.kv_cache[local] = prefill.kv_cache[remote[: len(local)]]
    prefill.release_pinned("m")
    sent_text = text[: len(text) // 3] if num_sent > 1 else ""  # any prefix the client already has
    resumed = SamplingParams(**{**params.__dict__, "num_chars_sent": len(sent_text)})
    decode.add_prefilled_request("m", prompt, sent[-1], local, resumed, earlier_output_ids=sent[:-1])
    outputs = run_to_completion(decode)["m"]
    assert sent + tokens_of(outputs) == expected
    assert sent_text + "".join(o.new_text or "" for o in outputs) == text
    for engine in (prefill, decode):
        assert_pool_empty(engine)


@pytest.mark.parametrize("params", PARAMS, ids=["greedy", "seeded"])
def test_resume_by_recomputing_prompt_and_sent_tokens(params: SamplingParams) -> None:
    model = build_model("llama")
    prompt = make_prompts([41], seed=6)[0]
    expected, _ = _undisturbed(model, prompt, params)
    engine = make_engine(model)
    engine.add_request("m", prompt, params, output_token_ids=expected[:9])
    outputs = run_to_completion(engine)["m"]
    assert expected[:9] + tokens_of(outputs) == expected
    assert outputs[-1].finish_reason == "length"
    assert_pool_empty(engine)
