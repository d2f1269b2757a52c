"""A small gRPC client of the pdserve API (what ``pdserve generate`` uses)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc

from protos import pdserve_pb2 as pb
from protos import pdserve_pb2_grpc

FINISH_NAMES = {value: name.removeprefix("FINISH_REASON_").lower() for name, value in pb.FinishReason.items()}


@dataclass
class GenerateResult:
    """A whole streamed answer, collected."""

    request_id: str = ""
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    num_messages: int = 0
    finish_reason: str = ""
    usage: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    route: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "token_ids": self.token_ids,
            "text": self.text,
            "finish_reason": self.finish_reason,
            "usage": self.usage,
            "timings": self.timings,
            "route": self.route,
            "num_messages": self.num_messages,
        }


def stream(
    stub: pdserve_pb2_grpc.PDServeStub, request: pb.GenerateRequest, timeout: float | None = None
) -> Iterator[pb.GenerateResponse]:
    """The response messages of one Generate call."""
    yield from stub.Generate(request, timeout=timeout)


def collect(responses: Iterator[pb.GenerateResponse]) -> GenerateResult:
    """Fold the messages of one stream into a ``GenerateResult``."""
    result = GenerateResult()
    for response in responses:
        result.num_messages += 1
        result.request_id = response.request_id
        result.token_ids.extend(response.token_ids)
        result.text += response.text
        if response.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
            result.finish_reason = FINISH_NAMES[response.finish_reason]
            usage, timings, route = response.usage, response.timings, response.route
            result.usage = {
                "prompt_tokens": usage.prompt_tokens,
                "cached_tokens": usage.cached_tokens,
                "completion_tokens": usage.completion_tokens,
            }
            result.timings = {
                name: getattr(timings, name)
                for name in ("queue_ms", "prefill_ms", "kv_transfer_ms", "ttft_ms", "mean_tpot_ms", "e2e_ms")
            }
            result.route = {
                name: getattr(route, name)
                for name in ("prefill_replica", "decode_replica", "reason", "kv_transport")
            }
    return result


def connect(
    address: str, api_key: str | None = None, tls_ca: str | None = None
) -> tuple[grpc.Channel, pdserve_pb2_grpc.PDServeStub]:
    """A channel to ``host:port`` and a stub on it: TLS verified with the CA file ``tls_ca`` when given
    (else plaintext), every call carrying ``authorization: Bearer <api_key>`` when given."""
    if tls_ca:
        with open(tls_ca, "rb") as file:
            credentials = grpc.ssl_channel_credentials(root_certificates=file.read())
        channel = grpc.secure_channel(address, credentials)
    else:
        channel = grpc.insecure_channel(address)
    if api_key:
        channel = grpc.intercept_channel(channel, _BearerKey(api_key))
    return channel, pdserve_pb2_grpc.PDServeStub(channel)


class _BearerKey(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds the API key to every call's metadata (call credentials would need TLS; a key on plaintext
    127.0.0.1 is a valid setup too)."""

    def __init__(self, api_key: str) -> None:
        self.metadata = (("authorization", f"Bearer {api_key}"),)

    def _with_key(self, details: Any) -> Any:
        return details._replace(metadata=tuple(details.metadata or ()) + self.metadata)

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._with_key(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._with_key(details), request)
