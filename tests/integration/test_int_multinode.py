"""Acceptance 8: beyond one node. A two-node Ray cluster on this machine (a head and a worker node, each
its own raylet from ``ray start ... --block``, ended by PID), custom resources that put the prefill pool
on one node and the decode pool on the other, ``pdserve serve --ray-address`` joining it, and 16
concurrent greedy streams over NIXL token-exact against transformers on the same weights.

The nodes are both 127.0.0.1 here; docs/operations.md ("Several machines") gives the same recipe for
real machines. Each node offers one logical CPU; each pool asks for a quarter of one plus its node's
custom resource, so the test fits a 2-core machine.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from protos import pdserve_pb2 as pb
from tests.conftest import free_port
from tests.integration.int_helpers import make_prompts, reference_greedy, run_many, wait_serving
from tests.integration.ray_nodes import RayNodes

pytestmark = pytest.mark.integration

PDSERVE = str(Path(sys.executable).parent / "pdserve")
APP_NAME = "pdserve-multinode"
CONFIG = """\
app_name: {app_name}
# the random built-in model (fast), named: the cluster's default is SmolLM2
engine: {{model: pdserve-builtin-tiny, dtype: float32, kv_cache_bytes: 16777216,
         max_num_batched_tokens: 1024}}
lease_s: 20
kv_transfer: {{backend: nixl}}
prefill: {{num_replicas: 1, num_cpus: 0.25, torch_threads: 1, resources: {{prefill_node: 0.5}}}}
decode: {{num_replicas: 1, num_cpus: 0.25, torch_threads: 1, resources: {{decode_node: 0.5}}}}
grpc: {{host: 127.0.0.1, port: {port}}}
"""


@pytest.fixture
def two_nodes() -> Iterator[RayNodes]:
    root = Path(tempfile.mkdtemp(prefix="pdmn", dir="/tmp"))  # short: Ray's socket paths live under it
    try:
        with RayNodes(root, [{"prefill_node": 1}, {"decode_node": 1}]) as nodes:
            yield nodes
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _requests() -> tuple[list[pb.GenerateRequest], list[tuple[int, ...]], list[int]]:
    prompts = make_prompts(16, seed=11)
    max_tokens = [8 + (index % 4) * 6 for index in range(16)]
    requests = [
        pb.GenerateRequest(
            request_id=f"mn-{index}", token_ids=pb.TokenIds(ids=prompt), max_tokens=num_new, ignore_eos=True
        )
        for index, (prompt, num_new) in enumerate(zip(prompts, max_tokens, strict=True))
    ]
    return requests, prompts, max_tokens


def _check_placement(placement: dict) -> None:
    """Prefill's replica on the node with ``prefill_node``, decode's on the one with ``decode_node``."""
    node_of = {
        resource: node["node_id"]
        for node in placement["nodes"]
        for resource in ("prefill_node", "decode_node")
        if resource in node["resources"]
    }
    replicas = placement["replicas"]
    assert replicas["PrefillDeployment"] == [node_of["prefill_node"]], placement
    assert replicas["DecodeDeployment"] == [node_of["decode_node"]], placement
    assert node_of["prefill_node"] != node_of["decode_node"]


def test_pools_on_two_nodes_stream_token_exact_over_nixl(two_nodes: RayNodes) -> None:
    started = time.monotonic()  # the nodes are up already (fixture)
    port = free_port()
    address = f"127.0.0.1:{port}"
    config_path = two_nodes.root / "cluster.yaml"
    config_path.write_text(CONFIG.format(app_name=APP_NAME, port=port))
    log = (two_nodes.root / "serve.log").open("w")
    server = subprocess.Popen(
        [PDSERVE, "serve", "--ray-address", two_nodes.address, "--config", str(config_path)],
        stdout=log, stderr=subprocess.STDOUT, env=two_nodes.env, start_new_session=True,
    )  # fmt: skip
    try:
        requests, prompts, max_tokens = _requests()
        expected = [list(reference_greedy(p, n)) for p, n in zip(prompts, max_tokens, strict=True)]
        try:
            wait_serving(address, server, timeout_s=180)
            serving_s = time.monotonic() - started
        except AssertionError as error:
            raise AssertionError(f"{error}\n{(two_nodes.root / 'serve.log').read_text()[-4000:]}") from None
        mark = time.monotonic()
        results = asyncio.run(run_many(address, requests))
        streams_s = time.monotonic() - mark
        for request, tokens, result in zip(requests, expected, results, strict=True):
            assert result.code == grpc.StatusCode.OK, result.details
            assert result.token_ids == tokens, request.request_id
            assert result.last is not None and result.last.route.kv_transport == "nixl", result.last
        mark = time.monotonic()
        _check_placement(two_nodes.query("replicas", APP_NAME))
        placement_s = time.monotonic() - mark

        mark = time.monotonic()
        server.send_signal(signal.SIGINT)  # Ctrl-C: the app is deleted, the Ray cluster stays
        assert server.wait(timeout=60) == 0
        print(
            f"\ntwo nodes: pdserve serving after {serving_s:.1f} s, 16 streams {streams_s:.1f} s, "
            f"placement query {placement_s:.1f} s, shutdown {time.monotonic() - mark:.1f} s; "
            f"test body {time.monotonic() - started:.1f} s"
        )
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)  # our own process group only (start_new_session)
            server.wait(timeout=30)
        log.close()
