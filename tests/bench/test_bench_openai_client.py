"""The bench's HTTP client against a canned SSE server: chunks stamped with their token counts, usage
read from the usage chunk, HTTP errors and stream errors recorded, never raised."""

from __future__ import annotations

import asyncio
import json

import aiohttp
from aiohttp import web

from cluster.bench.openai_client import completion_body, send_openai_request
from cluster.bench.workload import BenchRequest


def _event(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


async def _serve(handler) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_post("/v1/completions", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}"


async def _one(handler) -> object:
    runner, base_url = await _serve(handler)
    try:
        async with aiohttp.ClientSession() as session:
            request = BenchRequest(index=3, prompt_token_ids=(1, 2, 3), max_tokens=4, arrival_s=None)
            return await send_openai_request(session, base_url, request, "r-3", 0.0, seed=5, tenant_id="t")
    finally:
        await runner.cleanup()


def test_a_stream_is_recorded_chunk_by_chunk() -> None:
    seen: list[dict] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        seen.append(await request.json())
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for token_ids, reason in (([7], None), ([8, 9], None), ([10], "length")):
            choice = {"index": 0, "text": "x", "token_ids": token_ids, "finish_reason": reason}
            await response.write(_event({"choices": [choice]}))
        usage = {"prompt_tokens": 3, "completion_tokens": 4, "prompt_tokens_details": {"cached_tokens": 0}}
        await response.write(_event({"choices": [], "usage": usage}) + b"data: [DONE]\n\n")
        return response

    record = asyncio.run(_one(handler))
    assert record.is_ok and record.message_num_tokens == [1, 2, 1] and record.num_completion_tokens == 4
    assert record.finish_reason == "FINISH_REASON_LENGTH"
    assert record.usage == {"prompt_tokens": 3, "cached_tokens": 0, "completion_tokens": 4}
    assert record.first_token_s is not None and record.end_s >= record.first_token_s
    assert seen[0]["prompt"] == [1, 2, 3] and seen[0]["user"] == "t" and seen[0]["return_token_ids"]


def test_http_and_stream_errors_are_recorded() -> None:
    async def refuse(request: web.Request) -> web.Response:
        body = {"error": {"message": "no room", "type": "rate_limit_error", "param": None, "code": "x"}}
        return web.json_response(body, status=429)

    record = asyncio.run(_one(refuse))
    assert (record.status, record.error) == ("HTTP_429", "no room")

    async def fail_midway(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        choice = {"index": 0, "text": "x", "token_ids": [7], "finish_reason": None}
        await response.write(_event({"choices": [choice]}) + _event({"error": {"message": "replica died"}}))
        return response

    record = asyncio.run(_one(fail_midway))
    assert (record.status, record.error, record.message_num_tokens) == ("STREAM_ERROR", "replica died", [1])


def test_body_matches_the_grpc_bench_sampling() -> None:
    request = BenchRequest(index=0, prompt_token_ids=(5,), max_tokens=2, arrival_s=None)
    body = completion_body(request, seed=1, tenant_id="")
    assert body["temperature"] == 0 and body["ignore_eos"] and "user" not in body


def test_runner_sends_the_workload_over_http() -> None:
    """BenchRunner with http_address: every request (and the warm-up) goes to /v1/completions; the
    fake gRPC server only answers ClusterInfo."""
    from cluster.bench.config import BenchConfig, parse_length_mix
    from cluster.bench.runner import BenchRunner
    from cluster.bench.workload import Workload
    from tests.bench.fake_server import FakeServer, Plan

    bodies: list[dict] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        bodies.append(body)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for index in range(body["max_tokens"]):
            reason = "length" if index == body["max_tokens"] - 1 else None
            choice = {"index": 0, "text": "x", "token_ids": [7], "finish_reason": reason}
            await response.write(_event({"choices": [choice]}))
        await response.write(b"data: [DONE]\n\n")
        return response

    async def run() -> object:
        runner, base_url = await _serve(handler)
        try:
            with FakeServer(lambda request: Plan(ttft_ms=1, gap_ms=1, chunk_pattern=(1,))) as fake:
                config = BenchConfig(arrival="closed", concurrency=2, num_requests=4,
                                     lengths=parse_length_mix("16x3"), warmup_requests=1)
                bench = BenchRunner(config, Workload(config), fake.address, show_progress=False,
                                    http_address=base_url.removeprefix("http://"))
                return await bench.run_async()
        finally:
            await runner.cleanup()

    result = asyncio.run(run())
    assert len(bodies) == 5 and all(b["stream"] and b["return_token_ids"] for b in bodies)
    assert [r.num_completion_tokens for r in result.records] == [3, 3, 3, 3]
    assert all(r.is_ok for r in result.records)
