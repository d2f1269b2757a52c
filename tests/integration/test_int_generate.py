"""Acceptance 1 and 2 of the cluster: token-exact streams through the gRPC API, and no leaked KV blocks.

16 concurrent streams (token-id and text prompts of 5..120 tokens, a third of them sharing a 48-token
preamble) against transformers greedy decoding on the same weights, with 1+1 and 2+2 replicas; then
finished and cancelled streams must leave zero request-held blocks in both pools within one second.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from engine.tokenizer import ByteTokenizer
from protos import pdserve_pb2 as pb
from tests.integration.int_helpers import (
    cluster_config,
    make_prompts,
    reference_greedy,
    run_many,
    wait_until_no_blocks_held,
)

pytestmark = pytest.mark.integration

TEXT_PROMPTS = [
    "hello",
    "The quick brown fox jumps over the lazy dog. " * 2,
    "pdserve ünïcödé ✓",
    "a b c d e f g h",
]


def _requests() -> tuple[list[pb.GenerateRequest], list[tuple[int, ...]], list[int]]:
    """16 requests (4 text, 12 token ids), their prompt ids as the server tokenizes them, and max_tokens."""
    token_prompts = make_prompts(12)
    tokenizer = ByteTokenizer()
    requests, prompts, max_tokens = [], [], []
    for index in range(16):
        num_new = 6 + (index % 4) * 5
        if index < len(TEXT_PROMPTS):
            text = TEXT_PROMPTS[index]
            request = pb.GenerateRequest(text=text, max_tokens=num_new, ignore_eos=True)
            prompt = tuple(tokenizer.encode(text))
        else:
            prompt = token_prompts[index - len(TEXT_PROMPTS)]
            request = pb.GenerateRequest(
                token_ids=pb.TokenIds(ids=prompt), max_tokens=num_new, ignore_eos=True
            )
        request.request_id = f"req-{index}"
        requests.append(request)
        prompts.append(prompt)
        max_tokens.append(num_new)
    return requests, prompts, max_tokens


@pytest.mark.parametrize(("num_prefill", "num_decode"), [(1, 1), (2, 2)])
def test_16_streams_match_transformers(pd_cluster, num_prefill: int, num_decode: int) -> None:
    cluster = pd_cluster.ensure(cluster_config(num_prefill, num_decode))
    requests, prompts, max_tokens = _requests()
    results = asyncio.run(run_many(cluster.grpc_address, requests))
    prefill_replicas = set()
    for request, prompt, num_new, result in zip(requests, prompts, max_tokens, results, strict=True):
        assert result.code == grpc.StatusCode.OK, result.details
        assert result.token_ids == list(reference_greedy(prompt, num_new)), request.request_id
        last = result.last
        assert last is not None and last.request_id == request.request_id
        assert last.finish_reason == pb.FINISH_REASON_LENGTH
        assert last.usage.prompt_tokens == len(prompt)
        assert last.usage.completion_tokens == num_new
        assert 0 <= last.usage.cached_tokens <= len(prompt) - 1
        assert last.route.kv_transport == "shm", last.route  # pulled, not recomputed
        assert last.timings.ttft_ms > 0 and last.timings.e2e_ms >= last.timings.ttft_ms
        assert result.text == ByteTokenizer().decode(result.token_ids)
        prefill_replicas.add(last.route.prefill_replica)
    # The same prompt again: its full blocks are in the prefix cache of the replica the router picks.
    again = asyncio.run(run_many(cluster.grpc_address, [requests[4]]))[0]
    assert again.token_ids == results[4].token_ids
    assert again.last is not None and again.last.usage.cached_tokens > 0
    assert again.last.usage.cached_tokens % 16 == 0
    assert len(prefill_replicas) <= num_prefill


def test_no_blocks_held_after_finish_and_cancel(pd_cluster) -> None:
    cluster = pd_cluster.ensure(cluster_config(2, 2))
    requests, _, _ = _requests()
    results = asyncio.run(run_many(cluster.grpc_address, requests))
    assert all(r.code == grpc.StatusCode.OK for r in results)
    elapsed, held = wait_until_no_blocks_held(cluster.grpc_address, within_s=1.0)
    assert all(count == 0 for count in held.values()), f"after finish: {held} ({elapsed:.2f}s)"

    # 8 long streams, cancelled by the client after their third message.
    long_requests = [
        pb.GenerateRequest(token_ids=pb.TokenIds(ids=p), max_tokens=400, ignore_eos=True)
        for p in make_prompts(8, seed=7)
    ]
    cancelled = asyncio.run(run_many(cluster.grpc_address, long_requests, cancel_after=[3] * 8))
    assert all(r.code == grpc.StatusCode.CANCELLED and r.num_messages == 3 for r in cancelled)
    elapsed, held = wait_until_no_blocks_held(cluster.grpc_address, within_s=1.0)
    assert all(count == 0 for count in held.values()), f"after cancel: {held} ({elapsed:.2f}s)"

    # And the cluster serves the next request normally.
    after = asyncio.run(run_many(cluster.grpc_address, [requests[0]]))[0]
    assert after.code == grpc.StatusCode.OK and after.token_ids == results[0].token_ids


def test_shared_prefix_lands_on_one_prefill_replica(pd_cluster) -> None:
    """Router in the running cluster: prompts sharing their first 4 blocks (the prefix key's depth) go
    to the same prefill replica, and the later ones are served from its prefix cache."""
    cluster = pd_cluster.ensure(cluster_config(2, 2))
    shared = [256] + [(7 * i) % 200 + 32 for i in range(79)]  # 80 tokens: 5 full blocks
    requests = [
        pb.GenerateRequest(
            token_ids=pb.TokenIds(ids=[*shared, 40 + i, 41 + i]), max_tokens=4, ignore_eos=True
        )
        for i in range(6)
    ]
    first = asyncio.run(run_many(cluster.grpc_address, requests[:1]))[0]
    rest = asyncio.run(run_many(cluster.grpc_address, requests[1:]))
    assert first.last is not None
    owner = first.last.route.prefill_replica
    for result in rest:
        assert result.code == grpc.StatusCode.OK and result.last is not None
        assert result.last.route.prefill_replica == owner, result.last.route
        # prefix_cache: the default cache_aware router found the prefix in the owner's summary
        assert any(f"prefill={r}" in result.last.route.reason for r in ("ring_owner", "prefix_cache"))
        assert result.last.usage.cached_tokens >= 64


def test_timed_out_pull_is_recomputed_with_the_same_tokens(pd_cluster) -> None:
    """Fault: every KV pull times out (1 us). The decode replica recomputes the prompt: same tokens as
    transformers, route says "recompute", and no block stays held on either pool."""
    config = cluster_config(1, 1)
    cluster = pd_cluster.ensure(config.override({"kv_transfer.timeout_s": 1e-6}))
    requests, prompts, max_tokens = _requests()
    results = asyncio.run(run_many(cluster.grpc_address, requests[:8]))
    for prompt, num_new, result in zip(prompts, max_tokens, results, strict=False):
        assert result.code == grpc.StatusCode.OK, result.details
        assert result.token_ids == list(reference_greedy(prompt, num_new))
        assert result.last is not None and result.last.route.kv_transport == "recompute"
        assert result.last.usage.completion_tokens == num_new
    _, held = wait_until_no_blocks_held(cluster.grpc_address, within_s=1.0)
    assert all(count == 0 for count in held.values()), held


def test_colocated_mode_matches_transformers(pd_cluster) -> None:
    """mode: colocated (the bench's baseline): each decode replica prefills its own requests, no transfer."""
    cluster = pd_cluster.ensure(cluster_config(1, 1, mode="colocated"))
    requests, prompts, max_tokens = _requests()
    results = asyncio.run(run_many(cluster.grpc_address, requests[:8]))
    for prompt, num_new, result in zip(prompts, max_tokens, results[:8], strict=False):
        assert result.code == grpc.StatusCode.OK, result.details
        assert result.token_ids == list(reference_greedy(prompt, num_new))
        assert result.last is not None and result.last.usage.completion_tokens == num_new
        assert result.last.route.kv_transport == "" and result.last.route.decode_replica
    again = asyncio.run(run_many(cluster.grpc_address, [requests[4]]))[0]
    assert again.last is not None and again.last.usage.cached_tokens > 0
    _, held = wait_until_no_blocks_held(cluster.grpc_address, within_s=1.0)
    assert all(count == 0 for count in held.values()), held
