"""The OpenAI HTTP API on a running cluster (random built-in model: fast, no chat template).

Acceptance 1 (completions part): the official ``openai`` client, sync and async, streaming and not,
greedy text identical to the gRPC path's for the same prompts, usage with cached tokens on a repeated
prompt. Acceptance 3: a client that drops its SSE stream mid-way frees its blocks on both pools within
1 s (ClusterInfo). Acceptance 4: every error case has its status and OpenAI's error shape, then a good
request succeeds. Chat (a model with a template) is tests/integration/test_int_smollm2_chat_http.py.
"""

from __future__ import annotations

import asyncio
import http.client
import json
from typing import Any

import aiohttp
import openai
import pytest

from engine.builtin import BUILTIN_MODEL_ID
from engine.tokenizer import ByteTokenizer
from protos import pdserve_pb2 as pb
from tests.integration.int_helpers import cluster_config, make_prompts, run_many, wait_until_no_blocks_held

pytestmark = pytest.mark.integration

TEXT_PROMPTS = ["hello", "The quick brown fox jumps over the lazy dog.", "pdserve ünïcödé ✓"]
NUM_NEW = 12


@pytest.fixture(scope="module")
def cluster(pd_cluster):
    return pd_cluster.ensure(cluster_config())


def _client(cluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://{cluster.http_address}/v1", api_key="none", max_retries=0)


def _async_client(cluster) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"http://{cluster.http_address}/v1", api_key="none", max_retries=0)


def _grpc_texts(cluster, prompts: list[Any]) -> list[Any]:
    requests = []
    for prompt in prompts:
        request = pb.GenerateRequest(max_tokens=NUM_NEW, ignore_eos=True)
        if isinstance(prompt, str):
            request.text = prompt
        else:
            request.token_ids.ids.extend(prompt)
        requests.append(request)
    return asyncio.run(run_many(cluster.grpc_address, requests))


def test_completions_match_the_grpc_path(cluster) -> None:
    prompts: list[Any] = [*TEXT_PROMPTS, *(list(p) for p in make_prompts(3, seed=3))]
    expected = _grpc_texts(cluster, prompts)
    client = _client(cluster)
    for prompt, grpc_result in zip(prompts, expected, strict=True):
        assert grpc_result.text == ByteTokenizer().decode(grpc_result.token_ids)
        response = client.completions.create(
            model=BUILTIN_MODEL_ID, prompt=prompt, max_tokens=NUM_NEW, temperature=0,
            extra_body={"ignore_eos": True},
        )
        choice = response.choices[0]
        assert choice.text == grpc_result.text
        assert choice.finish_reason == "length"
        usage = response.usage
        assert usage is not None and usage.completion_tokens == NUM_NEW
        assert usage.prompt_tokens == grpc_result.last.usage.prompt_tokens
        assert usage.total_tokens == usage.prompt_tokens + NUM_NEW
        assert usage.prompt_tokens_details is not None and usage.prompt_tokens_details.cached_tokens >= 0

    async def streamed() -> list[tuple[str, str | None, Any]]:
        client = _async_client(cluster)

        async def one(prompt: Any) -> tuple[str, str | None, Any]:
            stream = await client.completions.create(
                model=BUILTIN_MODEL_ID, prompt=prompt, max_tokens=NUM_NEW, stream=True,
                stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
            )
            text, finish, usage = "", None, None
            async for chunk in stream:
                if chunk.choices:
                    text += chunk.choices[0].text
                    finish = chunk.choices[0].finish_reason or finish
                else:
                    usage = chunk.usage
            return text, finish, usage

        try:
            return list(await asyncio.gather(*(one(p) for p in prompts)))
        finally:
            await client.close()

    for (text, finish, usage), grpc_result in zip(asyncio.run(streamed()), expected, strict=True):
        assert (text, finish) == (grpc_result.text, "length")
        assert usage is not None and usage.completion_tokens == NUM_NEW


def test_repeated_prompt_reports_cached_tokens(cluster) -> None:
    prompt = [256] + [(11 * i) % 200 + 32 for i in range(99)]  # 100 tokens: 6 full blocks
    client = _client(cluster)
    usages = []
    for _ in range(2):
        response = client.completions.create(model=BUILTIN_MODEL_ID, prompt=prompt, max_tokens=4)
        usages.append(response.usage)
    grpc_again = _grpc_texts(cluster, [prompt])[0].last.usage
    first, second = usages
    assert first.prompt_tokens == second.prompt_tokens == 100
    assert first.prompt_tokens_details.cached_tokens == 0
    assert second.prompt_tokens_details.cached_tokens == grpc_again.cached_tokens
    cached = second.prompt_tokens_details.cached_tokens
    assert cached >= 80 and cached % 16 == 0


def _raw(cluster, method: str, path: str, body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    host, port = cluster.http_address.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def test_sse_framing(cluster) -> None:
    body = {"prompt": "hello", "max_tokens": 5, "stream": True, "stream_options": {"include_usage": True},
            "ignore_eos": True}
    status, headers, data = _raw(cluster, "POST", "/v1/completions", json.dumps(body).encode())
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = data.decode().split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    chunks = [json.loads(event.removeprefix("data: ")) for event in events[:-2]]
    assert all(event.startswith("data: ") for event in events[:-1])
    choice_chunks = [c for c in chunks if c["choices"]]
    assert [c["choices"][0]["finish_reason"] for c in choice_chunks][-1] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in choice_chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5
    assert {c["id"] for c in chunks} == {chunks[0]["id"]} and chunks[0]["object"] == "text_completion"


def test_health_models_metrics(cluster) -> None:
    status, _, data = _raw(cluster, "GET", "/health")
    assert status == 200 and json.loads(data)["status"] == "ok"
    models = _client(cluster).models.list()
    assert [m.id for m in models.data] == [BUILTIN_MODEL_ID]
    status, headers, data = _raw(cluster, "GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    text = data.decode()
    assert 'pdserve_http_requests_total{endpoint="/health",status="200"} 1.0' in text
    assert "pdserve_http_completion_tokens_total" in text


async def _drop_streams(address: str, num_streams: int, after_events: int) -> list[int]:
    async with aiohttp.ClientSession() as session:

        async def one(index: int) -> int:
            body = {"prompt": [256, *range(40 + index, 80 + index)], "max_tokens": 400, "stream": True,
                    "ignore_eos": True}
            seen = 0
            response = await session.post(f"http://{address}/v1/completions", json=body)
            async for line in response.content:
                if line.startswith(b"data: "):
                    seen += 1
                    if seen >= after_events:
                        break
            response.close()  # drop the connection mid-stream
            return seen

        return list(await asyncio.gather(*(one(i) for i in range(num_streams))))


def test_disconnect_mid_stream_frees_blocks_on_both_pools(cluster) -> None:
    seen = asyncio.run(_drop_streams(cluster.http_address, num_streams=8, after_events=3))
    assert seen == [3] * 8
    elapsed, held = wait_until_no_blocks_held(cluster.grpc_address, within_s=1.0)
    assert all(count == 0 for count in held.values()), f"after disconnect: {held} ({elapsed:.2f}s)"
    response = _client(cluster).completions.create(model=BUILTIN_MODEL_ID, prompt="hello", max_tokens=3)
    assert response.usage.completion_tokens == 3


ERROR_CASES = [
    # (name, body or raw bytes, status, param, words the message must hold)
    ("bad field", {"prompt": "hi", "max_tokens": 4, "temperature": -1}, 400, "temperature", ["temperature"]),
    ("bad top_p", {"prompt": "hi", "max_tokens": 4, "top_p": 1.5}, 400, "top_p", ["top_p"]),
    ("context overflow", {"prompt": "hello", "max_tokens": 99999}, 400, "max_tokens", ["6 tokens", "99999"]),
    ("unknown model", {"model": "gpt-4o", "prompt": "hi"}, 404, "model", ["gpt-4o"]),
    ("malformed JSON", b'{"prompt": "hi", ', 400, None, ["JSON"]),
    ("not an object", b"[1, 2]", 400, None, ["object"]),
    ("n=2", {"prompt": "hi", "max_tokens": 4, "n": 2}, 400, "n", ["n=1"]),
    ("logprobs", {"prompt": "hi", "max_tokens": 4, "logprobs": 2}, 400, "logprobs", ["logprobs"]),
    ("bad stop type", {"prompt": "hi", "max_tokens": 4, "stop": 5}, 400, "stop", ["stop"]),
    ("empty stop", {"prompt": "hi", "max_tokens": 4, "stop": [""]}, 400, "stop", ["stop[0]"]),
    ("missing prompt", {"max_tokens": 4}, 400, "prompt", ["prompt"]),
    ("empty prompt", {"prompt": "", "max_tokens": 4}, 400, "prompt", ["prompt"]),
    ("id outside vocab", {"prompt": [1, 99999], "max_tokens": 4}, 400, "prompt", ["prompt[1]", "99999"]),
    ("two prompts", {"prompt": ["a", "b"], "max_tokens": 4}, 400, "prompt", ["one prompt"]),
    ("max_tokens 0", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens", ["max_tokens"]),
    ("lone surrogate", b'{"prompt": "a\\ud800", "max_tokens": 4}', 400, "prompt", ["Unicode"]),
    ("oversized body", b'{"prompt": "' + b"a" * (9 * 2**20) + b'"}', 413, None, ["bytes"]),
]


@pytest.mark.parametrize(
    ("name", "body", "status", "param", "words"), ERROR_CASES, ids=[case[0] for case in ERROR_CASES]
)
def test_error_cases_then_a_good_request(cluster, name, body, status, param, words) -> None:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    got_status, _, payload = _raw(cluster, "POST", "/v1/completions", data)
    error = json.loads(payload)["error"]
    assert got_status == status, error
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param, error
    for word in words:
        assert word in error["message"], error
    good = _client(cluster).completions.create(model=BUILTIN_MODEL_ID, prompt="hi", max_tokens=2)
    assert good.usage.completion_tokens == 2


def test_chat_without_template_is_400_naming_messages(cluster) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        _client(cluster).chat.completions.create(
            model=BUILTIN_MODEL_ID, messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
    assert caught.value.status_code == 400
    assert caught.value.body["param"] == "messages" and "chat template" in caught.value.body["message"]
