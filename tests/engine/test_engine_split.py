"""The worker-facing split: prefill_only on one engine, KV copied block by block, decode on another,
gives the tokens of the single-process engine (greedy and seeded sampling)."""

from __future__ import annotations

import pytest

from engine.block_hash import block_hashes
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


@pytest.mark.parametrize(
    "params",
    [
        greedy(24),
        SamplingParams(temperature=0.9, top_k=40, seed=3, max_tokens=24, ignore_eos=True),
        SamplingParams(temperature=0.9, max_tokens=24, ignore_eos=True),
    ],  # seed=None: derived from the id
    ids=["greedy", "seeded", "request-id-seeded"],
)
def test_prefill_then_decode_elsewhere_matches_colocated(params: SamplingParams) -> None:
    model = build_model("llama")
    prompts = make_prompts([37, 48, 5], seed=9)
    colocated = make_engine(model)
    for index, prompt in enumerate(prompts):
        colocated.add_request(f"r{index}", prompt, params)
    expected = {rid: tokens_of(outs) for rid, outs in run_to_completion(colocated).items()}

    prefill, decode = make_engine(model), make_engine(model, kv_cache_bytes=4 * 2**20)
    decode.allocate_blocks("warm", 40)  # so local block ids differ from the prefill side's
    for index, prompt in enumerate(prompts):
        rid = f"r{index}"
        prefill.add_request(rid, prompt, params, prefill_only=True)
        first = run_to_completion(prefill)[rid]
        assert first[-1].finished and len(first[-1].new_token_ids) == 1
        remote = prefill.pinned_blocks(rid)
        assert decode.can_allocate_blocks(len(remote))
        local = decode.allocate_blocks(rid, len(prompt))
        assert len(local) == len(remote)
        decode.kv_cache[local] = prefill.kv_cache[remote]  # what a KV transport does, block by block
        prefill.release_pinned(rid)
        decode.add_prefilled_request(rid, prompt, first[0].new_token_ids[0], local, params)
        rest = tokens_of(run_to_completion(decode)[rid])
        assert first[0].new_token_ids + rest == expected[rid]
    decode.free_allocated("warm")
    for engine in (colocated, prefill, decode):
        assert_pool_empty(engine)


def test_abort_is_idempotent_and_frees_everything() -> None:
    engine = make_engine(build_model("llama"))
    prompt = make_prompts([50], seed=2)[0]
    engine.add_request("run", prompt, greedy(50))
    engine.add_request("pin", prompt, greedy(5), prefill_only=True)
    engine.step()
    engine.allocate_blocks("pull", 70)
    engine.add_request("wait", prompt, greedy(5))
    for request_id in ("run", "pin", "pull", "wait", "run", "missing"):
        engine.abort_request(request_id)
    run_to_completion(engine)
    assert_pool_empty(engine)


def test_stats_count_every_request_taken_in_and_no_rejected_one() -> None:
    """``num_requests_added``: what a load report tells the router it has received (router/load.py)."""
    engine = make_engine(build_model("llama"))
    prompt = make_prompts([20], seed=4)[0]
    assert engine.stats().num_requests_added == 0
    engine.add_request("a", prompt, greedy(2))
    engine.allocate_blocks("pull", 40)
    with pytest.raises(ValueError):
        engine.add_request("a", prompt, greedy(2))  # a duplicate id is refused, not counted
    with pytest.raises(ValueError):
        engine.add_request("empty", [], greedy(2))
    assert engine.stats().num_requests_added == 2
    engine.free_allocated("pull")
    run_to_completion(engine)
    assert engine.stats().num_requests_added == 2


def test_requests_done_counts_each_request_once_after_its_blocks_are_cached() -> None:
    """``num_requests_done``: what a prefix summary tells the router the engine has finished with
    (router/load.py): a prefilled request counts once its full blocks are in the prefix index, an
    aborted one once, a finished one once; releasing or aborting again counts nothing."""
    engine = make_engine(build_model("llama"))
    prompts = make_prompts([40, 40, 20], seed=6)
    engine.add_request("p", prompts[0], greedy(4), prefill_only=True)
    engine.add_request("w", prompts[1], greedy(4))
    engine.abort_request("w")  # waiting: leaves at once
    assert engine.num_requests_done == 1
    while engine.num_requests_done < 2:
        engine.step()
    block_size = engine.config.block_size
    hashes = block_hashes(prompts[0], block_size)
    assert len(hashes) == len(prompts[0]) // block_size and all(h in engine.pool.index for h in hashes)
    engine.release_pinned("p")
    engine.abort_request("p")  # no longer in the engine: nothing to count
    engine.add_request("f", prompts[2], greedy(3))
    run_to_completion(engine)
    assert engine.num_requests_done == 3 and engine.stats().num_requests_added == 3


def test_failed_pull_frees_allocated_blocks() -> None:
    engine = make_engine(build_model("llama"))
    before = engine.stats().num_blocks_allocatable
    engine.allocate_blocks("pull", 100)
    assert engine.stats().num_blocks_allocatable == before - 7
    engine.free_allocated("pull")
    engine.free_allocated("pull")
    assert_pool_empty(engine)


def test_prefilled_request_checks_blocks_and_may_end_at_once() -> None:
    engine = make_engine(build_model("llama"))
    prompt = make_prompts([40], seed=2)[0]
    blocks = engine.allocate_blocks("r", len(prompt))
    with pytest.raises(ValueError, match="block_ids"):
        engine.add_prefilled_request("r", prompt, 5, blocks[:-1], greedy(4))
    engine.add_prefilled_request("r", prompt, 5, blocks, greedy(1))  # max_tokens=1: the first token ends it
    outputs = run_to_completion(engine)["r"]
    assert len(outputs) == 1 and outputs[0].finished and outputs[0].finish_reason == "length"
    assert outputs[0].new_token_ids == []  # the prefill side already reported token 5
    assert_pool_empty(engine)
