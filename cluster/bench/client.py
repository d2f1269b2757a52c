"""One benchmark request over the gRPC API, and what the client saw of it.

Each request is one server stream (`PDServe.Generate`). The client stamps the send time and the
arrival time of every message with the number of tokens it carried; everything else (TTFT, TPOT,
ITL, end-to-end) is derived from those stamps in `cluster.bench.metrics`, so results.json holds
the raw observations and any figure can be recomputed from it.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import grpc

from cluster.bench.workload import BenchRequest
from protos import pdserve_pb2, pdserve_pb2_grpc

OK = "OK"


@dataclass
class RequestRecord:
    """Raw client-side observations of one request; times are seconds since the run's start
    (one `time.perf_counter` clock for the whole run)."""

    index: int
    request_id: str
    num_prompt_tokens: int                    # tokens sent
    max_tokens: int
    send_s: float
    is_clipped: bool = False                  # the workload cut its lengths to fit the context
    status: str = OK                          # grpc.StatusCode name, or CLIENT_ERROR
    error: str = ""
    message_times_s: list[float] = field(default_factory=list)
    message_num_tokens: list[int] = field(default_factory=list)
    end_s: float | None = None                # last message received (or the error)
    finish_reason: str = ""
    usage: dict[str, int] = field(default_factory=dict)         # server: prompt/cached/completion tokens
    timings: dict[str, float] = field(default_factory=dict)     # server: queue/prefill/kv_transfer/... ms
    route: dict[str, str] = field(default_factory=dict)

    @property
    def is_ok(self) -> bool:
        """The stream ended with status OK."""
        return self.status == OK

    @property
    def num_completion_tokens(self) -> int:
        """Tokens the client received."""
        return sum(self.message_num_tokens)

    @property
    def first_token_s(self) -> float | None:
        """Arrival of the first message that carried a token."""
        pairs = zip(self.message_times_s, self.message_num_tokens, strict=True)
        return next((t for t, n in pairs if n > 0), None)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (one entry of results.json's `requests`)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RequestRecord:
        """Inverse of `to_dict` (derived keys that results.json adds are ignored)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def build_request(request: BenchRequest, request_id: str, seed: int,
                  tenant_id: str) -> pdserve_pb2.GenerateRequest:
    """The Generate request for a benchmark request: token-id prompt, greedy, EOS ignored so the
    output length is the one the workload asked for."""
    return pdserve_pb2.GenerateRequest(
        token_ids=pdserve_pb2.TokenIds(ids=list(request.prompt_token_ids)),
        max_tokens=request.max_tokens,
        seed=seed,
        tenant_id=tenant_id,
        request_id=request_id,
        ignore_eos=True,
    )


async def send_request(stub: pdserve_pb2_grpc.PDServeStub, request: BenchRequest, request_id: str,
                       origin: float, *, seed: int = 0, tenant_id: str = "",
                       timeout_s: float = 600.0) -> RequestRecord:
    """Send one request and record its stream. Never raises for RPC failures: the status code
    lands in the record (errors are a result of the benchmark, not a crash of it)."""
    message = build_request(request, request_id, seed, tenant_id)
    record = RequestRecord(index=request.index, request_id=request_id,
                           num_prompt_tokens=len(request.prompt_token_ids), max_tokens=request.max_tokens,
                           is_clipped=request.is_clipped, send_s=time.perf_counter() - origin)
    try:
        async for response in stub.Generate(message, timeout=timeout_s):
            # stamp first: the parsing below must not shift the arrival time
            now = time.perf_counter() - origin
            record.message_times_s.append(now)
            record.message_num_tokens.append(len(response.token_ids))
            if response.finish_reason != pdserve_pb2.FINISH_REASON_UNSPECIFIED:
                _read_final(record, response)
        record.end_s = record.message_times_s[-1] if record.message_times_s else time.perf_counter() - origin
        if not record.message_times_s:
            record.status, record.error = "CLIENT_ERROR", "stream ended without a message"
    except grpc.aio.AioRpcError as error:
        record.end_s = time.perf_counter() - origin
        record.status, record.error = error.code().name, error.details() or ""
    except Exception as error:  # a client-side failure is recorded, not raised
        record.end_s = time.perf_counter() - origin
        record.status, record.error = "CLIENT_ERROR", f"{type(error).__name__}: {error}"
    return record


def _read_final(record: RequestRecord, response: pdserve_pb2.GenerateResponse) -> None:
    """Copy the last message's finish reason, usage, server timings and route into the record."""
    record.finish_reason = pdserve_pb2.FinishReason.Name(response.finish_reason)
    usage, timings, route = response.usage, response.timings, response.route
    record.usage = {"prompt_tokens": usage.prompt_tokens, "cached_tokens": usage.cached_tokens,
                    "completion_tokens": usage.completion_tokens}
    record.timings = {"queue_ms": timings.queue_ms, "prefill_ms": timings.prefill_ms,
                      "kv_transfer_ms": timings.kv_transfer_ms, "ttft_ms": timings.ttft_ms,
                      "mean_tpot_ms": timings.mean_tpot_ms, "e2e_ms": timings.e2e_ms}
    record.route = {"prefill_replica": route.prefill_replica, "decode_replica": route.decode_replica,
                    "reason": route.reason, "kv_transport": route.kv_transport}
