"""Both workers against a fake engine and transport that implement only ``worker_common.protocols``:
the prefill worker lends KV exactly when the engine says "prefilled" and passes the engine's reason on
otherwise (no stop rule of its own); the decode worker streams and aborts on cancel."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import torch

from engine.outputs import PREFILLED, EngineStats, RequestOutput
from engine.sampling import SamplingParams
from kv_transfer.base import KVHandle, LayoutSignature, TransferEndpoint
from worker_common.messages import DecodeRequest, SamplingSpec, WorkerRequest
from worker_common.protocols import PullTransfer, WorkerEngine, WorkerTransport


class FakeEngine:
    """Each request leaves after one step with ``reasons[request_id]`` and token 7 per step."""

    def __init__(self, reasons: dict[str, str | None]) -> None:
        self.kv_cache = torch.zeros(4, 2, 2, 16, 2, 8)
        self.reasons = reasons
        self.queue: list[tuple[str, int]] = []
        self.calls: list[tuple[str, str]] = []

    def layout_fingerprint(self) -> str:
        return "fake@0"

    def has_unfinished_requests(self) -> bool:
        return bool(self.queue)

    def step(self) -> list[RequestOutput]:
        outputs, self.queue = self.queue, []
        return [
            RequestOutput(rid, [7], self.reasons[rid] is not None, self.reasons[rid], num_prompt, 0)
            for rid, num_prompt in outputs
        ]

    def stats(self) -> EngineStats:
        return EngineStats(4, 0, 0, 4, 4, 0, 0, 0, 0, 0, 0, 0, 0)

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        params: SamplingParams | None = None,
        tenant: str = "",
        prefill_only: bool = False,
        output_token_ids: Sequence[int] = (),
    ) -> None:
        self.calls.append(("add_request", request_id))
        self.queue.append((request_id, len(prompt_token_ids)))

    def abort_request(self, request_id: str) -> None:
        self.calls.append(("abort_request", request_id))

    def pinned_blocks(self, request_id: str) -> list[int]:
        return [2, 0]

    def release_pinned(self, request_id: str) -> None:
        self.calls.append(("release_pinned", request_id))

    def can_allocate_blocks(self, num_blocks: int) -> bool:
        return True

    def allocate_blocks(self, request_id: str, num_tokens: int, tenant: str = "") -> list[int]:
        return [1]

    def add_prefilled_request(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        first_token_id: int,
        block_ids: Sequence[int],
        params: SamplingParams | None = None,
        tenant: str = "",
        earlier_output_ids: Sequence[int] = (),
    ) -> None:
        self.add_request(request_id, prompt_token_ids)

    def free_allocated(self, request_id: str) -> None:
        self.calls.append(("free_allocated", request_id))


class FakeTransport:
    def register(self, pool: torch.Tensor, layout: LayoutSignature) -> TransferEndpoint:
        return TransferEndpoint("fake", "p0", "1", b"", layout)

    def read_blocks(self, handle: KVHandle, local_block_ids: Sequence[int]) -> PullTransfer:
        raise NotImplementedError

    def close(self) -> None:
        pass


def _request(request_id: str) -> WorkerRequest:
    return WorkerRequest(request_id, (1, 2, 3), SamplingSpec(max_tokens=4))


def test_the_fakes_are_what_the_protocols_ask_for() -> None:
    engine: WorkerEngine = FakeEngine({})
    transport: WorkerTransport = FakeTransport()
    assert engine.layout_fingerprint() and transport is not None


def test_prefill_lends_kv_only_when_prefilled_and_passes_the_engine_reason_on() -> None:
    from prefill_worker.worker import PrefillWorker

    engine = FakeEngine({"go": PREFILLED, "ends": "eos"})
    worker = PrefillWorker(engine, FakeTransport(), "p0", "float32", 16, lease_s=30.0)

    async def run():
        return await worker.prefill(_request("go")), await worker.prefill(_request("ends"))

    try:
        prefilled, ended = asyncio.run(run())
        assert prefilled.is_prefilled and prefilled.finish_reason == PREFILLED
        assert prefilled.handle is not None and prefilled.handle.block_ids == (2, 0)
        assert prefilled.handle.num_tokens == 3 and worker.num_pinned == 1
        assert not ended.is_prefilled and ended.finish_reason == "eos" and ended.handle is None
        assert ("release_pinned", "ends") in engine.calls and ("release_pinned", "go") not in engine.calls
        assert asyncio.run(worker.release("go")) and not asyncio.run(worker.release("go"))
        assert worker.num_pinned == 0
    finally:
        worker.close()


def test_decode_streams_colocated_and_aborts_a_cancelled_stream() -> None:
    from decode_worker.worker import DecodeWorker

    engine = FakeEngine({"done": "length", "open": None})
    worker = DecodeWorker(engine, None, "d0", "shm", 1.0, "float32", 16)

    async def run():
        chunks = [chunk async for chunk in worker.generate(DecodeRequest(_request("done"), None, None))]
        stream = worker.generate(DecodeRequest(_request("open"), None, None))
        report = await stream.__anext__()
        await stream.__anext__()  # one token, not finished
        await stream.aclose()  # the caller went away
        await asyncio.sleep(0.1)  # the abort runs on the engine thread
        return chunks, report

    try:
        chunks, report = asyncio.run(run())
        assert chunks[0].is_transfer_report and chunks[-1].finished and chunks[-1].finish_reason == "length"
        assert report.is_transfer_report
        assert ("abort_request", "open") in engine.calls and ("abort_request", "done") not in engine.calls
    finally:
        worker.close()
