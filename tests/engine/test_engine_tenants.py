"""Acceptance 4: the same tokens under two tenant salts never share blocks; under one salt they do."""

from __future__ import annotations

from engine.sampling import SamplingParams
from tests.engine.engine_helpers import (
    assert_pool_empty,
    build_model,
    make_engine,
    make_prompts,
    run_to_completion,
)

PROMPT = make_prompts([70], seed=5)[0]  # 4 full blocks of 16 + 6 tokens


def _prefill(engine, request_id: str, tenant: str) -> tuple[list[int], int]:
    engine.add_request(request_id, PROMPT, SamplingParams(max_tokens=1), tenant=tenant, prefill_only=True)
    outputs = run_to_completion(engine)[request_id]
    return engine.pinned_blocks(request_id), outputs[0].num_cached_tokens


def test_salts_isolate_and_same_salt_shares() -> None:
    engine = make_engine(build_model("llama"))
    blocks_a, cached_a = _prefill(engine, "a1", "tenant-a")
    blocks_b, cached_b = _prefill(engine, "b1", "tenant-b")
    blocks_a2, cached_a2 = _prefill(engine, "a2", "tenant-a")
    assert cached_a == 0 and cached_b == 0
    assert not set(blocks_a) & set(blocks_b), "two salts shared a block"
    assert cached_a2 == 64
    assert blocks_a2[:4] == blocks_a[:4], "same salt did not share its full blocks"
    assert blocks_a2[4] != blocks_a[4], "the partial last block is private"
    for request_id in ("a1", "b1", "a2"):
        engine.release_pinned(request_id)
    assert_pool_empty(engine)


def test_eviction_counted_per_victim_and_cause() -> None:
    model = build_model("llama")
    block_bytes = make_engine(model).kv_layout.block_bytes
    engine = make_engine(model, kv_cache_bytes=6 * block_bytes)  # room for one 70-token prompt + 1
    _prefill(engine, "a1", "tenant-a")
    engine.release_pinned("a1")
    assert engine.stats().num_blocks_cached == 4
    _prefill(engine, "b1", "tenant-b")  # needs 5 blocks: 2 free, 3 taken from tenant-a's cache
    evictions = engine.stats().evictions
    assert evictions == {("tenant-a", "tenant-b"): 3}
    engine.release_pinned("b1")
    assert_pool_empty(engine)
