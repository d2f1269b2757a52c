"""Shared test fixtures: ONE local Ray per pytest session, started lazily by the tests that need it.

``ray_session`` starts Ray (fractional CPUs, no dashboard, temp dir under /tmp) the first time a test
asks for it and shuts it down at the end of the session. ``pd_cluster`` is the pdserve application on
that Ray; ``pd_cluster.ensure(config)`` deploys a config once and keeps the last ``KEEP_APPS`` deployments
running (each under its own app name), so tests that agree on a config share one deployment even when other
tests run between them: a deployment costs 15-25 s on 2 cores, most of the suite's budget.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import pytest


def free_port() -> int:
    """A TCP port nobody listens on right now (for gRPC servers the tests start)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """A local Ray for the whole session (started on first use, shut down at the end)."""
    import ray

    from cluster.embedded import init_local_ray, start_serve

    started = init_local_ray(num_cpus=4)  # logical CPUs: replicas ask for fractions of them
    start_serve()
    yield
    if started:
        from ray import serve

        serve.shutdown()
        ray.shutdown()


KEEP_APPS = 4  # deployments alive at once (a tiny-model app: 0.6-1.1 logical CPUs, 3-5 replica processes)


def _cheap_when_idle(config: Any) -> bool:
    """Kept alive only when idle replicas cost nothing: NIXL's (UCX) and torch.distributed's transfer agents
    poll, an idle NIXL app took 1.4 of the 2 cores (measured in a CI rehearsal), so such an app is deleted
    as soon as a test asks for another config."""
    return config.kv_transfer.backend == "shm"


class ClusterHandle:
    """The pdserve applications in the session's Ray: one per config, the least recently used deleted
    once more than ``KEEP_APPS`` would run. Each gets its own app name (``<app_name>-<n>``): a test that
    needs the name reads ``cluster.config.app_name``."""

    def __init__(self) -> None:
        self.cluster: Any = None  # the one the last ``ensure`` returned
        self._apps: OrderedDict[str, Any] = OrderedDict()  # config key -> EmbeddedCluster, oldest first
        self.deploys: list[tuple[str, float]] = []  # (test that asked, seconds): printed at the end

    def ensure(self, config: Any) -> Any:
        """A running ``EmbeddedCluster`` for ``config`` (its gRPC port is picked when it is 0)."""
        from cluster.embedded import EmbeddedCluster

        key = json.dumps(config.to_dict(), sort_keys=True, default=str)
        for other in [k for k, app in self._apps.items() if k != key and not _cheap_when_idle(app.config)]:
            self._delete(self._apps.pop(other), blocking=False)
        if key in self._apps:
            self._apps.move_to_end(key)
            self.cluster = self._apps[key]
            return self.cluster
        started = time.perf_counter()
        while len(self._apps) >= KEEP_APPS:
            self._delete(self._apps.popitem(last=False)[1], blocking=False)
        named = config.override({"app_name": f"{config.app_name}-{len(self.deploys)}"})
        self.cluster = self._apps[key] = EmbeddedCluster(named).start()
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
        self.deploys.append((test, time.perf_counter() - started))
        return self.cluster

    @staticmethod
    def _delete(cluster: Any, blocking: bool) -> None:
        """Delete an app; not blocking, Serve tears it down while the next one deploys (another name)."""
        from ray import serve

        serve.delete(cluster.config.app_name, _blocking=blocking)

    def close(self) -> None:
        while self._apps:
            self._delete(self._apps.popitem(last=False)[1], blocking=True)
        self.cluster = None


@pytest.fixture(scope="session")
def pd_cluster(ray_session: None) -> Iterator[ClusterHandle]:
    handle = ClusterHandle()
    yield handle
    handle.close()
    _DEPLOYS.extend(handle.deploys)


_DEPLOYS: list[tuple[str, float]] = []


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """How often the session's cluster was (re)deployed and what it cost: the suite's budget is time."""
    if _DEPLOYS:
        total = sum(seconds for _, seconds in _DEPLOYS)
        terminalreporter.write_sep("-", f"pd_cluster: {len(_DEPLOYS)} deployments, {total:.0f} s")
        for test, seconds in _DEPLOYS:
            terminalreporter.write_line(f"{seconds:6.1f} s  {test}")
