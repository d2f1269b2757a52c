"""Which HTTP stack streams SSE best: Starlette on uvicorn (uvloop, httptools) or aiohttp (uvloop).

``python -m cluster.bench.http_stack``: for each stack a server process streams ``--chunks`` small SSE
chunks (an OpenAI completion chunk each, one event-loop turn between chunks, as tokens arrive) per
request; a client process (aiohttp) opens 1, 16 and 32 concurrent streams on loopback. Printed per
stack and concurrency: time to first byte (p50/p99), chunks/s, and the server's CPU per chunk (its
``getrusage`` before and after, read through a ``/cpu`` route). docs/benchmarks.md holds the figures.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator

import click

CHUNK = (
    "data: "
    + json.dumps(
        {
            "id": "cmpl-x",
            "object": "text_completion",
            "created": 0,
            "model": "m",
            "choices": [{"index": 0, "text": " tok", "finish_reason": None}],
        }
    )
    + "\n\n"
).encode()


async def _chunks(num_chunks: int) -> AsyncIterator[bytes]:
    for _ in range(num_chunks):
        yield CHUNK
        await asyncio.sleep(0)  # a token arrives from elsewhere: one loop turn per chunk
    yield b"data: [DONE]\n\n"


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _serve_starlette(port: int, num_chunks: int) -> None:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse, StreamingResponse
    from starlette.routing import Route

    async def stream(request: Request) -> StreamingResponse:
        await request.body()
        return StreamingResponse(_chunks(num_chunks), media_type="text/event-stream")

    async def cpu(request: Request) -> PlainTextResponse:
        return PlainTextResponse(str(_cpu_s()))

    app = Starlette(routes=[Route("/s", stream, methods=["POST"]), Route("/cpu", cpu)])
    uvicorn.run(app, host="127.0.0.1", port=port, loop="uvloop", http="httptools", log_level="warning",
                access_log=False)


def _serve_aiohttp(port: int, num_chunks: int) -> None:
    import uvloop
    from aiohttp import web

    async def stream(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        async for chunk in _chunks(num_chunks):
            await response.write(chunk)
        await response.write_eof()
        return response

    async def cpu(request: web.Request) -> web.Response:
        return web.Response(text=str(_cpu_s()))

    app = web.Application()
    app.router.add_post("/s", stream)
    app.router.add_get("/cpu", cpu)
    uvloop.install()
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None, handler_cancellation=True)


SERVERS = {"starlette-uvicorn": _serve_starlette, "aiohttp": _serve_aiohttp}


async def _measure(port: int, concurrency: int, rounds: int) -> dict[str, float]:
    import aiohttp

    async with aiohttp.ClientSession() as session:

        async def one() -> tuple[float, int]:
            start, first, count = time.perf_counter(), 0.0, 0
            async with session.post(f"http://127.0.0.1:{port}/s", data=b"{}") as response:
                async for line in response.content:
                    if line.startswith(b"data:"):
                        first = first or time.perf_counter() - start
                        count += 1
            return first, count

        async def server_cpu() -> float:
            async with session.get(f"http://127.0.0.1:{port}/cpu") as response:
                return float(await response.text())

        await one()  # warm up
        cpu_before, start = await server_cpu(), time.perf_counter()
        results = []
        for _ in range(rounds):
            results += await asyncio.gather(*(one() for _ in range(concurrency)))
        wall, cpu_after = time.perf_counter() - start, await server_cpu()
    ttfbs = sorted(first for first, _ in results)
    num_chunks = sum(count for _, count in results)
    return {
        "streams": concurrency,
        "ttfb_p50_ms": round(statistics.median(ttfbs) * 1e3, 2),
        "ttfb_p99_ms": round(ttfbs[int(0.99 * (len(ttfbs) - 1))] * 1e3, 2),
        "chunks_per_s": round(num_chunks / wall),
        "server_cpu_us_per_chunk": round((cpu_after - cpu_before) / num_chunks * 1e6, 1),
    }


def _order(stacks: tuple[str, ...], repeats: int) -> list[str]:
    """Each stack once per repeat, the order reversed every other repeat (A B, B A, A B, ...), so a load
    change on the machine, or whoever runs second, does not favour one stack."""
    return [stack for index in range(repeats) for stack in (stacks if index % 2 == 0 else stacks[::-1])]


def _run_stack(stack: str, port: int, num_chunks: int, levels: tuple[int, ...], repeat: int) -> None:
    import uvloop

    command = [sys.executable, "-m", "cluster.bench.http_stack", "--serve", stack, "--port", str(port),
               "--chunks", str(num_chunks)]
    server = subprocess.Popen(command)
    try:
        time.sleep(3.0)
        for concurrency in levels:
            result = uvloop.run(_measure(port, concurrency, rounds=20 if concurrency == 1 else 3))
            load = round(os.getloadavg()[0], 2)
            click.echo(json.dumps({"stack": stack, "repeat": repeat, **result, "load_average_1m": load}))
    finally:
        server.terminate()
        server.wait()


@click.command()
@click.option("--chunks", "num_chunks", default=256, show_default=True, help="SSE chunks per stream.")
@click.option("--port", default=18101, show_default=True)
@click.option("--stack", "stacks", type=click.Choice(sorted(SERVERS)), multiple=True,
              help="Stacks to measure, in this order (repeatable) [default: both, Starlette first].")
@click.option("--streams", default="1,16,32", show_default=True, help="Comma-separated concurrency levels.")
@click.option("--repeats", default=1, help="Rounds over the stacks (order reversed each round).")
@click.option("--serve", "serve_stack", type=click.Choice(sorted(SERVERS)), default=None, hidden=True)
def main(
    num_chunks: int, port: int, stacks: tuple[str, ...], streams: str, repeats: int, serve_stack: str | None
) -> None:
    """Measure SSE streaming on both stacks (see the module docstring)."""
    if serve_stack is not None:
        SERVERS[serve_stack](port, num_chunks)
        return
    levels = tuple(int(part) for part in streams.split(","))
    for index, stack in enumerate(_order(stacks or tuple(SERVERS), repeats)):
        _run_stack(stack, port, num_chunks, levels, repeat=index // len(stacks or SERVERS))


if __name__ == "__main__":
    main()
