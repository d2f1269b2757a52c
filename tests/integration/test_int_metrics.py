"""Issue 14, acceptance 3: the ingress's Prometheus scrape on a running cluster (random built-in model).

Requests over gRPC and HTTP (streamed and not; one prompt repeated, so the prefix cache serves part of
it) all pass ``RequestPath``, so all are counted. The scrape parses with prometheus_client's text parser;
the TTFT and E2E histogram counts grow by the requests sent; the token counters by the usage the clients
received, summed; every replica has the Gateway API Inference Extension's gauges, and once the cluster
is idle the KV gauges equal ClusterInfo's numbers. Deltas against a scrape taken first: the cluster may
be the one an earlier module of the session started (same config) and already counted requests.

A real Prometheus (Debian's 2.42 binary, unpacked into .venv by ``make env``) scrapes the ingress's
``/metrics`` every second; its HTTP API then answers for the series with the counts and token sums the
clients saw. Without the binary that test FAILS with the reason (it is part of the acceptance).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import subprocess
import time
import urllib.parse
import urllib.request
from collections import defaultdict
from pathlib import Path

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine.builtin import BUILTIN_MODEL_ID
from protos import pdserve_pb2 as pb
from tests.conftest import free_port
from tests.integration.int_helpers import cluster_config, cluster_info, run_many, wait_until_no_blocks_held

pytestmark = pytest.mark.integration

PROMPT = [256, *range(40, 90)]  # 51 tokens: three full 16-token blocks can be cached
NUM_NEW = 6
NUM_GRPC = 4
NUM_HTTP = 4  # two plain, two streamed

GIE_GAUGES = ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc")
Samples = dict[str, list[tuple[dict[str, str], float]]]


@pytest.fixture(scope="module")
def cluster(pd_cluster):
    return pd_cluster.ensure(cluster_config())


def _scrape(cluster) -> tuple[str, Samples]:
    host, port = cluster.http_address.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.request("GET", "/metrics")
        response = connection.getresponse()
        assert response.status == 200
        content_type, text = response.getheader("content-type"), response.read().decode()
    finally:
        connection.close()
    samples: Samples = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name].append((sample.labels, sample.value))
    return content_type or "", samples


def _total(samples: Samples, name: str, **labels: str) -> float:
    return sum(value for got, value in samples.get(name, []) if labels.items() <= got.items())


def _send(cluster) -> list[tuple[int, int, int]]:
    """NUM_GRPC + NUM_HTTP requests, one at a time; (prompt, cached, completion tokens) each received."""
    usages = []
    for _ in range(NUM_GRPC):
        request = pb.GenerateRequest(max_tokens=NUM_NEW, ignore_eos=True)
        request.token_ids.ids.extend(PROMPT)
        (result,) = asyncio.run(run_many(cluster.grpc_address, [request]))
        usage = result.last.usage
        usages.append((usage.prompt_tokens, usage.cached_tokens, usage.completion_tokens))
    client = openai.OpenAI(base_url=f"http://{cluster.http_address}/v1", api_key="none", max_retries=0)
    common = dict(model=BUILTIN_MODEL_ID, prompt=PROMPT, max_tokens=NUM_NEW, extra_body={"ignore_eos": True})
    for index in range(NUM_HTTP):
        if index % 2 == 0:
            http_usage = client.completions.create(**common).usage
        else:
            stream = client.completions.create(**common, stream=True, stream_options={"include_usage": True})
            http_usage = [chunk.usage for chunk in stream if chunk.usage is not None][-1]
        assert http_usage is not None and http_usage.prompt_tokens_details is not None
        cached = http_usage.prompt_tokens_details.cached_tokens or 0
        usages.append((http_usage.prompt_tokens, cached, http_usage.completion_tokens))
    return usages


def test_scrape_counts_every_request_and_its_usage(cluster) -> None:
    _, before = _scrape(cluster)
    usages = _send(cluster)
    content_type, after = _scrape(cluster)
    assert content_type.startswith("text/plain; version=0.0.4")
    num_sent = NUM_GRPC + NUM_HTTP

    def grew(name: str, **labels: str) -> float:
        return _total(after, name, **labels) - _total(before, name, **labels)

    histograms = ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds",
                  "request_prefill_time_seconds", "request_kv_transfer_time_seconds")
    for histogram in histograms:
        assert grew(f"pdserve:{histogram}_count") == num_sent, histogram
    assert grew("pdserve:inter_token_latency_seconds_count") == num_sent * (NUM_NEW - 1)
    assert grew("pdserve:prompt_tokens_total") == sum(u[0] for u in usages)
    assert grew("pdserve:cached_prompt_tokens_total") == sum(u[1] for u in usages) > 0
    assert grew("pdserve:generation_tokens_total") == sum(u[2] for u in usages) == num_sent * NUM_NEW
    assert grew("pdserve:request_success_total", finished_reason="length") == num_sent
    assert grew("pdserve:router_decisions_total", stage="prefill") == num_sent
    assert grew("pdserve:router_decisions_total", stage="decode") == num_sent
    assert grew("pdserve:kv_transfer_bytes_total") > 0
    assert grew("pdserve_http_requests_total", endpoint="/v1/completions", status="200") == NUM_HTTP


def test_replica_gauges_match_cluster_info_when_idle(cluster) -> None:
    _, held = wait_until_no_blocks_held(cluster.grpc_address, within_s=10.0)
    assert all(count == 0 for count in held.values()), held
    _, samples = _scrape(cluster)
    info = cluster_info(cluster.grpc_address)
    assert {pool.name for pool in info.pools} == {"prefill", "decode"}
    for pool in info.pools:
        assert _total(samples, "pdserve:pool_replicas", pool=pool.name) == len(pool.replicas)
        for replica in pool.replicas:
            labels = {"pool": pool.name, "replica": replica.replica_id}
            for name in GIE_GAUGES:
                assert [value for got, value in samples[name] if got == labels] == [0.0], name
            assert _total(samples, "pdserve:kv_blocks_used", **labels) == replica.kv_blocks_used == 0
            assert _total(samples, "pdserve:kv_blocks_cached", **labels) == replica.kv_blocks_cached
            assert _total(samples, "pdserve:kv_blocks_free", **labels) == replica.kv_blocks_free
            assert _total(samples, "pdserve:kv_blocks_total", **labels) == replica.kv_blocks_total


PROMETHEUS = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "prometheus"


def _prometheus_query(address: str, query: str) -> list[dict]:
    url = f"http://{address}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    with urllib.request.urlopen(url, timeout=10) as response:
        answer = json.load(response)
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


def _prometheus_value(address: str, query: str) -> float | None:
    result = _prometheus_query(address, query)
    return float(result[0]["value"][1]) if result else None


def _poll(address: str, query: str, done, timeout_s: float) -> float | None:
    deadline = time.monotonic() + timeout_s
    while True:
        value = _prometheus_value(address, query)
        if done(value) or time.monotonic() > deadline:
            return value
        time.sleep(0.25)


def _wait_ready(address: str, server: subprocess.Popen, log: Path, timeout_s: float) -> None:
    """Poll Prometheus' /-/ready until it answers 200; fail with its log if it exits or never does."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert server.poll() is None, f"prometheus exited {server.returncode}: {log.read_text()}"
        try:
            with urllib.request.urlopen(f"http://{address}/-/ready", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:  # not listening yet (connection refused) or still starting (503)
            pass
        time.sleep(0.2)
    raise AssertionError(f"prometheus not ready after {timeout_s}s: {log.read_text()}")


def _start_prometheus(tmp_path: Path, target: str) -> tuple[subprocess.Popen, str]:
    if not PROMETHEUS.is_file():
        pytest.fail(
            f"no Prometheus at {PROMETHEUS}: `make env` installs Debian's prometheus package there "
            "(apt-get download prometheus + dpkg -x; apt-get update first when the lists are empty)"
        )
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"scrape_configs:\n  - job_name: pdserve\n    static_configs: [{{targets: ['{target}']}}]\n"
    )
    address = f"127.0.0.1:{free_port()}"
    log = (tmp_path / "prometheus.log").open("w")
    server = subprocess.Popen(
        [str(PROMETHEUS), f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address={address}", "--log.level=warn"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    return server, address


def test_a_real_prometheus_scrapes_the_ingress(cluster, tmp_path: Path) -> None:
    server, address = _start_prometheus(tmp_path, cluster.http_address)
    try:
        _wait_ready(address, server, tmp_path / "prometheus.log", timeout_s=60.0)
        up = _poll(address, 'up{job="pdserve"}', lambda value: value == 1.0, timeout_s=30.0)
        assert up == 1.0, (tmp_path / "prometheus.log").read_text()
        tokens = "sum(pdserve:generation_tokens_total)"
        ttft_count = "sum(pdserve:time_to_first_token_seconds_count)"
        before_tokens = _prometheus_value(address, tokens)
        before_count = _prometheus_value(address, ttft_count)
        requests = []
        for _ in range(2):
            request = pb.GenerateRequest(max_tokens=NUM_NEW, ignore_eos=True)
            request.token_ids.ids.extend(PROMPT)
            requests.append(request)
        results = asyncio.run(run_many(cluster.grpc_address, requests))
        received = sum(result.last.usage.completion_tokens for result in results if result.last is not None)
        assert received == 2 * NUM_NEW
        want_tokens, want_count = (before_tokens or 0.0) + received, (before_count or 0.0) + 2
        assert _poll(address, tokens, lambda value: value == want_tokens, timeout_s=15.0) == want_tokens
        assert _poll(address, ttft_count, lambda value: value == want_count, timeout_s=15.0) == want_count
        gauges = _prometheus_query(address, "vllm:num_requests_waiting")
        assert {series["metric"]["pool"] for series in gauges} == {"prefill", "decode"}
    finally:
        server.terminate()
        server.wait(timeout=10)
