"""Faults on the running cluster: the prefill replica is killed between two rounds of requests. Serve
starts a new one (a new KV endpoint incarnation); every later request completes token-exact, and no
block stays held on either pool."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from protos import pdserve_pb2 as pb
from tests.integration.int_helpers import (
    cluster_config,
    cluster_info,
    make_prompts,
    reference_greedy,
    run_many,
    wait_until_no_blocks_held,
)

pytestmark = pytest.mark.integration


def _round(address: str, prompts: list[tuple[int, ...]]) -> list[pb.GenerateResponse]:
    requests = [
        pb.GenerateRequest(token_ids=pb.TokenIds(ids=p), max_tokens=8, ignore_eos=True) for p in prompts
    ]
    results = asyncio.run(run_many(address, requests))
    for prompt, result in zip(prompts, results, strict=True):
        assert result.code == grpc.StatusCode.OK, result.details
        assert result.token_ids == list(reference_greedy(prompt, 8))
    return [r.last for r in results if r.last is not None]


def test_prefill_replica_restarts_between_requests(pd_cluster) -> None:
    import ray

    cluster = pd_cluster.ensure(cluster_config(1, 1))
    prompts = make_prompts(4, seed=11)
    before = _round(cluster.grpc_address, prompts)
    old_replica = before[0].route.prefill_replica
    actors = [
        a
        for a in ray.util.list_named_actors(all_namespaces=True)
        if "PrefillDeployment" in a["name"] and old_replica in a["name"]
    ]
    assert len(actors) == 1, actors
    ray.kill(ray.get_actor(actors[0]["name"], namespace=actors[0]["namespace"]), no_restart=True)

    after = _round(cluster.grpc_address, prompts)  # waits for Serve's replacement replica
    assert all(last.route.prefill_replica != old_replica for last in after)
    assert all(last.route.kv_transport == "shm" for last in after)
    _, held = wait_until_no_blocks_held(cluster.grpc_address, within_s=1.0)
    assert all(count == 0 for count in held.values()), held
    prefill_pool = next(pool for pool in cluster_info(cluster.grpc_address).pools if pool.name == "prefill")
    assert [r.replica_id for r in prefill_pool.replicas] != [old_replica]
