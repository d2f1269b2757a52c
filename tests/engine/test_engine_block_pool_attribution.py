"""The block pool's eviction log (cache attribution, issue 14) and tenant KV shares in eviction (issue 15):
real ``BlockPool`` objects, the pool's own hash chain, invariants checked after every step."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.block_hash import BlockHash, block_hashes
from engine.block_pool import BlockPool
from engine.eviction_log import BYTES_PER_ENTRY, EvictionLog, measure_bytes_per_entry

BLOCK = 4


def _chain(tenant: str, num_blocks: int, start: int = 0) -> list[BlockHash]:
    """The tenant-salted chain hashes of a prompt of ``num_blocks`` full blocks."""
    tokens = [start + i for i in range(num_blocks * BLOCK)]
    return block_hashes(tokens, BLOCK, salt=tenant)


def _warm(pool: BlockPool, tenant: str, hashes: list[BlockHash]) -> list[int]:
    """A finished request of ``tenant``: its blocks allocated, published under ``hashes``, released."""
    blocks = pool.allocate(len(hashes), tenant)
    for block, block_hash in zip(blocks, hashes, strict=True):
        assert pool.cache_block(block, block_hash, tenant)
    pool.release(blocks)
    pool.check_invariants()
    return blocks


def _assert_empty(pool: BlockPool) -> None:
    pool.check_invariants()
    assert pool.num_used_blocks == 0 and pool.num_allocatable_blocks == pool.num_blocks


def test_eviction_log_names_the_causing_tenant_and_when() -> None:
    pool = BlockPool(4, BLOCK)
    chain_a = _chain("a", 4)
    _warm(pool, "a", chain_a)
    assert pool.explain_miss(chain_a, len(pool.match_prefix(chain_a).block_ids)).num_evicted_blocks == 0
    burst = pool.allocate(3, "b")  # the tail goes first: release is in reverse order
    match = pool.match_prefix(chain_a)
    assert len(match.block_ids) == 1
    miss = pool.explain_miss(chain_a, len(match.block_ids))
    assert miss.is_evicted and miss.num_evicted_blocks == 3 and miss.evicted_by == (("b", 3),)
    assert 0 < miss.first_evicted_at <= miss.last_evicted_at
    assert pool.evictions == {("a", "b"): 3}
    record = pool.eviction_log.get(chain_a[1])
    assert record is not None and (record.victim_tenant, record.causing_tenant) == ("a", "b")
    # A's prompt is computed again: its hashes are cached anew and leave the log.
    pool.release(burst)
    again = pool.allocate(3, "a")
    for block, block_hash in zip(again, chain_a[1:], strict=True):
        assert pool.cache_block(block, block_hash, "a")
    assert len(pool.eviction_log) == 0
    pool.release(again)
    assert pool.explain_miss(chain_a, len(pool.match_prefix(chain_a).block_ids)).num_evicted_blocks == 0
    _assert_empty(pool)


def test_a_miss_that_was_never_cached_is_not_blamed_on_evictions() -> None:
    pool = BlockPool(8, BLOCK)
    _warm(pool, "a", _chain("a", 2))
    other = _chain("a", 3, start=1000)  # same tenant, a prompt it never sent
    miss = pool.explain_miss(other, 0)
    assert not miss.is_evicted and miss.num_evicted_blocks == 0 and miss.num_cacheable_blocks == 3
    _assert_empty(pool)


def test_eviction_log_is_capped() -> None:
    log = EvictionLog(3, clock=iter(range(100)).__next__)
    hashes = _chain("a", 5)
    for block_hash in hashes:
        log.record(block_hash, "a", "b")
    assert len(log) == 3 and log.num_dropped == 2
    assert log.get(hashes[0]) is None and log.get(hashes[1]) is None
    assert log.get(hashes[4]) is not None and log.get(hashes[4]).evicted_at == 4
    off = EvictionLog(0)
    off.record(hashes[0], "a", "b")
    assert len(off) == 0


def test_eviction_log_memory_per_entry_is_as_documented() -> None:
    assert 0 < measure_bytes_per_entry(4096) <= BYTES_PER_ENTRY


def test_plain_lru_lets_a_burst_evict_everyone() -> None:
    pool = BlockPool(8, BLOCK)
    chain_a = _chain("a", 4)
    _warm(pool, "a", chain_a)
    _warm(pool, "b", _chain("b", 4))  # now A's blocks are the least recently released
    burst = pool.allocate(4, "b")
    assert pool.match_prefix(chain_a).num_cached_tokens == 0
    pool.release(burst)
    _assert_empty(pool)


def test_a_tenant_under_its_share_keeps_its_cached_blocks_while_another_bursts() -> None:
    pool = BlockPool(8, BLOCK, tenant_kv_share=0.5)  # 4 blocks guaranteed to every tenant
    chain_a = _chain("a", 3)
    _warm(pool, "a", chain_a)  # A holds 3 <= 4: protected
    old_b = _chain("b", 2)
    _warm(pool, "b", old_b)
    held = []
    for _ in range(5):  # B bursts one block at a time, past its share: 3 free blocks, then evictions
        held += pool.allocate(1, "b")
        pool.check_invariants()
        assert pool.match_prefix(chain_a).num_cached_tokens == 3 * BLOCK, "A lost a block while under share"
    assert pool.match_prefix(old_b).num_cached_tokens == 0  # B's own cached blocks went instead
    assert pool.evictions == {("b", "b"): 2}
    # Only when no other cached block is left does the burst reach A (it is the pool's last resort).
    assert pool.num_allocatable_blocks == 3
    held += pool.allocate(1, "b")
    assert pool.evictions[("a", "b")] == 1
    pool.release(held)
    _assert_empty(pool)


def test_over_share_tenants_go_first_even_when_younger() -> None:
    pool = BlockPool(10, BLOCK, tenant_kv_shares={"a": 0.2, "c": 0.2})  # a, c: 2 blocks; others: none
    chain_a, chain_c = _chain("a", 2), _chain("c", 4)
    _warm(pool, "a", chain_a)  # oldest, at its share (2 <= 2): protected
    _warm(pool, "c", chain_c)  # c holds 4 > 2: over share
    taken = pool.allocate(4 + 2, "b")  # 4 free blocks, then two evictions
    assert pool.match_prefix(chain_a).num_cached_tokens == 2 * BLOCK
    assert pool.evictions == {("c", "b"): 2}
    assert pool.share_blocks("a") == 2 and pool.share_blocks("b") == 0
    pool.release(taken)
    _assert_empty(pool)


def test_an_under_share_tenant_evicts_its_own_before_another_under_share_tenant() -> None:
    pool = BlockPool(4, BLOCK, tenant_kv_share=0.5)
    chain_a, chain_c = _chain("a", 2), _chain("c", 2)
    _warm(pool, "c", chain_c)  # oldest
    _warm(pool, "a", chain_a)
    taken = pool.allocate(1, "a")  # both at share: A takes its own least recent block, not C's
    assert pool.evictions == {("a", "a"): 1}
    assert pool.match_prefix(chain_c).num_cached_tokens == 2 * BLOCK
    pool.release(taken)
    _assert_empty(pool)


TENANTS = ["", "a", "b"]
share_ops = st.lists(
    st.tuples(st.sampled_from(["warm", "allocate", "release"]), st.integers(1, 4), st.sampled_from(TENANTS)),
    min_size=1,
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(share_ops, st.sampled_from([0.0, 0.25, 0.5]))
def test_random_operations_with_shares_keep_invariants_and_the_guarantee(ops: list, share: float) -> None:
    pool = BlockPool(12, BLOCK, tenant_kv_share=share)
    held: list[int] = []
    for index, (kind, count, tenant) in enumerate(ops):
        if kind == "warm" and pool.can_allocate(count):
            _warm(pool, tenant, _chain(tenant, count, start=index * 100))
        elif kind == "allocate" and pool.can_allocate(count):
            before = {t: pool.num_cached_blocks_of(t) for t in TENANTS}
            # cached blocks that go before a protected tenant's: others' above their share, then its own
            over_share_cached = before[tenant] + sum(
                min(before[t], pool.held_blocks[t] - pool.share_blocks(t))
                for t in TENANTS
                if t != tenant and pool.held_blocks[t] > pool.share_blocks(t)
            )
            protected = [t for t in TENANTS if t != tenant and pool.held_blocks[t] <= pool.share_blocks(t)]
            num_evictions = max(0, count - pool.num_free_blocks)
            held += pool.allocate(count, tenant)
            if share > 0 and num_evictions <= over_share_cached:
                for other in protected:  # loses nothing while others' over-share cached blocks last
                    assert pool.num_cached_blocks_of(other) == before[other]
        elif kind == "release" and held:
            pool.release([held.pop(count % len(held))])
        pool.check_invariants()
    pool.release(held)
    _assert_empty(pool)


def test_preemptions_count_as_the_victims_allocation_failures() -> None:
    from engine.config import SchedulerConfig
    from engine.sampling import SamplingParams
    from engine.scheduler import Scheduler
    from engine.sequence import Sequence

    pool = BlockPool(4, 16)
    scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=256, max_num_seqs=8), pool)
    for name, tenant in (("a", "t1"), ("b", "t2")):  # 2 full blocks each: the pool is full
        first = 1000 * ord(name)
        scheduler.add(Sequence(name, list(range(first, first + 32)), 32, SamplingParams(), 0, tenant))
    for _ in range(2):  # prefill both; then each needs a third block: b (admitted last) is preempted
        output = scheduler.schedule()
        scheduler.commit(output)
        for item in output.scheduled:
            item.seq.token_ids.append(7)
    assert scheduler.num_preemptions == 1 and pool.allocation_failures == {"t2": 1}
    for seq in [*scheduler.running, *scheduler.waiting]:
        scheduler.finish(seq, "abort")
    _assert_empty(pool)


@pytest.mark.parametrize("share", [0.0, 0.5])
def test_engine_a_burst_evicts_a_warm_prefix_unless_its_tenant_is_under_its_share(share: float) -> None:
    """Through the real engine (scheduler, prefix cache, prefill_only requests as a prefill replica runs
    them): tenant A warms a 70-token prompt (4 reusable blocks), B prefills 6 other prompts through the
    12-block pool. Plain LRU: A's next request reports the eviction by B (the engine's PrefixMiss). A
    50 % share (6 blocks): A holds 4 <= 6, so B evicts its own blocks and A's next request hits."""
    from engine.sampling import SamplingParams
    from tests.engine.engine_helpers import assert_pool_empty, build_model, make_engine, make_prompts

    model = build_model("llama")
    block_bytes = make_engine(model, kv_cache_bytes=2**20).kv_layout.block_bytes
    engine = make_engine(model, kv_cache_bytes=12 * block_bytes, tenant_kv_share=share)
    prompt_a, *burst = make_prompts([70] + [70] * 6, seed=9)

    def prefill(request_id: str, prompt: list[int], tenant: str):
        engine.add_request(request_id, prompt, SamplingParams(max_tokens=2), tenant=tenant, prefill_only=True)
        while engine.has_unfinished_requests():
            for output in engine.step():
                if output.finished:
                    engine.release_pinned(request_id)
                    return output
        raise AssertionError("no output")

    assert prefill("a1", prompt_a, "a").prefix_miss.num_cacheable_blocks == 4
    for index, prompt in enumerate(burst):
        prefill(f"b{index}", prompt, "b")
    again = prefill("a2", prompt_a, "a")
    if share == 0:
        miss = again.prefix_miss
        assert again.num_cached_tokens == 0 and miss.is_evicted and miss.num_evicted_blocks == 4
        assert miss.evicted_by == (("b", 4),)
    else:
        assert again.num_cached_tokens == 64 and again.prefix_miss.num_evicted_blocks == 0
        assert engine.stats().evictions.get(("a", "b"), 0) == 0 and engine.stats().evictions[("b", "b")] > 0
    assert_pool_empty(engine)
