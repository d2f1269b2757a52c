"""The whole cluster with each KV transport selected (shm is covered by test_int_generate.py): 16
concurrent streams token-exact against transformers, the KV moved by the named backend (not recomputed),
and no block held on either pool afterwards."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from protos import pdserve_pb2 as pb
from tests.integration.int_helpers import (
    cluster_config,
    make_prompts,
    reference_greedy,
    run_many,
    wait_until_no_blocks_held,
)

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("backend", ["nixl", "torch_dist"])
def test_streams_match_transformers_over_backend(pd_cluster, backend: str) -> None:
    config = cluster_config(1, 1, {"kv_transfer.backend": backend})
    cluster = pd_cluster.ensure(config)
    prompts = make_prompts(16, seed=3)
    requests = [
        pb.GenerateRequest(token_ids=pb.TokenIds(ids=p), max_tokens=12, ignore_eos=True) for p in prompts
    ]
    results = asyncio.run(run_many(cluster.grpc_address, requests))
    for prompt, result in zip(prompts, results, strict=True):
        assert result.code == grpc.StatusCode.OK, result.details
        assert result.token_ids == list(reference_greedy(prompt, 12))
        assert result.last is not None and result.last.route.kv_transport == backend, result.last.route
    _, held = wait_until_no_blocks_held(cluster.grpc_address, within_s=1.0)
    assert all(count == 0 for count in held.values()), held
