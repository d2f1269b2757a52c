"""Issue 5, acceptance 4, in the running cluster: the prefix-hash router's load-watermark fallback.

Two prefill replicas, low token watermarks (high 1024, low 512 queued prefill tokens). Requests sharing
a prefix go to its ring owner and hit its prefix cache. Then the owner is loaded for real: the test
sends 6 prompts of 2000 tokens straight to the owner replica (a driver-side handle targeted at it, so
the ingress's router never sees them and learns of them only from the owner's own load reports). While
the owner's reported queue is above the high watermark, requests with the shared prefix go to the other
replica (``prefill=ring_walk``), token-exact; once the owner has drained below the low watermark, the
prefix returns to it (``prefill=ring_owner``, served from its cache).
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import grpc
import pytest

from protos import pdserve_pb2 as pb
from tests.integration.int_helpers import (
    cluster_config,
    reference_greedy,
    run_many,
    wait_until_no_blocks_held,
)
from worker_common.messages import SamplingSpec, WorkerRequest

pytestmark = pytest.mark.integration

HIGH, LOW = 1024, 512  # router watermarks of this test's cluster, in queued prefill tokens
HOLD_PROMPTS, HOLD_TOKENS = 6, 2000  # 12k tokens: about 3 s of prefill for one replica here
REPORT_WAIT_S = 0.6  # > 2 load-report periods (0.2 s): the ingress holds a report at least this fresh
SHARED = [256] + [(7 * i) % 200 + 32 for i in range(79)]  # 80 tokens: 5 full blocks (key depth is 4)


def _requests(tag: int, num: int) -> list[pb.GenerateRequest]:
    return [
        pb.GenerateRequest(
            token_ids=pb.TokenIds(ids=[*SHARED, 40 + tag + i, 41 + tag + i]), max_tokens=4, ignore_eos=True
        )
        for i in range(num)
    ]


def _check_tokens(requests: list[pb.GenerateRequest], results: list[Any]) -> None:
    for request, result in zip(requests, results, strict=True):
        assert result.code == grpc.StatusCode.OK, result.details
        assert result.token_ids == list(reference_greedy(tuple(request.token_ids.ids), 4))
        assert result.last is not None


async def _queued(handle: Any, replica_id: str) -> int:
    load = await handle.replica_stats.remote(target_replica_id=replica_id)
    assert load.replica_id == replica_id
    return load.queued_prefill_tokens


async def _hold_and_route(address: str, app_name: str, owner: str) -> dict[str, Any]:
    """Load ``owner`` with long prompts sent straight to it; route same-prefix requests meanwhile."""
    from ray import serve

    handle = serve.get_deployment_handle("PrefillDeployment", app_name)
    assert await _queued(handle, owner) == 0
    rng = random.Random(5)

    async def hold(index: int) -> str:
        prompt = tuple([256] + [rng.randrange(0, 256) for _ in range(HOLD_TOKENS - 1)])
        work = WorkerRequest(f"hold-{index}", prompt, SamplingSpec(max_tokens=2, ignore_eos=True))
        result = await handle.prefill.remote(work, target_replica_id=owner)
        await handle.release.remote(result.request_id, target_replica_id=owner)  # the test is its decode side
        return result.replica_id

    holds = [asyncio.create_task(hold(i)) for i in range(HOLD_PROMPTS)]
    deadline = time.monotonic() + 10
    while (queued_before := await _queued(handle, owner)) <= HIGH:
        assert time.monotonic() < deadline, "the owner never reported a queue above the high watermark"
        await asyncio.sleep(0.02)
    await asyncio.sleep(REPORT_WAIT_S)
    queued_at_route = await _queued(handle, owner)
    during_requests = _requests(10, 3)
    during = await run_many(address, during_requests)
    queued_after = await _queued(handle, owner)
    hold_replicas = await asyncio.gather(*holds)
    return {
        "queued": (queued_before, queued_at_route, queued_after),
        "requests": during_requests,
        "results": during,
        "hold_replicas": hold_replicas,
    }


def test_hot_prefix_owner_falls_back_to_the_other_replica(pd_cluster) -> None:
    config = cluster_config(  # 1024 blocks: the holds evict no prefix
        2,
        1,
        {
            "engine.kv_cache_bytes": 64 * 2**20,
            "router.high_watermark_tokens": HIGH,
            "router.low_watermark_tokens": LOW,
        },
    )
    cluster = pd_cluster.ensure(config)
    address = cluster.grpc_address

    # 1. Affinity: the shared prefix goes to its ring owner; the second request is served from its cache.
    first_requests = _requests(0, 2)
    first = [asyncio.run(run_many(address, [r]))[0] for r in first_requests]
    _check_tokens(first_requests, first)
    owner = first[0].last.route.prefill_replica
    assert all("prefill=ring_owner" in r.last.route.reason for r in first), [r.last.route for r in first]
    assert first[1].last.route.prefill_replica == owner
    assert first[1].last.usage.cached_tokens >= 64

    # 2. The owner held above its high watermark: the same prefix walks the ring to the other replica.
    held = asyncio.run(_hold_and_route(address, config.app_name, owner))
    _, queued_at_route, queued_after = held["queued"]
    assert held["hold_replicas"] == [owner] * HOLD_PROMPTS
    _check_tokens(held["requests"], held["results"])
    for result in held["results"]:
        route = result.last.route
        assert route.prefill_replica != owner, (route, held["queued"])
        assert "prefill=ring_walk" in route.reason, route
        assert route.kv_transport == "shm"
    # The hold was real: above HIGH when routing began (the ingress then held a report at least that
    # fresh), and still above LOW (so still hot: hysteresis) after the last of them had finished.
    assert queued_at_route > HIGH and queued_after > LOW, held["queued"]

    # 3. Drained below the low watermark: the prefix returns to its owner and its cache.
    time.sleep(REPORT_WAIT_S)
    after_requests = _requests(20, 1)
    after = asyncio.run(run_many(address, after_requests))
    _check_tokens(after_requests, after)
    route = after[0].last.route
    assert route.prefill_replica == owner and "prefill=ring_owner" in route.reason, route
    assert after[0].last.usage.cached_tokens >= 64
    _, blocks = wait_until_no_blocks_held(address, within_s=1.0)
    assert all(count == 0 for count in blocks.values()), blocks
    print(f"owner queue (tokens) when the hold was seen / at routing / after routing: {held['queued']}")
