"""Scheduler rules: per-step token budget, decodes first, admission by free blocks, preemption order."""

from __future__ import annotations

from engine.block_pool import BlockPool
from engine.config import SchedulerConfig
from engine.sampling import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence, SequenceStatus


def _seq(request_id: str, num_tokens: int) -> Sequence:
    first = 1000 * ord(request_id[0])  # distinct tokens per request: no prefix-cache hits between them
    return Sequence(request_id, list(range(first, first + num_tokens)), num_tokens, SamplingParams(), seed=0)


def _run(scheduler: Scheduler) -> dict[str, int]:
    """One step without a model: commit and, for sequences that reach their end, append a token."""
    output = scheduler.schedule()
    completing = [item.seq for item in output.scheduled if item.completes_sequence]
    scheduler.commit(output)
    for seq in completing:
        seq.token_ids.append(7)
    scheduler.pool.check_invariants()
    return {item.seq.request_id: item.num_tokens for item in output.scheduled}


def _finish_all(scheduler: Scheduler) -> None:
    for seq in [*scheduler.running, *scheduler.waiting]:
        scheduler.finish(seq, "abort")
    assert scheduler.pool.num_used_blocks == 0  # leak check
    scheduler.pool.check_invariants()


def test_budget_chunks_prompts_and_decodes_go_first() -> None:
    scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=32, max_num_seqs=8), BlockPool(64, 16))
    scheduler.add(_seq("a", 20))
    scheduler.add(_seq("b", 50))
    assert _run(scheduler) == {"a": 20, "b": 12}  # a whole, b's first chunk
    assert _run(scheduler) == {"a": 1, "b": 31}  # a decodes first, b continues
    assert _run(scheduler) == {"a": 1, "b": 7}  # b's last chunk: 50 = 12 + 31 + 7
    assert _run(scheduler) == {"a": 1, "b": 1}
    _finish_all(scheduler)


def test_admission_waits_for_free_blocks() -> None:
    scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=256, max_num_seqs=8), BlockPool(4, 16))
    scheduler.add(_seq("a", 40))  # 3 blocks
    scheduler.add(_seq("b", 40))  # 3 more: does not fit next to a
    assert _run(scheduler) == {"a": 40}
    assert [s.request_id for s in scheduler.waiting] == ["b"]
    a = scheduler.running[0]
    scheduler.finish(a, "length")
    assert _run(scheduler) == {"b": 40}
    _finish_all(scheduler)


def test_preemption_takes_the_most_recent_and_recomputes() -> None:
    scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=256, max_num_seqs=8), BlockPool(4, 16))
    scheduler.add(_seq("a", 32))  # 2 full blocks
    scheduler.add(_seq("b", 32))
    assert _run(scheduler) == {"a": 32, "b": 32}  # pool full, both prompts end on a block boundary
    # Each now needs a third block for its first decode; none is free: b (admitted last) gives way.
    assert _run(scheduler) == {"a": 1}
    b = scheduler.waiting[0]
    assert b.request_id == "b" and b.status is SequenceStatus.WAITING and b.num_computed_tokens == 0
    assert scheduler.num_preemptions == 1
    _finish_all(scheduler)
