"""``EngineLoop(gather=(gap_s, max_s))``: a burst of requests reaching an idle engine starts in one forward
(the prefill worker's default), and a steady trickle still starts stepping after ``max_s``. A real built-in
engine; the steps are observed through the loop's own ``on_outputs`` calls."""

from __future__ import annotations

import threading
import time

import pytest

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.sampling import SamplingParams
from worker_common.engine_loop import EngineLoop


@pytest.fixture(scope="module")
def engine() -> LLMEngine:
    return LLMEngine(EngineConfig(num_threads=1))


class Steps:
    """Each ``on_outputs`` call (one per engine step that produced outputs) and when it came."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, list[str]]] = []
        self.done = threading.Event()

    def __call__(self, outputs: list[RequestOutput]) -> None:
        self.calls.append((time.monotonic(), [o.request_id for o in outputs]))
        if any(o.finished for o in outputs):
            self.done.set()


def _add(request_id: str):
    params = SamplingParams(max_tokens=1, ignore_eos=True)
    return lambda engine: engine.add_request(request_id, [5, 6, 7, 8], params)


def test_a_burst_starts_in_one_forward(engine: LLMEngine) -> None:
    steps = Steps()
    loop = EngineLoop(engine, steps, gather=(0.25, 5.0))
    loop.start()
    try:
        futures = []
        for index in range(4):  # 30 ms apart: well inside the gap, far apart for a loop without gather
            futures.append(loop.call(_add(f"burst-{index}")))
            time.sleep(0.03)
        for future in futures:
            future.result(timeout=30)
        assert steps.done.wait(30)
    finally:
        loop.stop()
    assert sorted(steps.calls[0][1]) == [f"burst-{index}" for index in range(4)]


def test_a_trickle_still_starts_after_max_s(engine: LLMEngine) -> None:
    steps = Steps()
    loop = EngineLoop(engine, steps, gather=(0.25, 0.2))
    loop.start()
    try:
        started = time.monotonic()
        for index in range(40):  # one every 20 ms for 0.8 s: never a gap, so max_s must end the wait
            loop.call(_add(f"trickle-{index}"))
            time.sleep(0.02)
        posted = time.monotonic()
        assert steps.done.wait(30)
    finally:
        loop.stop()
    first_step_at = steps.calls[0][0]
    assert first_step_at < posted, "the loop waited for the whole trickle"
    assert first_step_at - started < 0.8
