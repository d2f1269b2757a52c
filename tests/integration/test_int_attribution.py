"""Issue 14, acceptance 4 and 5, in a running cluster: cache attribution and the per-tenant KV review.

One cluster: 2 prefill replicas and 1 decode replica of the random tiny model, 24 KV blocks each (so a
burst evicts), the prefix_hash router with watermarks of 200 / 1 queued prefill tokens (absolute only).

- Tenants A1 and A2 warm a prefix each; tenant B sends distinct prompts until ClusterInfo's per-tenant
  review shows none of A1's or A2's cached blocks left on the prefill pool. A1's next request (gRPC) and
  A2's (HTTP, the OpenAI client) report ``cause=evicted`` with every one of their 4 reusable blocks
  evicted by B; the scraped eviction metric (victim A1, causing B) equals the pool's count for A1.
- Tenant W warms a 241-token prefix on its ring owner; then two requests with that prefix arrive at once:
  the router counts the first against the owner (241 > 200: hot until its next report), so the second
  walks the ring to the other replica and reports ``cause=ring_walk``, while the first is a full hit.
- ``pdserve top --json`` (and ``--once``) on the idle cluster shows exactly ClusterInfo's per-tenant rows;
  the rows' cached blocks sum to each pool's replicas' own counts.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import time
from collections import defaultdict

import grpc
import openai
import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from cluster.top import COLUMNS, top
from engine.builtin import BUILTIN_MODEL_ID
from protos import pdserve_pb2 as pb
from tests.integration.int_helpers import cluster_config, cluster_info, run_many, wait_until_no_blocks_held

pytestmark = pytest.mark.integration

BLOCK_SIZE = 16
BLOCK_BYTES = 4 * 2 * BLOCK_SIZE * 4 * 32 * 4  # tiny model: 4 layers, K and V, 4 KV heads x 32, float32
NUM_BLOCKS = 24
HIGH, LOW = 200, 1
REPORT_WAIT_S = 0.6  # > 2 load-report periods: the owner's report after its prefill has arrived
A1, A2, B, W = "tenant-a1", "tenant-a2", "tenant-b", "tenant-w"


@pytest.fixture(scope="module")
def cluster(pd_cluster):
    changes = {
        "engine.kv_cache_bytes": NUM_BLOCKS * BLOCK_BYTES,
        "router.policy": "prefix_hash",  # ring owner / ring walk by watermark (docs/router.md)
        "router.high_watermark_tokens": HIGH,
        "router.low_watermark_tokens": LOW,
        "router.high_load_factor": 0.0,
        "router.low_load_factor": 0.0,
    }
    return pd_cluster.ensure(cluster_config(2, 1, changes))


def _prompt(seed: int, length: int = 80) -> list[int]:
    return [256] + [(seed * 31 + i * 7) % 250 for i in range(length - 1)]


def _request(tenant: str, prompt: list[int]) -> pb.GenerateRequest:
    ids = pb.TokenIds(ids=prompt)
    return pb.GenerateRequest(token_ids=ids, max_tokens=2, ignore_eos=True, tenant_id=tenant)


def _send(address: str, *requests: pb.GenerateRequest) -> list[pb.GenerateResponse]:
    results = asyncio.run(run_many(address, list(requests)))
    for result in results:
        assert result.code == grpc.StatusCode.OK, result.details
    return [result.last for result in results]


def _tenants(address: str, pool_name: str) -> dict[str, pb.TenantKVInfo]:
    pool = next(pool for pool in cluster_info(address).pools if pool.name == pool_name)
    return {tenant.tenant: tenant for tenant in pool.tenants}


def _scrape(http_address: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    host, port = http_address.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.request("GET", "/metrics")
        text = connection.getresponse().read().decode()
    finally:
        connection.close()
    samples: dict[str, list[tuple[dict[str, str], float]]] = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name].append((sample.labels, sample.value))
    return samples


def _burst_until_evicted(address: str, victims: tuple[str, ...]) -> int:
    """B's burst: distinct prompts, one at a time, until no victim has a cached block on the prefill pool."""
    for index in range(60):
        _send(address, _request(B, _prompt(1000 + index)))
        if index % 4 == 3:
            tenants = _tenants(address, "prefill")
            if all(tenants[victim].kv_blocks_cached == 0 for victim in victims if victim in tenants):
                return index + 1
    raise AssertionError(f"60 requests of {B} did not evict {victims}: {_tenants(address, 'prefill')}")


def _check_evicted(cache: pb.CacheAttribution, owner: str, since: float) -> None:
    assert cache.cause == "evicted", cache
    assert cache.cacheable_tokens == 4 * BLOCK_SIZE and cache.cached_tokens == 0, cache
    assert cache.evicted_blocks == 4, cache
    assert [(source.tenant, source.blocks) for source in cache.evicted_by] == [(B, 4)], cache
    assert since <= cache.first_evicted_at <= cache.last_evicted_at <= time.time(), (since, cache)
    assert cache.route_reason == "ring_owner" and cache.replica == owner, cache


def test_an_eviction_by_another_tenant_is_reported_in_the_response_and_metric(cluster) -> None:
    address = cluster.grpc_address
    prompt_a1, prompt_a2 = _prompt(1), _prompt(2)
    first_a1 = _send(address, _request(A1, prompt_a1))[0]
    first_a2 = _send(address, _request(A2, prompt_a2))[0]
    assert first_a1.cache.cause == "never_cached" and first_a1.cache.cacheable_tokens == 64, first_a1.cache
    warm = _send(address, _request(A1, prompt_a1))[0]  # served from the cache: nothing to explain
    assert warm.cache.cause == "" and warm.usage.cached_tokens == warm.cache.cached_tokens == 64, warm.cache
    owner_a1, owner_a2 = first_a1.route.prefill_replica, first_a2.route.prefill_replica
    assert warm.route.prefill_replica == owner_a1

    burst_started = time.time()
    num_burst = _burst_until_evicted(address, (A1, A2))
    # the owner's charges for B's last requests count against it (hot past 200) until a report counts them
    time.sleep(REPORT_WAIT_S)

    after = _send(address, _request(A1, prompt_a1))[0]  # gRPC
    _check_evicted(after.cache, owner_a1, burst_started)
    assert after.usage.cached_tokens == 0
    client = openai.OpenAI(base_url=f"http://{cluster.http_address}/v1", api_key="none", max_retries=0)
    completion = client.completions.create(
        model=BUILTIN_MODEL_ID, prompt=prompt_a2, max_tokens=2, user=A2, extra_body={"ignore_eos": True}
    )
    usage = completion.usage.model_dump()
    assert usage["prompt_tokens_details"]["cached_tokens"] == 0
    http_cache = usage["pdserve_cache"]
    assert http_cache["cause"] == "evicted" and http_cache["evicted_blocks"] == 4, (num_burst, http_cache)
    assert http_cache["evicted_by"] == [{"tenant": B, "blocks": 4}] and http_cache["replica"] == owner_a2

    samples = _scrape(cluster.http_address)
    evicted = sum(
        value
        for labels, value in samples["pdserve:kv_evicted_blocks_total"]
        if labels.get("pool") == "prefill" and labels.get("victim_tenant") == A1
        and labels.get("causing_tenant") == B
    )
    assert evicted >= 4 and evicted == _tenants(address, "prefill")[A1].evicted_blocks, samples
    short = {labels["cause"]: value for labels, value in samples["pdserve:prefix_cache_short_requests_total"]}
    assert short.get("evicted", 0) >= 2, short


def test_a_request_walked_off_its_hot_prefix_owner_reports_the_ring_walk(cluster) -> None:
    address = cluster.grpc_address
    prefix = _prompt(7, 241)  # 15 full blocks reusable; 241 queued tokens make the owner hot (> 200)
    warm = _send(address, _request(W, prefix))[0]
    owner = warm.route.prefill_replica
    # Two at once: the first charges the owner 241 queued tokens (hot until a report counts it: router/load.py
    # ``update``), so the second walks. Up to 3 pairs: if the first is computed and reported before the
    # second is routed (the client's two sends are not simultaneous), both stay
    for attempt in range(3):
        time.sleep(REPORT_WAIT_S)  # the owner's report after the prefill cools it again (0 < LOW)
        suffixes = [5 + 4 * attempt, 6 + 4 * attempt], [7 + 4 * attempt, 8 + 4 * attempt]
        both = _send(address, *(_request(W, [*prefix, *suffix]) for suffix in suffixes))
        walked = [r for r in both if "prefill=ring_walk" in r.route.reason]
        stayed = [r for r in both if "prefill=ring_owner" in r.route.reason]
        if walked:
            break
    assert len(walked) == len(stayed) == 1, [r.route for r in both]
    assert stayed[0].route.prefill_replica == owner and stayed[0].cache.cause == "", stayed[0].cache
    assert stayed[0].cache.cached_tokens == stayed[0].cache.cacheable_tokens == 240
    cache = walked[0].cache
    assert walked[0].route.prefill_replica != owner
    assert cache.cause == "ring_walk" and cache.route_reason == "ring_walk", cache
    assert cache.cacheable_tokens == 240 and cache.cached_tokens < 240 and cache.replica != owner, cache


def test_pdserve_top_shows_cluster_info_per_tenant(cluster) -> None:
    address = cluster.grpc_address
    _, held = wait_until_no_blocks_held(address, within_s=5.0)
    assert all(count == 0 for count in held.values()), held
    result = CliRunner().invoke(top, ["--server", address, "--json"])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    info = cluster_info(address)
    expected = [
        {"pool": pool.name, "tenant": t.tenant, **{field: getattr(t, field) for field, _ in COLUMNS}}
        for pool in info.pools
        for t in pool.tenants
    ]
    assert shown["rows"] == expected and shown["model"] == info.model
    assert {row["tenant"] for row in shown["rows"] if row["pool"] == "prefill"} >= {A1, A2, B}
    for pool in info.pools:  # per-tenant counts against the replicas' own block counters
        replicas, tenants = pool.replicas, pool.tenants
        assert sum(t.kv_blocks_cached for t in tenants) == sum(r.kv_blocks_cached for r in replicas)
        assert sum(t.kv_blocks_used for t in tenants) == sum(r.kv_blocks_used for r in replicas) == 0
        for t in pool.tenants:
            assert t.kv_bytes_cached == t.kv_blocks_cached * BLOCK_BYTES
            assert t.active_requests == t.orphaned_requests == 0
    rendered = CliRunner().invoke(top, ["--server", address, "--once"])
    assert rendered.exit_code == 0 and A1 in rendered.output and B in rendered.output, rendered.output
