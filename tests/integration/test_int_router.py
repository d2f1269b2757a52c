"""Issue 18, acceptance 2, in the running cluster: cache-aware placement from the replicas' own reports.

Two prefill replicas; the router's cache_aware policy reads each replica's prefix summary (published
with its load report, rebuilt every 0.2 s here). In order:

1. A new conversation lands on the ring owner of its first probe key (checked against an independent
   ``HashRing`` over the two replica ids); its second turn lands where the first is cached
   (``prefill=prefix_cache``, cached tokens reported by the engine).
2. A second new conversation lands by the ring too (the owner of *its* key, whichever replica).
3. Hot prefix: the first conversation's owner is saturated for real (long prompts sent straight to it,
   which the ingress learns of only from the owner's load reports). The next turn is copied to the
   other replica (``prefill=replicate``); the turn after is served by that copy from its own cache
   (``prefill=cache_split``, or ``prefix_cache`` if the copy is the prefix's primary on the ring): two
   replicas serve the prefix. Once the owner has drained, the prefix returns to one replica, its
   primary (first holder along the ring from its deepest probe key), from its cache.

Every answer is checked token for token against the reference model.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import grpc
import pytest

from engine.prefix_summary import probe_keys
from protos import pdserve_pb2 as pb
from protos import pdserve_pb2_grpc
from router.ring import HashRing, int_key_position
from tests.integration.int_helpers import (
    cluster_config,
    reference_greedy,
    run_many,
    wait_until_no_blocks_held,
)
from worker_common.messages import SamplingSpec, WorkerRequest

pytestmark = pytest.mark.integration

HOLD_PROMPTS, HOLD_TOKENS = 6, 2000  # 12k tokens: about 3 s of prefill for one replica here
REPORT_WAIT_S = 0.6  # > 2 load-report and summary periods (0.2 s each)
BLOCK = 16


def _tokens(seed: int, num: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(32, 250) for _ in range(num)]


def _ask(address: str, prompt: list[int]) -> Any:
    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), max_tokens=3, ignore_eos=True)
    result = asyncio.run(run_many(address, [request]))[0]
    assert result.code == grpc.StatusCode.OK, result.details
    assert result.token_ids == list(reference_greedy(tuple(prompt), 3))
    return result.last


def _prefill_ids(address: str) -> list[str]:
    with grpc.insecure_channel(address) as channel:
        info = pdserve_pb2_grpc.PDServeStub(channel).ClusterInfo(pb.ClusterInfoRequest(), timeout=30)
    return sorted(r.replica_id for pool in info.pools if pool.name == "prefill" for r in pool.replicas)


def _ring_owner(replicas: list[str], prompt: list[int]) -> str:
    return HashRing(replicas).walk_from_position(int_key_position(probe_keys(prompt, BLOCK)[0]))[0]


async def _saturate(app_name: str, owner: str) -> list[asyncio.Task]:
    """Start long prompts straight on ``owner``; return once its reported queue shows them."""
    from ray import serve

    handle = serve.get_deployment_handle("PrefillDeployment", app_name)
    rng = random.Random(5)

    async def hold(index: int) -> str:
        prompt = tuple([256] + [rng.randrange(0, 256) for _ in range(HOLD_TOKENS - 1)])
        work = WorkerRequest(f"hold-{index}", prompt, SamplingSpec(max_tokens=2, ignore_eos=True))
        result = await handle.prefill.remote(work, target_replica_id=owner)
        await handle.release.remote(result.request_id, target_replica_id=owner)  # the test is its decode side
        return result.replica_id

    holds = [asyncio.create_task(hold(i)) for i in range(HOLD_PROMPTS)]
    deadline = time.monotonic() + 10
    while (await handle.replica_stats.remote(target_replica_id=owner)).queued_prefill_tokens < 4000:
        assert time.monotonic() < deadline, "the owner never reported the long prompts queued"
        await asyncio.sleep(0.02)
    return holds


async def _hot_turns(
    address: str, app_name: str, owner: str, turns: list[list[int]]
) -> tuple[list[Any], list[str]]:
    holds = await _saturate(app_name, owner)
    await asyncio.sleep(REPORT_WAIT_S)  # the ingress now holds a report with the queue
    lasts = []
    for prompt in turns:
        request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), max_tokens=3, ignore_eos=True)
        result = (await run_many(address, [request]))[0]
        assert result.code == grpc.StatusCode.OK, result.details
        assert result.token_ids == list(reference_greedy(tuple(prompt), 3))
        lasts.append(result.last)
    return lasts, list(await asyncio.gather(*holds))


def test_cache_aware_placement_follows_the_cache_and_splits_a_hot_prefix(pd_cluster) -> None:
    config = cluster_config(  # 1024 blocks: the holds evict no prefix
        2,
        1,
        {
            "engine.kv_cache_bytes": 64 * 2**20,
            "router.policy": "cache_aware",
            "router.replicate_margin_tokens": 1024,
            "router.split_margin_tokens": 256,
            "router.summary_period_s": 0.2,
        },
    )
    cluster = pd_cluster.ensure(config)
    address = cluster.grpc_address
    replicas = _prefill_ids(address)
    assert len(replicas) == 2

    # 1. a new conversation: its ring owner; its next turn: where its cache is
    turn1 = _tokens(1, 96)  # 6 blocks: probes at 1, 2, 4 blocks
    first = _ask(address, turn1)
    owner = first.route.prefill_replica
    assert owner == _ring_owner(replicas, turn1) and "prefill=ring_owner" in first.route.reason, first.route
    time.sleep(REPORT_WAIT_S)  # the owner's summary now lists the conversation
    turn2 = turn1 + _tokens(2, 40)
    second = _ask(address, turn2)
    assert second.route.prefill_replica == owner, second.route
    assert "prefill=prefix_cache" in second.route.reason, second.route
    assert second.usage.cached_tokens >= 96

    # 2. another new conversation: by the ring, wherever its own key falls (once the reports after turn 2
    # are in: until then the router still counts turn 2's prompt as queued on its owner, which may make
    # that owner costlier than the slack allows and send the new conversation along the walk)
    other = _tokens(3, 80)
    time.sleep(REPORT_WAIT_S)
    placed = _ask(address, other)
    assert placed.route.prefill_replica == _ring_owner(replicas, other), placed.route
    assert "prefill=ring_owner" in placed.route.reason, placed.route

    # 3. the owner saturated: the conversation's prefix is copied to the other replica, which serves it
    turn3, turn4 = turn2 + _tokens(4, 20), turn2 + _tokens(5, 20)
    app = cluster.config.app_name
    (third, fourth), hold_replicas = asyncio.run(_hot_turns(address, app, owner, [turn3, turn4]))
    assert hold_replicas == [owner] * HOLD_PROMPTS
    copy = next(r for r in replicas if r != owner)
    assert third.route.prefill_replica == copy and "prefill=replicate" in third.route.reason, third.route
    # both hold it now: the copy (cheaper: the owner is still busy) serves it from its own cache
    assert fourth.route.prefill_replica == copy, fourth.route
    assert any(f"prefill={r}" in fourth.route.reason for r in ("cache_split", "prefix_cache")), fourth.route
    assert fourth.usage.cached_tokens >= 128

    # ... and once the owner has drained, one replica serves the prefix again: its primary (the first
    # holder along the ring from the prefix's deepest probe key), from its cache
    time.sleep(REPORT_WAIT_S)
    primary = HashRing(replicas).walk_from_position(int_key_position(probe_keys(turn3, BLOCK)[-1]))[0]
    for seed in (6, 7, 8):
        back = _ask(address, turn2 + _tokens(seed, 20))
        assert back.route.prefill_replica == primary, back.route
        assert "prefill=prefix_cache" in back.route.reason, back.route
        assert back.usage.cached_tokens >= 128
    _, blocks = wait_until_no_blocks_held(address, within_s=1.0)
    assert all(count == 0 for count in blocks.values()), blocks
