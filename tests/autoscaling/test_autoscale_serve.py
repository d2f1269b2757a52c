"""The prefill policy driving a real local Ray Serve deployment: 1 -> 2 replicas on a high custom
metric, and back to 1 when it drops.

The deployment reports ``queued_prefill_tokens`` from ``record_autoscaling_stats`` (the same hook the
pdserve workers use), read from a file the test writes so that every replica reports the same value.
The policy's target comes through ``policy_kwargs`` (10 tokens per replica): with the default target
(8,192) a backlog of 50 tokens would never scale, so a scale-up also proves the kwargs reach the
controller. Serve's delays are at their smallest.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

APP_NAME = "autoscale_check"
DEPLOYMENT_NAME = "Backlog"


@pytest.fixture
def local_serve(ray_session: None) -> Iterator[None]:
    """Serve on the session's one local Ray (tests/conftest.py); this test's app is deleted after it."""
    from ray import serve

    try:
        yield
    finally:
        if APP_NAME in serve.status().applications:
            serve.delete(APP_NAME, _blocking=True)


def _build_app(metric_file: Path):  # -> ray.serve.Application
    from ray import serve

    @serve.deployment(
        name=DEPLOYMENT_NAME,
        ray_actor_options={"num_cpus": 0},
        autoscaling_config={
            "min_replicas": 1,
            "max_replicas": 2,
            "initial_replicas": 1,
            "upscale_delay_s": 0.0,
            "downscale_delay_s": 0.0,
            "metrics_interval_s": 0.1,  # how often replicas push their stats to the controller
            "look_back_period_s": 0.5,
            "policy": {
                "policy_function": "cluster.autoscaling:prefill_policy",
                "policy_kwargs": {"target_queued_prefill_tokens_per_replica": 10},
            },
        },
    )
    class Backlog:
        def __init__(self, path: str) -> None:
            self._path = Path(path)

        def record_autoscaling_stats(self) -> dict[str, float]:
            return {"queued_prefill_tokens": float(self._path.read_text() or 0)}

        def __call__(self) -> str:
            return "ok"

    return Backlog.bind(str(metric_file))


def _num_running_replicas(deployment: str = DEPLOYMENT_NAME) -> int:
    from ray import serve

    status = serve.status().applications[APP_NAME].deployments[deployment]
    return int(status.replica_states.get("RUNNING", 0))


def _wait_for_replicas(expected: int, timeout_s: float, deployment: str = DEPLOYMENT_NAME) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if _num_running_replicas(deployment) == expected:
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"{deployment} did not reach {expected} running replicas in {timeout_s} s "
                         f"(now {_num_running_replicas(deployment)})")


def _wait_for_app_running(timeout_s: float) -> None:
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        app = serve.status().applications.get(APP_NAME)
        if app is not None and app.status == "RUNNING":
            return
        if app is not None and app.status == "DEPLOY_FAILED":
            raise AssertionError(f"{APP_NAME} failed to deploy: {app.message}")
        time.sleep(0.05)
    raise AssertionError(f"{APP_NAME} was not RUNNING after {timeout_s} s")


def test_prefill_policy_scales_a_real_deployment(local_serve: None, tmp_path: Path) -> None:
    from ray import serve

    metric_file = tmp_path / "queued_prefill_tokens"
    metric_file.write_text("0")
    handle = serve.run(_build_app(metric_file), name=APP_NAME, route_prefix=None)
    assert handle.remote().result(timeout_s=30) == "ok"
    assert _num_running_replicas() == 1
    time.sleep(0.5)  # several idle ticks: at the minimum it stays at 1 (no spurious scale-up)
    assert _num_running_replicas() == 1

    metric_file.write_text("50")  # 5 replicas' worth at 10 tokens per replica; max_replicas is 2
    up_s = _wait_for_replicas(2, timeout_s=20.0)

    metric_file.write_text("0")
    down_s = _wait_for_replicas(1, timeout_s=20.0)
    print(f"\nreal Serve: 1->2 replicas in {up_s:.2f} s, 2->1 in {down_s:.2f} s")


def _pool_autoscaling(policy_path: str, kwargs: dict[str, float], initial_replicas: int) -> dict:
    return {
        "min_replicas": 1, "max_replicas": 2, "initial_replicas": initial_replicas,
        "upscale_delay_s": 0.0, "downscale_delay_s": 0.0,
        "metrics_interval_s": 0.1, "look_back_period_s": 0.5,
        "policy": {"policy_function": policy_path, "policy_kwargs": kwargs},
    }


def test_application_policy_holds_decode_while_prefill_is_backlogged(local_serve: None,
                                                                     tmp_path: Path) -> None:
    # A config deploy (the only way Serve 2.60 takes an application-level policy): decode starts at 2
    # replicas with idle KV, prefill is backlogged. The coupled policy keeps decode at 2; once the
    # prefill backlog is gone, decode shrinks to 1.
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    prefill_file, decode_file = tmp_path / "prefill", tmp_path / "decode"
    prefill_file.write_text("50")
    decode_file.write_text("0.0")
    config = ServeDeploySchema.model_validate({
        "proxy_location": "Disabled",
        "applications": [{
            "name": APP_NAME,
            "route_prefix": None,
            "import_path": "tests.autoscaling.fake_pools:build_fake_pools",
            "args": {"prefill_metric_file": str(prefill_file), "decode_metric_file": str(decode_file)},
            "autoscaling_policy": {"policy_function": "cluster.autoscaling:PDApplicationPolicy"},
            "deployments": [
                {"name": "Prefill", "autoscaling_config": _pool_autoscaling(
                    "cluster.autoscaling:prefill_policy",
                    {"target_queued_prefill_tokens_per_replica": 10}, 1)},
                {"name": "Decode", "autoscaling_config": _pool_autoscaling(
                    "cluster.autoscaling:decode_policy", {"target_kv_blocks_used_fraction": 0.5}, 2)},
            ],
        }],
    })
    start = time.monotonic()
    _get_global_client().deploy_apps(config)
    _wait_for_app_running(timeout_s=60.0)
    deployed_s = time.monotonic() - start
    up_s = _wait_for_replicas(2, timeout_s=20.0, deployment="Prefill")
    time.sleep(1.5)  # ~15 policy ticks with every metric reported: decode must still be at 2
    assert _num_running_replicas("Decode") == 2

    prefill_file.write_text("0")
    down_s = _wait_for_replicas(1, timeout_s=20.0, deployment="Decode")
    print(f"\nconfig deploy {deployed_s:.2f} s; prefill 1->2 in {up_s:.2f} s; decode held at 2 for 1.5 s, "
          f"then 2->1 in {down_s:.2f} s after the prefill backlog cleared")
