"""Helpers of the cluster integration tests: configs, the transformers reference, async gRPC clients."""

from __future__ import annotations

import asyncio
import random
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import grpc

from cluster.config import ClusterConfig, config_from_dict
from engine.builtin import BUILTIN_MODEL_ID
from protos import pdserve_pb2 as pb
from protos import pdserve_pb2_grpc

BLOCK_SIZE = 16


def cluster_config(
    num_prefill: int = 1, num_decode: int = 1, changes: Mapping[str, Any] | None = None, **top_level: Any
) -> ClusterConfig:
    """A small test cluster: fractional CPUs, one torch thread per replica, a free gRPC port.

    ``changes`` are dotted keys (``{"kv_transfer.backend": "nixl"}``), ``top_level`` plain fields
    (``mode="colocated"``); both go through ``ClusterConfig.override``."""
    pool = {"num_cpus": 0.25, "torch_threads": 1}
    base = config_from_dict(
        {
            # the random built-in model, float32 (reference_greedy's): fast; not the cluster's default
            "engine": {
                "model": BUILTIN_MODEL_ID,
                "dtype": "float32",
                "kv_cache_bytes": 16 * 2**20,  # 256 blocks
                "max_num_batched_tokens": 1024,
            },
            "lease_s": 20.0,
            "prefill": {"num_replicas": num_prefill, **pool},
            "decode": {"num_replicas": num_decode, **pool},
            "grpc": {"port": 0},
            "http": {"port": 0},
        }
    )
    merged = {**(changes or {}), **top_level}
    return base.override(merged) if merged else base


def reliability_config() -> ClusterConfig:
    """The cluster test_int_reliability_admission and test_int_reliability_migration share (one deployment for
    both; the names sort them together): 1 prefill + 2 decode replicas of 128 KV blocks; an admission queue
    of 4 for 2 s; suspects forgotten after 3 s, so the SIGKILL case finds both decode replicas in use again
    after the SIGSTOP case; a 1 s drain for the scale-down case."""
    changes = {
        "engine.kv_cache_bytes": 8 * 2**20,  # 128 blocks of 16 tokens per replica
        "admission.max_queue": 4,
        "admission.max_queue_wait_s": 2.0,
        "migration.suspect_s": 3.0,
        "migration.heartbeat_timeout_s": 1.5,  # a hung replica found within 2 s (the default is 10 s)
        "migration.drain_timeout_s": 1.0,  # the scale-down case: long streams outlive the drain and migrate
    }
    return cluster_config(1, 2, changes)


@cache
def _reference_model():
    from engine.builtin import build_builtin_hf_model

    return build_builtin_hf_model("float32")


@cache
def reference_greedy(prompt: tuple[int, ...], max_new_tokens: int) -> tuple[int, ...]:
    """Greedy decoding with the transformers model of the built-in weights; EOS does not stop it.

    A plain loop over ``model(...)`` with its KV cache rather than ``generate``: ``generate`` merges the
    model's own generation config and stops at EOS even when told ``eos_token_id=None``.
    """
    import torch

    model = _reference_model()
    tokens: list[int] = []
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([list(prompt)]), use_cache=True)
        for _ in range(max_new_tokens):
            token = int(out.logits[0, -1].argmax())
            tokens.append(token)
            out = model(
                input_ids=torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True
            )
    return tuple(tokens)


def make_prompts(num: int, seed: int = 0) -> list[tuple[int, ...]]:
    """``num`` token-id prompts of 5..120 tokens; every third one starts with a shared 48-token preamble."""
    rng = random.Random(seed)
    preamble = [256] + [rng.randrange(32, 127) for _ in range(47)]  # BOS + printable bytes
    prompts = []
    for index in range(num):
        length = rng.randrange(5, 72)
        body = [rng.randrange(0, 256) for _ in range(length)]
        prompts.append(tuple(preamble + body if index % 3 == 0 else [256, *body]))
    return prompts


@dataclass
class StreamResult:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    last: pb.GenerateResponse | None = None
    num_messages: int = 0
    code: grpc.StatusCode = grpc.StatusCode.OK
    details: str = ""


async def run_stream(
    stub: pdserve_pb2_grpc.PDServeStub,
    request: pb.GenerateRequest,
    cancel_after: int | None = None,
    timeout: float = 120.0,
) -> StreamResult:
    """One Generate call; with ``cancel_after``, cancel it after that many messages."""
    result = StreamResult()
    call = stub.Generate(request, timeout=timeout)
    try:
        async for response in call:
            result.num_messages += 1
            result.token_ids.extend(response.token_ids)
            result.text += response.text
            result.last = response
            if cancel_after is not None and result.num_messages >= cancel_after:
                call.cancel()
                result.code = grpc.StatusCode.CANCELLED
                break
    except grpc.aio.AioRpcError as error:
        result.code, result.details = error.code(), error.details() or ""
    return result


async def run_many(
    address: str, requests: list[pb.GenerateRequest], cancel_after: list[int | None] | None = None
) -> list[StreamResult]:
    """All ``requests`` as concurrent streams on one channel."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pdserve_pb2_grpc.PDServeStub(channel)
        cancels = cancel_after or [None] * len(requests)
        return list(
            await asyncio.gather(*(run_stream(stub, r, c) for r, c in zip(requests, cancels, strict=True)))
        )


def cluster_info(address: str) -> pb.ClusterInfoResponse:
    with grpc.insecure_channel(address) as channel:
        return pdserve_pb2_grpc.PDServeStub(channel).ClusterInfo(pb.ClusterInfoRequest(), timeout=30)


def blocks_held(info: pb.ClusterInfoResponse) -> dict[str, int]:
    """Replica id -> KV blocks held by requests (running or pinned; cached prefix blocks excluded)."""
    return {f"{pool.name}/{r.replica_id}": r.kv_blocks_used for pool in info.pools for r in pool.replicas}


def wait_until_no_blocks_held(address: str, within_s: float) -> tuple[float, dict[str, int]]:
    """Poll ClusterInfo until every replica of both pools holds zero request blocks; (seconds, last view)."""
    start = time.perf_counter()
    while True:
        held = blocks_held(cluster_info(address))
        elapsed = time.perf_counter() - start
        if all(count == 0 for count in held.values()) or elapsed > within_s:
            return elapsed, held
        time.sleep(0.05)


def wait_serving(address: str, server: subprocess.Popen, timeout_s: float) -> float:
    """Poll Health on ``address`` until SERVING (seconds it took); fails if ``server`` exits first."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        assert server.poll() is None, f"pdserve serve exited with {server.returncode}"
        try:
            with grpc.insecure_channel(address) as channel:
                health = pdserve_pb2_grpc.PDServeStub(channel).Health(pb.HealthRequest(), timeout=10)
            if health.status == pb.HealthResponse.SERVING:
                return time.monotonic() - start
        except grpc.RpcError:
            pass
        time.sleep(1.0)
    raise AssertionError(f"pdserve serve not SERVING on {address} after {timeout_s}s")
