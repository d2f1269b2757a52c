"""Prefix summaries (engine.prefix_summary, worker_common.prefix_summary) and the cache_aware policy."""

from __future__ import annotations

import random

import pytest

from engine.block_hash import block_hashes
from engine.prefix_index import PrefixIndex
from engine.prefix_summary import PrefixSummary, SummaryBuilder, probe_depths, probe_keys
from router.config import RouterConfig
from router.decisions import RouteReason
from router.load import LoadReport
from router.ring import HashRing, int_key_position
from router.router import Router
from worker_common import prefix_summary as worker_summary

PREFILL = [f"prefill-{i}" for i in range(4)]
RING = HashRing(PREFILL)  # the same ring as the routers' (same ids, seed and virtual nodes)


def tokens(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(50_000) for _ in range(n)]


@pytest.mark.parametrize("length", [0, 3, 4, 5, 16, 63, 64, 65, 1000, 4096])
@pytest.mark.parametrize("tenant", ["", "acme"])
def test_probe_keys_of_a_list_and_a_tuple_agree(length: int, tenant: str) -> None:
    prompt = tokens(length, length)
    keys = probe_keys(prompt, 4, tenant)
    assert keys == probe_keys(tuple(prompt), 4, tenant)
    assert len(keys) == len(probe_depths(length // 4))


def test_probe_keys_follow_the_shared_prefix() -> None:
    base = tokens(1, 256)
    other = base[:40] + tokens(2, 216)  # shares 10 blocks of 4
    a, b = probe_keys(base, 4), probe_keys(other, 4)
    assert probe_depths(64) == (1, 2, 4, 8, 16, 32, 64)
    assert a[:4] == b[:4]  # depths 1..8 blocks lie inside the shared 10 blocks
    assert all(x != y for x, y in zip(a[4:], b[4:], strict=True))  # 16, 32, 64 blocks do not
    assert probe_keys(base, 4, "t1")[0] != probe_keys(base, 4, "t2")[0]  # the tenant salts the chain


def test_summary_builder_publishes_cached_keys_newest_first_and_capped() -> None:
    builder = SummaryBuilder(max_keys=3)
    cached = {"a1", "a2", "b1"}
    builder.note([1, 2], ["a1", "a2"])
    builder.note([3], ["b1"])
    builder.note([4], ["gone"])
    first = builder.build(cached.__contains__)
    # newest first, key 4's block is not cached; generation 1, all added since generation 0 (empty)
    assert first == (1, (3, 2, 1), 0, (3, 2, 1), (), -1)  # -1: requests done not given
    assert builder.build(cached.__contains__) is first  # unchanged: the same object and generation
    cached.discard("a2")
    assert builder.build(cached.__contains__) == (2, (3, 1), 1, (), (2,), -1)
    builder.note([5, 6, 7], ["b1", "b1", "b1"])
    assert builder.build(cached.__contains__, 9) == (3, (7, 6, 5), 2, (7, 6, 5), (3, 1), 9)  # cap 3


def test_worker_builder_reads_the_engine_prefix_index() -> None:
    class Pool:
        index = PrefixIndex()

    engine = type("Engine", (), {"pool": Pool(), "num_requests_done": 4})()
    prompt = tokens(3, 70)  # 17 full blocks of 4: probes at 1, 2, 4, 8, 16
    chain = block_hashes(prompt, 4, salt="t")
    for block_id, block_hash in enumerate(chain):
        engine.pool.index.insert(block_hash, block_id)
    builder = worker_summary.PrefixSummaryBuilder(4, max_keys=100, period_s=1.0)
    builder.note(prompt, "t")
    summary = builder.refresh(engine, now=10.0)
    assert set(summary.keys) == set(probe_keys(prompt, 4, "t")) and len(summary.keys) == 5
    assert summary.requests_done == 4  # the engine's count as the summary was built
    engine.pool.index.remove(chain[15])  # the 16th block evicted: the depth-16 key goes
    assert builder.refresh(engine, now=10.5) is summary  # within the period: not rebuilt
    later = builder.refresh(engine, now=11.0)
    assert set(later.keys) == set(probe_keys(prompt, 4, "t")[:4])
    assert later.generation == summary.generation + 1


def _router(**kwargs) -> Router:
    base = {"block_size": 4, "replicate_margin_tokens": 400, "split_margin_tokens": 50}
    base.update(kwargs)
    router = Router(RouterConfig(**base))
    router.set_workers(PREFILL, [])
    return router


def _report(worker: str, queued: int, at: float, keys: tuple[int, ...] | None) -> LoadReport:
    # the generation: a digest of the keys is enough here (it changes when they do)
    summary = None if keys is None else PrefixSummary(hash(keys), keys)
    return LoadReport(worker, queued, 0, 100, 100, at, summary)


def test_later_turns_follow_the_cache_and_new_conversations_the_ring() -> None:
    router = _router()
    turn1 = tokens(10, 64)
    first = router.choose_prefill(turn1)
    probes = probe_keys(turn1, 4)
    owner = RING.walk_from_position(int_key_position(probes[0]))[0]
    assert (first.worker_id, first.reason) == (owner, RouteReason.RING_OWNER)
    # the owner's report now carries its summary; the others hold nothing
    for _i, worker in enumerate(PREFILL):
        router.update_load(_report(worker, 0, 1.0, tuple(probes) if worker == owner else ()))
    turn2 = turn1 + tokens(11, 40)
    second = router.choose_prefill(turn2)
    assert (second.worker_id, second.reason) == (owner, RouteReason.PREFIX_CACHE)
    assert second.expected_cached_tokens == 64  # depth 16 blocks of 4
    # a new conversation: nobody holds its first probe -> its own ring owner
    other = tokens(12, 64)
    expected = RING.walk_from_position(int_key_position(probe_keys(other, 4)[0]))[0]
    assert router.choose_prefill(other).worker_id == expected


def test_hot_prefix_is_replicated_along_the_ring_split_and_released() -> None:
    router = _router()
    prompt = tokens(20, 64)
    probes = tuple(probe_keys(prompt, 4))
    walk = RING.walk_from_position(int_key_position(probes[-1]))
    primary, second = walk[0], walk[1]
    summaries = {w: (probes if w == primary else ()) for w in PREFILL}

    def report(at: float, queued: dict[str, int]) -> None:
        for worker in PREFILL:
            router.update_load(_report(worker, queued.get(worker, 0), at, summaries[worker]))

    report(1.0, {})
    assert router.choose_prefill([*prompt, 1]).reason == RouteReason.PREFIX_CACHE
    # the primary saturated: cost 1000 + 1 > 0 + 65 + margin 400 -> a copy on the ring successor
    report(2.0, {primary: 1000})
    hot = router.choose_prefill([*prompt, 2])
    assert (hot.worker_id, hot.reason) == (second, RouteReason.REPLICATE)
    summaries[second] = probes
    # both hold it, the primary still loaded: traffic goes to the copy
    report(3.0, {primary: 1000, second: 100})
    split = router.choose_prefill([*prompt, 3])
    assert (split.worker_id, split.reason) == (second, RouteReason.CACHE_SPLIT)
    # within the split margin (hysteresis): the primary keeps it
    report(4.0, {primary: 140, second: 100})
    assert router.choose_prefill([*prompt, 4]).worker_id == primary
    # cooled down: back to one copy, the primary
    report(5.0, {})
    for i in range(5):
        choice = router.choose_prefill([*prompt, 10 + i])
        assert (choice.worker_id, choice.reason) == (primary, RouteReason.PREFIX_CACHE)
        report(6.0 + i, {})


def test_sent_prompts_count_as_held_until_the_next_summary() -> None:
    router = _router()
    prompt = tokens(30, 64)
    first = router.choose_prefill(prompt)
    for worker in PREFILL:  # loads say the chosen worker is a bit busier; no summary yet (None)
        router.update_load(_report(worker, 100 if worker == first.worker_id else 0, 1.0, None))
    follow = router.choose_prefill(prompt + tokens(31, 20))
    assert (follow.worker_id, follow.reason) == (first.worker_id, RouteReason.PREFIX_CACHE)


def _counted(worker: str, at: float, keys: tuple[int, ...], received: int, done: int) -> LoadReport:
    """A report counting the requests received, with a summary built when ``done`` were done."""
    summary = PrefixSummary(int(at), keys, requests_done=done)  # a new generation every report
    return LoadReport(worker, 0, 0, 100, 100, at, summary, requests_received=received)


def test_a_sent_prompt_keeps_its_worker_until_a_summary_built_after_it_was_done() -> None:
    """A summary that changed for another reason (an eviction) but was built before the prompt sent
    there was prefilled lacks the prompt's keys: its followers still go there, as prefix_cache, until a
    summary counts the prompt done. Without the count (-1) the keys go at once (replays)."""
    router = _router()
    prompt = tokens(30, 64)
    for worker in PREFILL:
        router.update_load(_counted(worker, 1.0, (999,), received=0, done=0))
    owner = router.choose_prefill(prompt).worker_id
    follower = [*prompt, 7]
    # arrived (counted), not yet prefilled; the owner evicted key 999 meanwhile
    router.update_load(_counted(owner, 2.0, (), received=1, done=0))
    assert router.choose_prefill(follower)[:2] == (owner, RouteReason.PREFIX_CACHE)
    router.update_load(_counted(owner, 3.0, (), received=1, done=0))  # the follower still on its way
    assert router.choose_prefill(follower)[:2] == (owner, RouteReason.PREFIX_CACHE)
    # done and evicted at once (the summary never showed it): the keys go, the ring decides again
    router.update_load(_counted(owner, 7.0, (), received=3, done=3))
    assert router.choose_prefill(tokens(30, 64)).reason == RouteReason.RING_OWNER

    router = _router()
    owner = router.choose_prefill(prompt).worker_id
    router.update_load(LoadReport(owner, 0, 0, 100, 100, 2.0, PrefixSummary(2, ()), requests_received=1))
    assert router.choose_prefill(follower).reason == RouteReason.RING_OWNER


def test_keys_of_a_request_no_report_counts_go_with_its_charge() -> None:
    router = _router()
    prompt = tokens(31, 64)
    for worker in PREFILL:
        router.update_load(_counted(worker, 1.0, (), received=0, done=0))
    owner = router.choose_prefill(prompt).worker_id  # lost on its way: never counted
    lifetime = router._prefill_loads.CHARGE_LIFETIME_REPORTS
    for step in range(1, lifetime):
        router.update_load(_counted(owner, 1.0 + step, (), received=0, done=0))
        assert router._prefill_loads.held[owner] >= set(probe_keys(prompt, 4)), step
    router.update_load(_counted(owner, 1.0 + lifetime, (), received=0, done=0))
    assert not router._prefill_loads.held[owner]


def test_the_summary_travels_in_replica_load_to_the_routers_report() -> None:
    import pickle

    from cluster.replica_directory import ReplicaView
    from cluster.route_policy import _load_report
    from cluster.stats import ReplicaLoad

    summary = worker_summary.PrefixSummary(3, tuple(probe_keys(tokens(40, 64), 16)))
    load = ReplicaLoad("r1", 0, 0, 10, 100, 0, 5, 95, 100, 0, 0, 0, 0, 12.5, prefix_summary=summary)
    back = ReplicaLoad.from_routing_stats(pickle.loads(pickle.dumps(load.to_routing_stats())))
    assert back == load and back.prefix_summary == summary == (3, summary.keys, -1, (), (), -1)
    report = _load_report(ReplicaView("r1", back))
    assert report is not None and report.prefix_summary == PrefixSummary(3, summary.keys)
    assert _load_report(ReplicaView("r2", ReplicaLoad("r2", 0, 0, 0, 1, 0, 0, 1, 1, 0, 0, 0, 0, 1.0))) \
        .prefix_summary is None  # fmt: skip


def test_summary_deltas_leave_the_router_as_whole_summaries_do() -> None:
    """Two load tables, one fed each worker's summaries with their deltas (``SummaryBuilder``), one
    the same summaries as keys only (re-read whole), with the router's own sent keys in between,
    hold the same keys after every report; a skipped generation falls back to the whole keys."""
    from router.load import LoadTable

    rng = random.Random(7)
    config = RouterConfig()
    by_delta, whole = LoadTable(config, PREFILL), LoadTable(config, PREFILL)
    builders = {w: SummaryBuilder(max_keys=40) for w in PREFILL}
    cached: set[int] = set()
    for step in range(300):
        worker = rng.choice(PREFILL)
        keys = [rng.randrange(200) for _ in range(rng.randrange(1, 6))]
        builders[worker].note(keys, keys)  # the anchor of key k is block k
        cached.update(rng.sample(range(200), 3))
        cached.difference_update(rng.sample(range(200), 3))
        sent = [rng.randrange(200) for _ in range(3)]
        target = rng.choice(PREFILL) if step % 2 else worker
        for table in (by_delta, whole):
            table.note_sent(target, sent)
        previous = by_delta._summary_generations.get(worker)
        summary = builders[worker].build(cached.__contains__)
        if step % 17 == 0:
            continue  # this generation never reaches the routers: the next one must re-read whole
        by_delta.update(LoadReport(worker, 0, 0, 1, 1, float(step), summary))
        whole.update(LoadReport(worker, 0, 0, 1, 1, float(step), PrefixSummary(*summary[:2])))
        assert by_delta.held == whole.held
        if summary.generation != previous:  # a new summary: exactly its keys, the sent ones dropped
            assert by_delta.held[worker] == set(summary.keys)
