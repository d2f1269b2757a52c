"""Decode-replica loss detection and the migration books (cluster.migration) without Ray: a stream that
breaks with an actor error or goes silent past the heartbeat timeout is lost (within the bound), a
heartbeat keeps a slow stream alive, other errors pass through; the per-request limit; suspects."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from ray.exceptions import ActorDiedError

from cluster.config import ConfigError, config_from_dict
from cluster.migration import (
    DecodeReplicaLost,
    MigrationConfig,
    MigrationFailed,
    MigrationLog,
    StreamProgress,
    watch_decode,
)
from cluster.replica_directory import ReplicaView
from cluster.servicer import status_for
from tests.integration.int_helpers import reliability_config
from worker_common.messages import DecodeChunk


async def _stream(items: list[object], pause_s: float = 0.0):
    for item in items:
        if isinstance(item, float):
            await asyncio.sleep(item)
        elif isinstance(item, BaseException):
            raise item
        else:
            yield item
    await asyncio.sleep(pause_s)  # then silence (a hung replica), or the end


def _collect(stream, timeout_s: float) -> tuple[list[DecodeChunk], BaseException | None, float]:
    async def run() -> tuple[list[DecodeChunk], BaseException | None, float]:
        chunks: list[DecodeChunk] = []
        started = time.monotonic()
        try:
            async for chunk in watch_decode(stream, timeout_s, "d1"):
                chunks.append(chunk)
        except Exception as error:
            return chunks, error, time.monotonic() - started
        return chunks, None, time.monotonic() - started

    return asyncio.run(run())


def test_heartbeats_keep_a_waiting_stream_alive_and_are_dropped() -> None:
    beat = DecodeChunk([], replica_id="d1", is_heartbeat=True)
    items = [beat, 0.06, beat, 0.06, beat, DecodeChunk([5], finished=True, replica_id="d1")]
    chunks, error, _ = _collect(_stream(items), timeout_s=0.1)
    assert error is None and [c.token_ids for c in chunks] == [[5]]


def test_silence_past_the_timeout_is_a_loss_detected_within_the_bound() -> None:
    chunks, error, elapsed = _collect(_stream([DecodeChunk([1], replica_id="d2")], pause_s=5.0), 0.2)
    assert [c.token_ids for c in chunks] == [[1]]
    assert isinstance(error, DecodeReplicaLost) and error.replica_id == "d2"
    assert "no message for 0.2 s" in error.reason
    assert 0.2 <= elapsed < 1.0 and error.detected - error.last_heard >= 0.2


def _collect_queued(stream, timeout_s: float, is_reporting) -> tuple[list[DecodeChunk], BaseException | None]:
    async def run() -> tuple[list[DecodeChunk], BaseException | None]:
        chunks: list[DecodeChunk] = []
        try:
            async for chunk in watch_decode(stream, timeout_s, "d1", is_reporting):
                chunks.append(chunk)
        except Exception as error:
            return chunks, error
        return chunks, None

    return asyncio.run(run())


def test_before_its_first_message_a_call_waits_while_its_replica_reports() -> None:
    """A call queued in Serve for a slot (no first message, no heartbeat) is not lost while its replica
    publishes load reports (1,000 streams on one replica: 744 wait past max_ongoing_requests); once it
    stops reporting, the silence is a loss; after the first message silence is a loss either way."""
    asked: list[str] = []

    def alive(replica_id: str) -> bool:
        asked.append(replica_id)
        return True

    late = [0.35, DecodeChunk([7], finished=True, replica_id="d1")]  # queued 0.35 s at a 0.1 s timeout
    chunks, error = _collect_queued(_stream(late), 0.1, alive)
    assert error is None and [c.token_ids for c in chunks] == [[7]] and set(asked) == {"d1"}
    chunks, error = _collect_queued(_stream(late), 0.1, lambda _: False)  # the replica stopped reporting
    assert isinstance(error, DecodeReplicaLost) and "no message for 0.1 s" in error.reason and not chunks
    started = [DecodeChunk([1], replica_id="d1"), 0.35, DecodeChunk([2], finished=True, replica_id="d1")]
    chunks, error = _collect_queued(_stream(started), 0.1, alive)  # silent after its first message: hung
    assert isinstance(error, DecodeReplicaLost) and [c.token_ids for c in chunks] == [[1]]


def test_decode_reports_within_reads_the_routers_load_reports() -> None:
    from types import SimpleNamespace

    from cluster.migration import decode_reports_within
    from cluster.replica_directory import REPLICA_DIRECTORY
    from cluster.stats import ReplicaLoad

    def replica(replica_id: str, age_s: float | None) -> SimpleNamespace:
        load = None
        if age_s is not None:
            load = ReplicaLoad(
                replica_id, 0, 0, 0, 10, 0, 0, 10, 10, 0, 0, 0, 0, time.time() - age_s
            ).to_routing_stats()
        return SimpleNamespace(replica_id=SimpleNamespace(unique_id=replica_id), routing_stats=load)

    router = SimpleNamespace(curr_replicas={})
    saved = REPLICA_DIRECTORY._routers.get("DecodeDeployment")
    REPLICA_DIRECTORY.register("DecodeDeployment", router)
    try:
        is_reporting = decode_reports_within(2.0)
        assert not is_reporting("d1")  # no replica known
        router.curr_replicas = {"a": replica("d1", 0.5), "b": replica("d2", 5.0), "c": replica("d3", None)}
        assert is_reporting("d1") and not is_reporting("d2") and not is_reporting("d3")
        assert not is_reporting("")  # "" (Serve picks): only while every decode replica reports
        router.curr_replicas = {"a": replica("d1", 0.5)}
        assert is_reporting("")
    finally:
        REPLICA_DIRECTORY.register("DecodeDeployment", saved)


def test_a_call_cancelled_under_the_ingress_is_a_loss_not_a_client_cancel() -> None:
    """Serve cancelling the call's own futures (not the caller's task) must not end the client's stream
    CANCELLED: the stream is lost and moves."""
    _, error, _ = _collect(_stream([DecodeChunk([1], replica_id="d1"), asyncio.CancelledError()]), 1.0)
    assert isinstance(error, DecodeReplicaLost) and "cancelled by Serve" in error.reason


def test_an_actor_error_is_a_loss_and_other_errors_pass_through() -> None:
    _, error, _ = _collect(_stream([DecodeChunk([1]), ActorDiedError()]), 1.0)
    assert isinstance(error, DecodeReplicaLost) and "ActorDiedError" in error.reason
    _, error, _ = _collect(_stream([ValueError("bad")]), 1.0)
    assert isinstance(error, ValueError)


def test_the_limit_ends_the_request_unavailable_and_suspects_are_avoided() -> None:
    log = MigrationLog(MigrationConfig(max_migrations=1, suspect_s=60.0))
    progress = StreamProgress([1, 2, 3], 7)
    loss = DecodeReplicaLost("d1", "no message for 1.5 s", time.time())
    event = log.on_loss("r#1", loss, progress, count=1)
    assert event.num_tokens_sent == 3 and event.outcome == "moving"
    views = [ReplicaView("d1", None), ReplicaView("d2", None)]
    assert [v.replica_id for v in log.healthy(views)] == ["d2"]
    with pytest.raises(MigrationFailed) as failed:
        log.on_loss("r#1", DecodeReplicaLost("d2", "ActorDiedError", time.time()), progress, count=2)
    code, message = status_for(failed.value)
    assert code == grpc.StatusCode.UNAVAILABLE and "max_migrations=1" in message and "d2" in message
    snapshot = log.snapshot()
    assert snapshot["num_migrations"] == 1 and snapshot["num_failed"] == 1
    assert [e["outcome"] for e in snapshot["events"]] == ["moving", "failed"]


def test_config_section() -> None:
    assert config_from_dict({}).migration.heartbeat_timeout_s == 10.0  # a dead replica is seen at once
    # acceptance 1's hung replica: detection within 2 s, with the timeout the migration test sets
    assert reliability_config().migration.heartbeat_timeout_s < 2.0
    with pytest.raises(ConfigError, match="heartbeat_timeout_s"):
        config_from_dict({"migration": {"heartbeat_interval_s": 1.0, "heartbeat_timeout_s": 1.5}})
