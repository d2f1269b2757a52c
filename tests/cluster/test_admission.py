"""Admission control's books (cluster.admission) without Ray: KV budgets per pool, the bounded FIFO queue,
its wait limit, refusals with a retry hint, cancels, and the never-fits refusal; the config section."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from cluster.admission import (
    AdmissionConfig,
    AdmissionRefused,
    KVAdmission,
    NeverFits,
    retry_after_metadata,
)
from cluster.config import ConfigError, config_from_dict
from cluster.servicer import status_for


def _books(capacity: dict[str, list[int]], **config) -> KVAdmission:
    return KVAdmission(
        AdmissionConfig(**config), 16, tuple(capacity), lambda pool: capacity[pool], num_ingress_replicas=1
    )


def test_blocks_needed_at_max_tokens_on_both_pools() -> None:
    books = _books({"prefill": [100], "decode": [100]})
    need = books.need_of(40, 100)
    assert need.blocks == {"decode": 9, "prefill": 3}  # ceil(140 / 16); 40 // 16 + 1 (the first token)


def test_admits_within_budget_then_queues_then_refuses_at_once() -> None:
    async def scenario() -> None:
        books = _books({"decode": [20, 20]}, max_queue=2, max_queue_wait_s=5.0)  # budget 40 blocks
        tickets = [await books.admit(100, 60) for _ in range(4)]  # 10 blocks each: 40
        assert books.reserved == {"decode": 40}
        waiting = [asyncio.ensure_future(books.admit(100, 60)) for _ in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(AdmissionRefused) as refused:
            await books.admit(10, 6)  # small, but the queue is full and FIFO: refused at once
        assert refused.value.retry_after_s == 1 and "queue is full" in str(refused.value)
        assert books.snapshot()["queue_depth"] == 2
        tickets[0].release()
        tickets[0].release()  # idempotent
        first = await waiting[0]
        assert not waiting[1].done()
        tickets[1].release()
        second = await waiting[1]
        for ticket in (first, second, *tickets[2:]):
            ticket.release()
        assert books.reserved == {"decode": 0}
        snapshot = books.snapshot()
        assert snapshot["max_queue_depth_seen"] == 2 and snapshot["refused_queue_full"] == 1

    asyncio.run(scenario())


def test_a_queued_request_is_refused_after_max_queue_wait_s_and_a_cancel_leaves_no_trace() -> None:
    async def scenario() -> None:
        books = _books({"decode": [10]}, max_queue=4, max_queue_wait_s=0.05, retry_after_s=3)
        held = await books.admit(100, 60)
        with pytest.raises(AdmissionRefused) as refused:
            await books.admit(100, 60)
        assert refused.value.retry_after_s == 3 and "max_queue_wait_s" in str(refused.value)
        cancelled = asyncio.ensure_future(books.admit(100, 60))
        await asyncio.sleep(0)
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        assert books.snapshot()["queue_depth"] == 0
        held.release()
        assert books.reserved == {"decode": 0}
        (await books.admit(100, 60)).release()  # the budget is whole again

    asyncio.run(scenario())


def test_prefill_blocks_come_back_when_the_decode_side_has_pulled() -> None:
    async def scenario() -> None:
        books = _books({"prefill": [4], "decode": [100]}, max_queue=0)
        ticket = await books.admit(40, 8)  # prefill: 3 of 4 blocks
        with pytest.raises(AdmissionRefused):
            await books.admit(40, 8)
        ticket.release_prefill()
        assert books.reserved == {"prefill": 0, "decode": 3}
        second = await books.admit(40, 8)
        ticket.release()
        second.release()
        assert books.reserved == {"prefill": 0, "decode": 0}

    asyncio.run(scenario())


def test_overcommit_scales_the_budget_and_unknown_capacity_admits() -> None:
    async def scenario() -> None:
        books = _books({"decode": [10]}, overcommit=2.0, max_queue=0)
        tickets = [await books.admit(100, 60) for _ in range(2)]  # 20 blocks of a 10-block pool
        with pytest.raises(AdmissionRefused):
            await books.admit(100, 60)
        for ticket in tickets:
            ticket.release()
        unknown = _books({"decode": []}, max_queue=0)  # no load report yet: start-up admits
        assert [await unknown.admit(1000, 1000) for _ in range(3)]

    asyncio.run(scenario())


def test_a_request_larger_than_one_replica_is_invalid_and_names_both_numbers() -> None:
    async def scenario() -> None:
        books = _books({"decode": [8, 8]})
        with pytest.raises(NeverFits) as error:
            await books.admit(100, 60)
        code, message = status_for(error.value)
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert "prompt (100 tokens)" in message and "max_tokens (60)" in message and "holds 8" in message

    asyncio.run(scenario())


def test_refusals_map_to_resource_exhausted_with_a_retry_after_trailer() -> None:
    refused = AdmissionRefused("admission: queue full", 2)
    code, _ = status_for(refused)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert retry_after_metadata(refused, code) == (("retry-after", "2"),)
    assert retry_after_metadata(RuntimeError("x"), grpc.StatusCode.INTERNAL) == ()


def test_config_section_defaults_and_refusals() -> None:
    config = config_from_dict({})
    assert config.admission.enabled and config.admission.overcommit == 1.0
    changed = config.override({"admission.max_queue": 3, "admission.max_queue_wait_s": 0.5})
    assert changed.admission.max_queue == 3
    with pytest.raises(ConfigError, match=r"admission\.max_queue"):
        config_from_dict({"admission": {"max_queue": -1}})
    with pytest.raises(ConfigError, match=r"admission\.max_queu"):
        config_from_dict({"admission": {"max_queu": 1}})
