"""Router decisions: prefix keys, ring owner / walk / least loaded, decode headroom, policies."""

from __future__ import annotations

import random

import pytest

from engine.block_hash import block_hashes
from router.config import RouterConfig
from router.decisions import RouteReason
from router.load import LoadReport
from router.ring import HashRing
from router.router import NoWorkerError, Router

PREFILL = [f"prefill-{i}" for i in range(4)]
DECODE = [f"decode-{i}" for i in range(3)]


def config(**kwargs) -> RouterConfig:
    base = {
        "policy": "prefix_hash",
        "block_size": 4,
        "prefix_depth_blocks": 2,
        "high_watermark_tokens": 1000,
        "low_watermark_tokens": 500,
        "high_load_factor": 0,
        "low_load_factor": 0,
    }
    base.update(kwargs)
    return RouterConfig(**base)


def make_router(**kwargs) -> Router:
    router = Router(config(**kwargs))
    router.set_workers(PREFILL, DECODE)
    return router


def prefill_report(worker: str, queued: int, at: float, running: int = 0) -> LoadReport:
    return LoadReport(worker, queued, running, 100, 100, at)


def prompt(seed: int, length: int = 20) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(50_000) for _ in range(length)]


def test_prefix_key_is_the_engine_chain_hash_at_depth() -> None:
    router = make_router()
    tokens = prompt(1)
    assert router.prefix_key(tokens, "acme") == block_hashes(tokens, 4, salt="acme")[1]
    assert router.prefix_key(tokens[:7], "acme") == block_hashes(tokens[:7], 4, salt="acme")[0]
    assert router.prefix_key(tokens[:3]) is None
    assert router.prefix_key(tokens, "acme") != router.prefix_key(tokens, "other")


def test_shared_prefix_goes_to_the_ring_owner_whatever_the_suffix() -> None:
    router = make_router()
    ring = HashRing(PREFILL)  # an independent ring with the same defaults
    shared = prompt(2, 8)  # exactly the key depth
    owners = set()
    for suffix_seed in range(20):
        tokens = shared + prompt(100 + suffix_seed, 12)
        choice = router.choose_prefill(tokens)
        router.update_load(prefill_report(choice.worker_id, 0, float(suffix_seed)))  # keep it cool
        assert choice.reason is RouteReason.RING_OWNER
        assert choice.worker_id == ring.owner(block_hashes(shared, 4)[1])
        owners.add(choice.worker_id)
    assert len(owners) == 1
    # different prefixes spread over the pool
    assert len({make_router().choose_prefill(prompt(1000 + i)).worker_id for i in range(40)}) == len(PREFILL)


def test_owner_is_skipped_exactly_above_high_and_taken_back_only_below_low() -> None:
    router = make_router()
    tokens = prompt(3)
    owner = router.prefix_key(tokens)
    owner_id = HashRing(PREFILL).owner(owner)
    walk = list(HashRing(PREFILL).walk(owner))
    reasons = []
    for at, queued in enumerate([1000, 1001, 700, 500, 499]):
        assert router.update_load(prefill_report(owner_id, queued, float(at)))
        choice = router.choose_prefill(tokens)
        reasons.append((choice.worker_id == owner_id, choice.reason))
    assert reasons == [
        (True, RouteReason.RING_OWNER),
        (False, RouteReason.RING_WALK),
        (False, RouteReason.RING_WALK),
        (False, RouteReason.RING_WALK),
        (True, RouteReason.RING_OWNER),
    ]
    # the walk goes to the owner's ring successor
    router.update_load(prefill_report(owner_id, 5000, 10.0))
    assert router.choose_prefill(tokens).worker_id == walk[1]


def test_walk_skips_every_hot_worker_and_all_hot_gives_least_loaded() -> None:
    router = make_router()
    tokens = prompt(4)
    walk = list(HashRing(PREFILL).walk(router.prefix_key(tokens)))
    for worker, queued in zip(walk[:3], [3000, 2000, 4000], strict=True):
        router.update_load(prefill_report(worker, queued, 1.0))
    choice = router.choose_prefill(tokens)
    assert (choice.worker_id, choice.reason) == (walk[3], RouteReason.RING_WALK)
    router.update_load(prefill_report(walk[3], 2500, 2.0))
    choice = router.choose_prefill(tokens)
    assert (choice.worker_id, choice.reason) == (walk[1], RouteReason.LEAST_LOADED)


def test_local_estimate_spills_a_burst_before_the_next_report() -> None:
    router = make_router()
    tokens = prompt(5, 400)  # 400 tokens per request; high watermark 1000
    owner_id = HashRing(PREFILL).owner(router.prefix_key(tokens))
    choices = [router.choose_prefill(tokens) for _ in range(4)]
    # 400, 800, 1200 (> high: hot after the third) -> the fourth walks
    assert [c.worker_id == owner_id for c in choices] == [True, True, True, False]
    assert choices[3].reason is RouteReason.RING_WALK


def test_short_prompt_without_full_block_goes_least_loaded() -> None:
    router = make_router()
    for i, worker in enumerate(PREFILL):
        router.update_load(prefill_report(worker, 100 * (i + 1), 1.0))
    choice = router.choose_prefill([1, 2, 3])
    assert (choice.worker_id, choice.reason, choice.prefix_key) == (
        PREFILL[0],
        RouteReason.LEAST_LOADED,
        None,
    )


def decode_report(worker: str, free: int, at: float, running: int = 0) -> LoadReport:
    return LoadReport(worker, 0, running, free, 1000, at)


def test_decode_choice_by_kv_headroom() -> None:
    router = make_router()
    # no reports yet: round robin
    assert [router.choose_decode(10).worker_id for _ in range(3)] == DECODE
    assert router.choose_decode(10).reason is RouteReason.ROUND_ROBIN
    for worker, free in zip(DECODE, [300, 800, 500], strict=True):
        router.update_load(decode_report(worker, free, 5.0))
    choice = router.choose_decode(200)
    assert (choice.worker_id, choice.reason) == ("decode-1", RouteReason.KV_HEADROOM)
    # decode-1 now holds 800 - 200 = 600 free in the router's estimate
    assert router.choose_decode(200).worker_id == "decode-1"
    # 400 left on decode-1, 500 on decode-2
    assert router.choose_decode(100).worker_id == "decode-2"
    # nobody fits 2000: most free (decode-1 and decode-2 both at 400; decode-2 was sent fewer
    # requests since the report), least_loaded
    choice = router.choose_decode(2000)
    assert (choice.worker_id, choice.reason) == ("decode-2", RouteReason.LEAST_LOADED)


def test_decode_ties_prefer_fewer_running_requests() -> None:
    router = make_router()
    router.update_load(decode_report("decode-0", 500, 1.0, running=7))
    router.update_load(decode_report("decode-1", 500, 1.0, running=2))
    router.update_load(decode_report("decode-2", 100, 1.0, running=0))
    assert router.choose_decode(50).worker_id == "decode-1"


@pytest.mark.parametrize(
    ("policy", "expected_reason"),
    [("round_robin", RouteReason.ROUND_ROBIN), ("least_loaded", RouteReason.LEAST_LOADED)],
)
def test_load_only_policies(policy: str, expected_reason: RouteReason) -> None:
    router = make_router(policy=policy)
    chosen = []
    for i in range(8):
        for j, worker in enumerate(PREFILL):
            router.update_load(prefill_report(worker, 0, float(i * 10 + j)))
        choice = router.choose_prefill(prompt(7))
        assert choice.reason is expected_reason
        chosen.append(choice.worker_id)
    assert chosen == PREFILL + PREFILL  # equal loads: both rotate through the sorted pool
    router.update_load(prefill_report("prefill-0", 50, 100.0))
    router.update_load(prefill_report("prefill-1", 10, 100.0))
    router.update_load(prefill_report("prefill-2", 90, 100.0))
    router.update_load(prefill_report("prefill-3", 70, 100.0))
    if policy == "least_loaded":
        assert router.choose_prefill(prompt(7)).worker_id == "prefill-1"


def test_consistent_hash_ignores_load() -> None:
    router = make_router(policy="consistent_hash")
    tokens = prompt(8)
    owner_id = HashRing(PREFILL).owner(router.prefix_key(tokens))
    router.update_load(prefill_report(owner_id, 10**9, 1.0))
    choice = router.choose_prefill(tokens)
    assert (choice.worker_id, choice.reason) == (owner_id, RouteReason.RING_OWNER)


def test_route_combines_both_and_membership_changes() -> None:
    router = make_router()
    decision = router.route(prompt(9), expected_num_blocks=5, tenant="t")
    assert decision.prefill.worker_id in PREFILL and decision.decode.worker_id in DECODE
    assert decision.reason is decision.prefill.reason
    router.set_workers(["only"], [])
    assert router.choose_prefill(prompt(9)).worker_id == "only"
    with pytest.raises(NoWorkerError):
        router.choose_decode(1)
    router.set_workers([], ["d"])
    with pytest.raises(NoWorkerError):
        router.choose_prefill(prompt(9))
    assert not router.update_load(prefill_report("ghost", 1, 1.0))
