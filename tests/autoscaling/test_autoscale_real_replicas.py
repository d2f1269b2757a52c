"""Autoscaling with the real pools: the pdserve application's PrefillDeployment and DecodeDeployment
(built-in model, local Ray) report their load through ``record_autoscaling_stats``, and the pool
policies of ``cluster.autoscaling`` read it in the Serve controller and scale.

The application is the real one (``cluster.app:build_app``), deployed through a Serve config so the
test can shorten Serve's delays and wrap each pool policy in ``tests.autoscaling.recording_policy``,
which writes down what the policy observed on every tick and returns its decision unchanged. A burst of
long prompts must show up there as the replicas' own numbers (queued prefill tokens, KV blocks in
use, running requests), the prefill policy must decide to scale up, and Serve must act on it.

Then (issue 16, acceptance 4) the same deployment goes through both pools' cycles: the burst of long
prompts scales prefill up while decode holds at one replica; prefill returns to one when it stops; a
burst of long answers (short prompts, 600 new tokens each) fills decode KV past its target and
scales decode up; decode returns to one when it stops. Every request succeeds and no replica holds a
KV block at the end (ClusterInfo). Scale-down here removes replicas with no stream in flight (the
bursts have ended); draining a replica with live streams is cluster.migration's (helper D) test.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from protos import pdserve_pb2 as pb
from tests.autoscaling.recording_policy import record_path
from tests.integration.int_helpers import cluster_config, run_many, wait_until_no_blocks_held

pytestmark = pytest.mark.integration

APP_NAME = "pdserve-autoscale-real"
PREFILL, DECODE = "PrefillDeployment", "DecodeDeployment"
POLICY_KWARGS = {
    PREFILL: {"target_queued_prefill_tokens_per_replica": 256.0},  # a burst of 12 x 600 tokens: ~28 replicas
    # up above 0.2 x 1.2 = 24 % of the 1024 blocks in use: 16 answers of 600 tokens hold ~60 %, while
    # the prompt burst (4 new tokens each, so about one request at a time in decode) holds ~4 %
    DECODE: {"target_kv_blocks_used_fraction": 0.2},
}


def _autoscaling_config(deployment: str) -> dict[str, Any]:
    policy = "prefill_policy" if deployment == PREFILL else "decode_policy"
    return {
        "min_replicas": 1, "max_replicas": 2, "initial_replicas": 1,
        "upscale_delay_s": 0.0, "downscale_delay_s": 0.0,
        "metrics_interval_s": 0.1, "look_back_period_s": 0.5,
        "policy": {"policy_function": f"tests.autoscaling.recording_policy:{policy}",
                   "policy_kwargs": POLICY_KWARGS[deployment]},
    }  # fmt: skip


def _records(deployment: str) -> list[dict[str, Any]]:
    path = record_path(APP_NAME, deployment)
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _num_replicas(deployment: str) -> int:
    """Replicas Serve has for the deployment in any state (a scale-up shows as STARTING first)."""
    from ray import serve

    status = serve.status().applications[APP_NAME].deployments[deployment]
    return sum(status.replica_states.values())


@pytest.fixture
def real_app(ray_session: None) -> Iterator[str]:
    """The pdserve app with autoscaling pools on the session's Ray (1024 KV blocks per replica, so the
    burst fits without preemption); yields its gRPC address."""
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    for deployment in (PREFILL, DECODE):
        record_path(APP_NAME, deployment).unlink(missing_ok=True)
    config = cluster_config(
        1, 1,
        {"app_name": APP_NAME, "engine.kv_cache_bytes": 64 * 2**20,
         "prefill.min_replicas": 1, "prefill.max_replicas": 2,
         "decode.min_replicas": 1, "decode.max_replicas": 2},
    )  # fmt: skip
    schema = ServeDeploySchema.model_validate({
        "proxy_location": "Disabled",
        "applications": [{
            "name": APP_NAME,
            "route_prefix": None,
            "import_path": "cluster.app:build_app",
            "args": config.to_dict(),
            "deployments": [{"name": name, "autoscaling_config": _autoscaling_config(name)}
                            for name in (PREFILL, DECODE)],
        }],
    })  # fmt: skip
    try:
        _get_global_client().deploy_apps(schema)
        deadline = time.monotonic() + 120
        while (app := serve.status().applications.get(APP_NAME)) is None or app.status != "RUNNING":
            assert app is None or app.status != "DEPLOY_FAILED", app.message
            assert time.monotonic() < deadline, f"{APP_NAME} not RUNNING after 120 s"
            time.sleep(0.2)
        yield serve.get_app_handle(APP_NAME).grpc_address.remote().result(timeout_s=60)
    finally:
        if APP_NAME in serve.status().applications:
            serve.delete(APP_NAME, _blocking=True)
        for deployment in (PREFILL, DECODE):
            record_path(APP_NAME, deployment).unlink(missing_ok=True)


def _burst() -> list[pb.GenerateRequest]:
    """12 distinct 600-token prompts with 40 new tokens each: thousands of queued prefill tokens."""
    return [
        pb.GenerateRequest(
            token_ids=pb.TokenIds(ids=[256] + [(index * 37 + i) % 256 for i in range(599)]),
            max_tokens=4, ignore_eos=True,
        )
        for index in range(12)
    ]  # fmt: skip


def _long_answers() -> list[pb.GenerateRequest]:
    """16 short prompts with 600 new tokens each: decode KV and running requests, little prefill."""
    return [
        pb.GenerateRequest(token_ids=pb.TokenIds(ids=[256] + [(index * 11 + i) % 256 for i in range(15)]),
                           max_tokens=600, ignore_eos=True)
        for index in range(16)
    ]  # fmt: skip


def _wait_replicas(deployment: str, count: int, within_s: float) -> float:
    """Poll until Serve has exactly ``count`` replicas of ``deployment`` (any state); seconds it took."""
    start = time.monotonic()
    while _num_replicas(deployment) != count:
        assert time.monotonic() - start < within_s, (
            f"{deployment}: {_num_replicas(deployment)} replicas, not {count}"
        )
        time.sleep(0.1)
    return time.monotonic() - start


def test_real_replicas_report_and_the_policies_scale(real_app: str) -> None:
    idle = _records(PREFILL)
    assert idle and idle[-1]["num_replicas"] == 1, idle[-3:]  # ticks before any load: stays at min

    results = asyncio.run(run_many(real_app, _burst()))
    assert all(r.code == grpc.StatusCode.OK for r in results), [r.details for r in results]

    prefill, decode = _records(PREFILL), _records(DECODE)
    queued = [max(r["metrics"].get("queued_prefill_tokens", [0.0])) for r in prefill]
    assert max(queued) > 256, f"the prefill replica never reported its backlog: max {max(queued)}"
    running = [max(r["metrics"].get("running_requests", [0.0])) for r in prefill + decode]
    assert max(running) >= 1
    kv_used = [max(r["metrics"].get("kv_blocks_used_fraction", [0.0])) for r in decode]
    assert max(kv_used) > 0, "the decode replica never reported KV blocks in use"
    ups = [r for r in prefill if r["decision"] and r["decision"]["reason"] == "up"]
    assert ups and ups[0]["num_replicas"] == 2, prefill[-5:]  # ceil(load) clamped to max_replicas

    deadline = time.monotonic() + 30
    while _num_replicas(PREFILL) < 2:  # Serve acts on the decision (the replica may still be starting)
        assert time.monotonic() < deadline, "Serve never started a second prefill replica"
        time.sleep(0.1)
    print(
        f"\nreal replicas: {len(prefill)} prefill / {len(decode)} decode policy ticks; max queued prefill "
        f"tokens {max(queued):.0f}, max decode KV used {max(kv_used):.2f}; first 'up' decision: {ups[0]}"
    )
    assert all(r["num_replicas"] == 1 for r in decode), "decode scaled during the prompt burst"
    _both_pools_cycle(real_app)


def _both_pools_cycle(address: str) -> None:
    """Prefill back to 1; long answers scale decode to 2 running replicas; decode back to 1; no leaks."""
    prefill_down_s = _wait_replicas(PREFILL, 1, 30)
    first_tick = len(_records(DECODE))
    start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        burst = pool.submit(asyncio.run, run_many(address, _long_answers()))
        max_decode = 1
        while not burst.done() or time.monotonic() - start < 2:  # Serve acts while the streams run
            max_decode = max(max_decode, _num_replicas(DECODE))
            time.sleep(0.1)
        results = burst.result()
    burst_s = time.monotonic() - start
    assert all(r.code == grpc.StatusCode.OK for r in results), [r.details for r in results]
    assert all(len(r.token_ids) == 600 for r in results)
    ticks = _records(DECODE)[first_tick:]
    kv_used = max(max(r["metrics"].get("kv_blocks_used_fraction", [0.0])) for r in ticks)
    ups = [r for r in ticks if r["decision"] and r["decision"]["reason"] == "up"]
    assert ups and ups[0]["num_replicas"] == 2, f"decode never decided up; max KV used {kv_used:.2f}"
    assert max_decode == 2, "Serve never started a second decode replica during the burst"
    ran_two = max(r["num_running_replicas"] for r in _records(DECODE)[first_tick:]) >= 2
    decode_down_s = _wait_replicas(DECODE, 1, 30)
    assert _num_replicas(PREFILL) == 1
    leak_s, held = wait_until_no_blocks_held(address, 10)
    assert all(count == 0 for count in held.values()), f"KV blocks still held: {held}"
    print(
        f"prefill 2->1 {prefill_down_s:.1f} s after the prompt burst; long answers ({burst_s:.1f} s): decode "
        f"'up' at KV {kv_used:.2f}, 2 replicas ({'running' if ran_two else 'starting'} before the burst "
        f"ended), back to 1 {decode_down_s:.1f} s after; "
        f"0 blocks held ({leak_s:.2f} s)"
    )
