"""Response bodies of the OpenAI API from the request path's ``GenerateResponse`` messages, and SSE.

Streaming: every message from the path becomes one SSE event at once (``data: {json}\\n\\n``): for chat a
first chunk carries the assistant role, the chunk with the last text carries ``finish_reason``, an optional
usage chunk has empty ``choices``, then ``data: [DONE]``. ``usage`` always has ``prompt_tokens_details.
cached_tokens`` (prompt tokens served from the prefix cache) and, as pdserve's extension, ``pdserve_cache``
(the request's cache attribution: ``cluster.attribution.cache_usage_extension``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from cluster.attribution import cache_usage_extension
from protos import pdserve_pb2 as pb

DONE_EVENT = b"data: [DONE]\n\n"

# pdserve's finish reasons -> OpenAI's: EOS is a stop, a full context is a length limit.
FINISH_REASONS = {
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_EOS: "stop",
    pb.FINISH_REASON_CONTEXT: "length",
}


def sse_event(payload: dict[str, Any]) -> bytes:
    """One server-sent event carrying ``payload`` as compact JSON."""
    return b"data: " + json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


def usage_of(response: pb.GenerateResponse) -> dict[str, Any]:
    """OpenAI ``usage`` from the last message's usage."""
    usage = response.usage
    body = {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }
    if response.HasField("cache"):  # pdserve's extension: why fewer tokens were cached (observability.md)
        body["pdserve_cache"] = cache_usage_extension(response.cache)
    return body


def finish_reason_of(response: pb.GenerateResponse) -> str | None:
    """OpenAI's name for the message's finish reason; None while the request runs."""
    return FINISH_REASONS.get(response.finish_reason)


@dataclass
class ResponseBuilder:
    """Builds the bodies of one request: ``is_chat`` picks chat completion shapes over completion ones."""

    request_id: str
    model: str
    is_chat: bool
    include_usage: bool = False  # streaming: send a usage chunk before [DONE]
    return_token_ids: bool = False  # extension (as vLLM's): each choice also carries its token ids
    created: int = field(default_factory=lambda: int(time.time()))

    def _envelope(self, object_name: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.request_id,
            "object": object_name,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def full(self, text: str, last: pb.GenerateResponse, token_ids: Sequence[int] = ()) -> dict[str, Any]:
        """The non-streaming body: all text (and token ids when asked), the finish reason, usage."""
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish_reason_of(last)}
        if self.return_token_ids:
            choice["token_ids"] = list(token_ids)
        if self.is_chat:
            choice["message"] = {"role": "assistant", "content": text}
            body = self._envelope("chat.completion", [choice])
        else:
            choice["text"] = text
            body = self._envelope("text_completion", [choice])
        body["usage"] = usage_of(last)
        return body

    def _chunk(
        self,
        delta_text: str | None,
        finish_reason: str | None,
        role: bool = False,
        token_ids: Sequence[int] = (),
    ) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish_reason}
        if self.return_token_ids and not role:
            choice["token_ids"] = list(token_ids)
        if self.is_chat:
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if delta_text is not None:
                delta["content"] = delta_text
            choice["delta"] = delta
            chunk = self._envelope("chat.completion.chunk", [choice])
        else:
            choice["text"] = delta_text or ""
            chunk = self._envelope("text_completion", [choice])
        if self.include_usage:
            chunk["usage"] = None  # OpenAI: null on every chunk but the usage chunk
        return chunk

    def first_events(self) -> list[bytes]:
        """Events before any text: the assistant role for chat, nothing for completions."""
        return [sse_event(self._chunk("", None, role=True))] if self.is_chat else []

    def events(self, response: pb.GenerateResponse) -> list[bytes]:
        """The events of one message from the path: its text chunk (skipped when it has no text, is not
        the last and no token ids were asked for), then, on the last message, the usage chunk and
        ``[DONE]``."""
        finish_reason = finish_reason_of(response)
        events = []
        if response.text or finish_reason is not None or (self.return_token_ids and response.token_ids):
            chunk = self._chunk(response.text, finish_reason, token_ids=response.token_ids)
            events.append(sse_event(chunk))
        if finish_reason is not None:
            if self.include_usage:
                chunk = self._envelope(
                    "chat.completion.chunk" if self.is_chat else "text_completion", []
                )
                chunk["usage"] = usage_of(response)
                events.append(sse_event(chunk))
            events.append(DONE_EVENT)
        return events
