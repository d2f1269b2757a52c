"""The OpenAI app driven as plain ASGI (no server, no Ray): a fake request path behind it.

A client that disconnects, mid-stream or before the first token, must close the path's generator (that
is what frees the blocks on the pools); a path failure before the first token is a real HTTP status."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from cluster.model_info import ModelInfo
from cluster.openai_api.app import OpenAIApp
from cluster.tracing import NULL_TRACER
from cluster.validation import ModelLimits
from engine.tokenizer import ByteTokenizer
from protos import pdserve_pb2 as pb
from worker_common.messages import NoKVSpaceError


@dataclass
class FakePath:
    """Yields ``num_messages`` one-token messages, ``delay_s`` apart; records whether it was closed."""

    num_messages: int = 3
    delay_s: float = 0.0
    first_delay_s: float = 0.0
    error: Exception | None = None
    model: ModelInfo = field(
        default_factory=lambda: ModelInfo(
            "tiny", ByteTokenizer(), ModelLimits(vocab_size=259, max_model_len=512)
        )
    )
    config: Any = field(default_factory=lambda: SimpleNamespace(request_timeout_s=30.0))
    closed: list[bool] = field(default_factory=list)
    tracer: Any = NULL_TRACER  # tracing off, as the default config has it

    async def generate(self, request: Any, parent: Any = None):
        try:
            await asyncio.sleep(self.first_delay_s)
            if self.error is not None:
                raise self.error
            for index in range(self.num_messages):
                response = pb.GenerateResponse(token_ids=[65], text="A")
                if index == self.num_messages - 1:
                    response.finish_reason = pb.FINISH_REASON_LENGTH
                    response.usage.prompt_tokens = len(request.prompt_token_ids)
                    response.usage.completion_tokens = self.num_messages
                yield response
                await asyncio.sleep(self.delay_s)
        finally:
            self.closed.append(True)


async def _ready() -> bool:
    return True


async def _call(
    app: OpenAIApp,
    path: str,
    body: bytes,
    disconnect_after_events: int | None = None,
    disconnect_after_s: float | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One ASGI request; the client disconnects after N SSE events or after a delay."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST" if body else "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 8000),
    }
    gone = asyncio.Event()
    sent_body = False
    status, headers, chunks = 0, {}, []

    async def receive() -> dict[str, Any]:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": body, "more_body": False}
        if disconnect_after_s is not None:
            await asyncio.sleep(disconnect_after_s)
            gone.set()
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
            headers.update({k.decode(): v.decode() for k, v in message["headers"]})
        elif message.get("body"):
            chunks.append(message["body"])
            if (
                disconnect_after_events is not None
                and b"".join(chunks).count(b"\n\n") >= disconnect_after_events
            ):
                gone.set()

    await asyncio.wait_for(app.app(scope, receive, send), timeout=10)
    return status, headers, b"".join(chunks)


def _body(**fields: Any) -> bytes:
    return json.dumps({"prompt": "hi", "max_tokens": 50, **fields}).encode()


def test_a_whole_stream() -> None:
    path = FakePath(num_messages=3)
    status, headers, data = asyncio.run(
        _call(OpenAIApp(path, _ready, 2**20), "/v1/completions", _body(stream=True))
    )
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    assert data.count(b"data: ") == 4 and data.endswith(b"data: [DONE]\n\n")
    assert path.closed == [True]


def test_disconnect_mid_stream_closes_the_path() -> None:
    path = FakePath(num_messages=1000, delay_s=0.01)
    app = OpenAIApp(path, _ready, 2**20)
    status, _, data = asyncio.run(
        _call(app, "/v1/completions", _body(stream=True), disconnect_after_events=3)
    )
    assert status == 200 and 3 <= data.count(b"data: ") < 10
    assert path.closed == [True]
    assert 'endpoint="/v1/completions",status="200"' in app.metrics.render("")[0].decode()


def test_disconnect_before_the_first_token_closes_the_path() -> None:
    for stream in (True, False):
        path = FakePath(first_delay_s=5.0)
        app = OpenAIApp(path, _ready, 2**20)
        status, _, _ = asyncio.run(
            _call(app, "/v1/completions", _body(stream=stream), disconnect_after_s=0.05)
        )
        assert status == 499 and path.closed == [True]


def test_shed_load_before_the_first_token_is_429_with_retry_after() -> None:
    path = FakePath(error=NoKVSpaceError("decode replica r: no room for 9 KV blocks"))
    for stream in (True, False):
        status, headers, data = asyncio.run(
            _call(OpenAIApp(path, _ready, 2**20), "/v1/completions", _body(stream=stream))
        )
        error = json.loads(data)["error"]
        assert (status, headers["retry-after"]) == (429, "1")
        assert error["code"] == "resource_exhausted" and "NoKVSpaceError" in error["message"]


def test_non_streaming_body_and_oversized_body() -> None:
    app = OpenAIApp(FakePath(num_messages=2), _ready, 200)
    status, _, data = asyncio.run(_call(app, "/v1/completions", _body()))
    body = json.loads(data)
    assert status == 200 and body["choices"][0]["text"] == "AA" and body["usage"]["completion_tokens"] == 2
    status, _, data = asyncio.run(_call(app, "/v1/completions", _body(prompt="x" * 300)))
    assert status == 413 and json.loads(data)["error"]["code"] == "request_too_large"


def test_health_follows_readiness() -> None:
    async def not_ready() -> bool:
        return False

    status, _, data = asyncio.run(_call(OpenAIApp(FakePath(), not_ready, 2**20), "/health", b""))
    assert status == 503 and json.loads(data)["error"]["code"] == "not_serving"


def test_health_is_503_when_the_check_fails() -> None:
    async def broken() -> bool:
        raise RuntimeError("controller unreachable")

    status, _, _ = asyncio.run(_call(OpenAIApp(FakePath(), broken, 2**20), "/health", b""))
    assert status == 503
