"""Chat completions through the OpenAI HTTP API on SmolLM2-135M-Instruct (a model with a chat template).

Acceptance 1 (chat part): the official ``openai`` client, sync and async, streaming and not: greedy
text identical to the gRPC path's ``messages`` request for the same conversation; the stream's first
chunk carries the assistant role, the last choice chunk the finish reason, then a usage chunk; usage with
cached tokens on a repeated conversation. One SmolLM2 cluster for the module, small ``max_tokens``.
"""

from __future__ import annotations

import asyncio

import openai
import pytest

from tests.integration.int_helpers import run_many
from tests.integration.smollm2_helpers import CHAT_PROMPTS, chat_request, smollm2_config

pytestmark = pytest.mark.integration

NUM_NEW = 16


@pytest.fixture(scope="module")
def cluster(pd_cluster):
    return pd_cluster.ensure(smollm2_config({"http.port": 0}))


def _base_url(cluster) -> str:
    return f"http://{cluster.http_address}/v1"


def _grpc(cluster, questions: list[str]) -> list:
    requests = [chat_request([("user", question)], max_tokens=NUM_NEW) for question in questions]
    return asyncio.run(run_many(cluster.grpc_address, requests))


def test_chat_matches_the_grpc_path_sync_and_async(cluster) -> None:
    questions = list(CHAT_PROMPTS[:3])
    expected = _grpc(cluster, questions)
    client = openai.OpenAI(base_url=_base_url(cluster), api_key="none", max_retries=0)
    model = client.models.list().data[0].id
    for question, grpc_result in zip(questions, expected, strict=True):
        response = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": question}], max_tokens=NUM_NEW, temperature=0
        )
        choice = response.choices[0]
        assert choice.message.role == "assistant"
        assert choice.message.content == grpc_result.text, question
        assert response.usage.completion_tokens == grpc_result.last.usage.completion_tokens
        assert response.usage.prompt_tokens == grpc_result.last.usage.prompt_tokens

    async def streamed(question: str) -> tuple[list, str]:
        async with openai.AsyncOpenAI(base_url=_base_url(cluster), api_key="none", max_retries=0) as client:
            stream = await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": question}], max_completion_tokens=NUM_NEW,
                stream=True, stream_options={"include_usage": True},
            )
            chunks = [chunk async for chunk in stream]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        return chunks, text

    async def all_streams() -> list:
        return list(await asyncio.gather(*(streamed(q) for q in questions)))

    for (chunks, text), grpc_result in zip(asyncio.run(all_streams()), expected, strict=True):
        assert text == grpc_result.text
        assert chunks[0].choices[0].delta.role == "assistant"
        choice_chunks = [c for c in chunks if c.choices]
        assert choice_chunks[-1].choices[0].finish_reason in ("stop", "length")
        assert all(c.choices[0].finish_reason is None for c in choice_chunks[:-1])
        usage = chunks[-1].usage
        assert chunks[-1].choices == [] and usage is not None
        assert usage.completion_tokens == grpc_result.last.usage.completion_tokens


def test_repeated_conversation_reports_cached_tokens(cluster) -> None:
    client = openai.OpenAI(base_url=_base_url(cluster), api_key="none", max_retries=0)
    messages = [
        {"role": "system", "content": "You are a terse assistant. " * 6},
        {"role": "user", "content": CHAT_PROMPTS[5]},
    ]
    model = client.models.list().data[0].id
    usages = [
        client.chat.completions.create(model=model, messages=messages, max_tokens=4).usage for _ in range(2)
    ]
    assert usages[0].prompt_tokens == usages[1].prompt_tokens > 32
    cached = usages[1].prompt_tokens_details.cached_tokens
    assert cached == (usages[1].prompt_tokens - 1) // 16 * 16 or cached == usages[1].prompt_tokens // 16 * 16
    assert usages[0].prompt_tokens_details.cached_tokens < cached
