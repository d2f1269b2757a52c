"""An in-process fake PDServe gRPC server that streams tokens on a known schedule.

The schedule of a request is a `Plan` chosen from its prompt length: the first token `ttft_ms`
after the request arrived, then messages of `message_sizes` tokens, a message of k tokens sent
k x `gap_ms` after the previous one. Send times are absolute (start + offset), so sleeping late
once does not shift later tokens: the client-side error of any arrival is the scheduling lateness
of that one send, never a sum.

The server runs on its own event loop in a thread, on 127.0.0.1 with a free port, so the
benchmark's blocking runner (its own `asyncio.run`) and click's CliRunner can call it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from protos import pdserve_pb2, pdserve_pb2_grpc


@dataclass(frozen=True)
class Plan:
    """How the fake server answers one request."""

    ttft_ms: float
    gap_ms: float                    # per token: a k-token message comes k x gap_ms after the previous
    chunk_pattern: tuple[int, ...]   # sizes of the messages after the first, repeated (cut to fit)
    cached_tokens: int = 0
    kv_transfer_ms: float = 0.0
    error: grpc.StatusCode | None = None   # abort with this code after ttft_ms instead of answering

    def message_sizes(self, num_tokens: int) -> list[int]:
        """Tokens per message for a `num_tokens` answer: 1 first, then the pattern, cut to fit."""
        sizes, left, i = [1], num_tokens - 1, 0
        while left > 0:
            size = min(self.chunk_pattern[i % len(self.chunk_pattern)], left)
            sizes.append(size)
            left -= size
            i += 1
        return sizes

    def itl_ms(self, num_tokens: int) -> list[float]:
        """The exact ITLs this plan produces under the bench's convention (one gap, k - 1 zeros)."""
        gaps: list[float] = []
        for size in self.message_sizes(num_tokens)[1:]:
            gaps.append(size * self.gap_ms)
            gaps.extend([0.0] * (size - 1))
        return gaps

    def e2e_ms(self, num_tokens: int) -> float:
        """Planned arrival -> last token."""
        return self.ttft_ms + (num_tokens - 1) * self.gap_ms


# the fixed ClusterInfo the fake reports: prefill running 1 and 3, KV 25 % and 75 %; decode idle
CLUSTER_INFO = pdserve_pb2.ClusterInfoResponse(
    model="fake", block_size=16, kv_transport="none", router_policy="fake",
    pools=[
        pdserve_pb2.PoolInfo(name="prefill", replicas=[
            pdserve_pb2.ReplicaInfo(replica_id="p0", running_requests=1, queued_requests=2,
                                    kv_blocks_total=100, kv_blocks_used=25),
            pdserve_pb2.ReplicaInfo(replica_id="p1", running_requests=3, queued_requests=0,
                                    kv_blocks_total=100, kv_blocks_used=75)]),
        pdserve_pb2.PoolInfo(name="decode", replicas=[
            pdserve_pb2.ReplicaInfo(replica_id="d0", running_requests=0, kv_blocks_total=50)]),
    ])


@dataclass
class ServerLog:
    """What the server actually did for one request, on `time.perf_counter` (the clock the bench
    uses too: one process, one clock): when the request arrived and when each message was sent."""

    request: pdserve_pb2.GenerateRequest
    received_s: float
    sent_s: list[float] = field(default_factory=list)
    sent_num_tokens: list[int] = field(default_factory=list)


class FakePDServe(pdserve_pb2_grpc.PDServeServicer):
    """Answers Generate by `plan_for(request)`; Health and ClusterInfo with fixed replies."""

    def __init__(self, plan_for: Callable[[pdserve_pb2.GenerateRequest], Plan]) -> None:
        self.plan_for = plan_for
        self.log: dict[str, ServerLog] = {}   # by request_id

    async def Generate(self, request, context):
        loop = asyncio.get_running_loop()
        start = loop.time()
        log = self.log[request.request_id] = ServerLog(request, time.perf_counter())
        plan = self.plan_for(request)
        num_prompt = len(request.token_ids.ids)
        await asyncio.sleep(max(0.0, start + plan.ttft_ms / 1000.0 - loop.time()))
        if plan.error is not None:
            await context.abort(plan.error, "injected error")
        sizes = plan.message_sizes(request.max_tokens)
        offset_ms = plan.ttft_ms
        for i, size in enumerate(sizes):
            if i > 0:
                offset_ms += size * plan.gap_ms
                await asyncio.sleep(max(0.0, start + offset_ms / 1000.0 - loop.time()))
            response = pdserve_pb2.GenerateResponse(request_id=request.request_id,
                                                    token_ids=[7] * size, text="x" * size)
            if i == len(sizes) - 1:
                response.finish_reason = pdserve_pb2.FINISH_REASON_LENGTH
                response.usage.CopyFrom(pdserve_pb2.Usage(
                    prompt_tokens=num_prompt, cached_tokens=plan.cached_tokens,
                    completion_tokens=request.max_tokens))
                response.timings.CopyFrom(pdserve_pb2.Timings(
                    ttft_ms=plan.ttft_ms, kv_transfer_ms=plan.kv_transfer_ms,
                    e2e_ms=plan.e2e_ms(request.max_tokens)))
                response.route.CopyFrom(pdserve_pb2.RouteInfo(prefill_replica="p0", decode_replica="d0",
                                                              reason="fake", kv_transport="none"))
            log.sent_s.append(time.perf_counter())
            log.sent_num_tokens.append(size)
            yield response

    async def Health(self, request, context):
        return pdserve_pb2.HealthResponse(status=pdserve_pb2.HealthResponse.SERVING, model="fake")

    async def ClusterInfo(self, request, context):
        return CLUSTER_INFO


class FakeServer:
    """Context manager: the fake servicer on 127.0.0.1:<free port>, in a background thread."""

    def __init__(self, plan_for: Callable[[pdserve_pb2.GenerateRequest], Plan]) -> None:
        self.servicer = FakePDServe(plan_for)
        self.address = ""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: grpc.aio.Server | None = None

    def __enter__(self) -> FakeServer:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=30)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        self._loop.close()

    async def _start(self) -> None:
        self._server = grpc.aio.server()
        pdserve_pb2_grpc.add_PDServeServicer_to_server(self.servicer, self._server)
        port = self._server.add_insecure_port("127.0.0.1:0")   # 0: the OS picks a free port
        await self._server.start()
        self.address = f"127.0.0.1:{port}"

    async def _stop(self) -> None:
        assert self._server is not None
        await self._server.stop(grace=None)
