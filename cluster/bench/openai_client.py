"""One benchmark request over the OpenAI HTTP API (``--api openai``), recorded like a gRPC one.

``POST /v1/completions`` with the workload's token-id prompt, greedy, ``ignore_eos``, streamed, with the
usage chunk and ``return_token_ids`` (pdserve's and vLLM's extension), so each SSE chunk is stamped with
the exact number of tokens it carried, as ``cluster.bench.client`` stamps gRPC messages. A raw aiohttp
stream (one ``json.loads`` per chunk) keeps the client's CPU per chunk close to the gRPC client's; the
official ``openai`` client's per-chunk models would cost the shared CPUs more.
"""

from __future__ import annotations

import json
import time
from typing import Any

import aiohttp

from cluster.bench.client import RequestRecord
from cluster.bench.workload import BenchRequest

_FINISH_REASONS = {"length": "FINISH_REASON_LENGTH", "stop": "FINISH_REASON_STOP"}


def completion_body(request: BenchRequest, seed: int, tenant_id: str) -> dict[str, Any]:
    """The completions body of a benchmark request (the same sampling as the gRPC bench)."""
    body: dict[str, Any] = {
        "prompt": list(request.prompt_token_ids),
        "max_tokens": request.max_tokens,
        "temperature": 0,
        "seed": seed,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
        "return_token_ids": True,
    }
    if tenant_id:
        body["user"] = tenant_id
    return body


async def send_openai_request(session: aiohttp.ClientSession, base_url: str, request: BenchRequest,
                              request_id: str, origin: float, *, seed: int = 0, tenant_id: str = "",
                              timeout_s: float = 600.0) -> RequestRecord:
    """Send one request and record its SSE stream; HTTP failures land in the record (never raised)."""
    record = RequestRecord(index=request.index, request_id=request_id,
                           num_prompt_tokens=len(request.prompt_token_ids), max_tokens=request.max_tokens,
                           is_clipped=request.is_clipped, send_s=time.perf_counter() - origin)
    body = completion_body(request, seed, tenant_id)
    try:
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        async with session.post(f"{base_url}/v1/completions", json=body, timeout=timeout) as response:
            if response.status != 200:
                error = (await response.json(content_type=None)).get("error", {})
                record.status, record.error = f"HTTP_{response.status}", str(error.get("message", ""))
            else:
                await _read_stream(response, record, origin)
        record.end_s = record.message_times_s[-1] if record.message_times_s else time.perf_counter() - origin
        if record.is_ok and not record.message_times_s:
            record.status, record.error = "CLIENT_ERROR", "stream ended without a chunk"
    except Exception as error:  # a client-side failure is recorded, not raised
        record.end_s = time.perf_counter() - origin
        record.status, record.error = "CLIENT_ERROR", f"{type(error).__name__}: {error}"
    return record


async def _read_stream(response: aiohttp.ClientResponse, record: RequestRecord, origin: float) -> None:
    async for line in response.content:
        if not line.startswith(b"data: "):
            continue
        now = time.perf_counter() - origin  # stamp first: parsing must not shift the arrival time
        payload = line[6:].strip()
        if payload == b"[DONE]":
            return
        chunk = json.loads(payload)
        if "error" in chunk:
            record.status, record.error = "STREAM_ERROR", str(chunk["error"].get("message", ""))
            return
        if chunk["choices"]:
            choice = chunk["choices"][0]
            record.message_times_s.append(now)
            record.message_num_tokens.append(len(choice.get("token_ids", ())))
            if choice.get("finish_reason"):
                record.finish_reason = _FINISH_REASONS.get(choice["finish_reason"], choice["finish_reason"])
        elif chunk.get("usage"):
            usage = chunk["usage"]
            record.usage = {"prompt_tokens": usage["prompt_tokens"],
                            "cached_tokens": usage["prompt_tokens_details"]["cached_tokens"],
                            "completion_tokens": usage["completion_tokens"]}
