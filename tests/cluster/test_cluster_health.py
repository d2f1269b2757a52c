"""Health and ClusterInfo with one replica of a pool dead or stuck (fake Serve handles, no Ray): SERVING
while every pool has a replica that answers (docs/api.md), and ClusterInfo lists the ones that answered."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest
from ray.exceptions import ActorDiedError

import cluster.servicer
from cluster.replica_directory import REPLICA_DIRECTORY
from cluster.request_path import DECODE_DEPLOYMENT, PREFILL_DEPLOYMENT
from cluster.servicer import PDServeServicer
from cluster.stats import ReplicaLoad
from protos import pdserve_pb2 as pb


def _load(replica_id: str) -> ReplicaLoad:
    return ReplicaLoad(replica_id, 0, 0, 0, 8, 0, 0, 8, 8, 0, 0, 0, 0, 0.0)


class FakeHandle:
    """``handle.replica_stats.remote(target_replica_id=...)`` as Serve's: each replica answers, raises
    (dead) or never answers (stuck)."""

    def __init__(self, behaviour: dict[str, str]) -> None:
        self.behaviour = behaviour
        self.replica_stats = SimpleNamespace(remote=self._remote)

    def _remote(self, target_replica_id: str | None = None) -> Any:
        replica_id = target_replica_id or next(iter(self.behaviour))

        async def answer() -> ReplicaLoad:
            what = self.behaviour[replica_id]
            if what == "dead":
                raise ActorDiedError()
            if what == "stuck":
                await asyncio.sleep(3600)
            return _load(replica_id)

        return answer()


class FakeRouter:
    def __init__(self, replica_ids: list[str]) -> None:
        self.curr_replicas = {
            rid: SimpleNamespace(replica_id=SimpleNamespace(unique_id=rid), routing_stats=None)
            for rid in replica_ids
        }


def _servicer(prefill: dict[str, str], decode: dict[str, str]) -> PDServeServicer:
    REPLICA_DIRECTORY.register(PREFILL_DEPLOYMENT, FakeRouter(list(prefill)))
    REPLICA_DIRECTORY.register(DECODE_DEPLOYMENT, FakeRouter(list(decode)))
    config = SimpleNamespace(
        engine=SimpleNamespace(block_size=16),
        is_colocated=False,
        kv_transfer=SimpleNamespace(backend="shm"),
        router=SimpleNamespace(policy="prefix_hash"),
    )
    path = SimpleNamespace(
        config=config, model=SimpleNamespace(name="m"), prefill=FakeHandle(prefill), decode=FakeHandle(decode)
    )
    return PDServeServicer(path)  # type: ignore[arg-type]


@pytest.fixture(autouse=True)
def short_timeout(monkeypatch) -> None:
    monkeypatch.setattr(cluster.servicer, "REPLICA_TIMEOUT_S", 0.2)
    monkeypatch.setattr(REPLICA_DIRECTORY, "_routers", {})  # this process's directory, restored after


@pytest.mark.parametrize("failure", ["dead", "stuck"])
def test_one_replica_down_keeps_serving_and_cluster_info_lists_the_others(failure: str) -> None:
    servicer = _servicer({"p1": failure, "p0": "ok"}, {"d0": "ok", "d1": failure})
    health = asyncio.run(servicer.Health(pb.HealthRequest(), None))  # type: ignore[arg-type]
    assert health.status == pb.HealthResponse.SERVING
    info = asyncio.run(servicer.ClusterInfo(pb.ClusterInfoRequest(), None))  # type: ignore[arg-type]
    assert [(pool.name, [r.replica_id for r in pool.replicas]) for pool in info.pools] == [
        ("prefill", ["p0"]),
        ("decode", ["d0"]),
    ]


def test_a_pool_with_no_replica_answering_is_not_serving() -> None:
    servicer = _servicer({"p0": "dead", "p1": "stuck"}, {"d0": "ok"})
    assert not asyncio.run(servicer.pools_ready())
    health = asyncio.run(servicer.Health(pb.HealthRequest(), None))  # type: ignore[arg-type]
    assert health.status == pb.HealthResponse.NOT_SERVING
