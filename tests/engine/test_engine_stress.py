"""Random arrivals, aborts and a tight pool: every surviving request gets exactly the tokens it gets
alone (whose exactness vs transformers test_engine_exactness checks), and nothing leaks."""

from __future__ import annotations

import random

import pytest

from engine.sampling import SamplingParams
from tests.engine.engine_helpers import assert_pool_empty, build_model, make_engine, make_prompts, tokens_of


@pytest.fixture(scope="module")
def model():
    return build_model("qwen3")


@pytest.mark.parametrize("scenario", [0, 1, 2])
def test_random_traffic_matches_isolated_runs(model, scenario: int) -> None:
    rng = random.Random(scenario)
    lengths = [rng.randint(1, 90) for _ in range(10)]
    prompts = make_prompts(lengths, seed=scenario)
    shared = prompts[0][:40]
    prompts[3] = shared + prompts[3]  # some shared prefixes, to exercise the cache under pressure
    prompts[6] = shared + prompts[6]
    params = [
        SamplingParams(
            temperature=rng.choice([0.0, 0.8]),
            top_k=rng.choice([0, 20]),
            seed=rng.randint(0, 99),
            max_tokens=rng.randint(1, 24),
            ignore_eos=True,
        )
        for _ in prompts
    ]
    tenants = [rng.choice(["", "t1"]) for _ in prompts]
    block_bytes = make_engine(model).kv_layout.block_bytes
    engine = make_engine(model, kv_cache_bytes=14 * block_bytes, max_num_batched_tokens=rng.choice([16, 40]))
    pending = list(range(len(prompts)))
    aborted: set[int] = set()
    got: dict[int, list[int]] = {i: [] for i in pending}
    for _ in range(10_000):
        if pending and rng.random() < 0.4:
            index = pending.pop(0)
            engine.add_request(f"r{index}", prompts[index], params[index], tenant=tenants[index])
        if rng.random() < 0.03:
            victim = rng.randrange(len(prompts))
            engine.abort_request(f"r{victim}")
            aborted.add(victim)
        for output in engine.step():
            got[int(output.request_id[1:])] += output.new_token_ids
        engine.pool.check_invariants()
        if not pending and not engine.has_unfinished_requests():
            break
    assert_pool_empty(engine)
    stats = engine.stats()
    print(f"preemptions={stats.num_preemptions} evictions={stats.evictions} aborted={sorted(aborted)}")
    assert stats.num_preemptions > 0 or sum(stats.evictions.values()) > 0  # the pool really was tight
    reference = make_engine(model)
    for index, prompt in enumerate(prompts):
        if index in aborted:
            continue
        reference.add_request("x", prompt, params[index], tenant=tenants[index])
        alone: list[int] = []
        while reference.has_unfinished_requests():
            alone += tokens_of(reference.step())
        assert got[index] == alone, f"request {index}"
        assert len(alone) == params[index].max_tokens
    assert_pool_empty(reference)
