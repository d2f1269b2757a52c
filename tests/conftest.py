"""Shared test fixtures: ONE local Ray per pytest session, started lazily by the tests that need it.

``ray_session`` starts Ray (fractional CPUs, no dashboard, temp dir under /tmp) the first time a test
asks for it and shuts it down at the end of the session. ``pd_cluster`` is the pdserve application on
that Ray; ``pd_cluster.ensure(config)`` redeploys only when the config differs from the running one, so
tests that agree on a config share one deployment.
"""

from __future__ import annotations

import os
import socket
import time
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


class ClusterHandle:
    """The pdserve application in the session's Ray, redeployed only when a test needs another config."""

    def __init__(self) -> None:
        self.cluster: Any = None
        self.deploys: list[tuple[str, float]] = []  # (test that asked, seconds): printed at the end

    def ensure(self, config: Any) -> Any:
        """A running ``EmbeddedCluster`` for ``config`` (its gRPC port is picked when it is 0)."""
        from cluster.embedded import EmbeddedCluster

        if self.cluster is not None and self.cluster.config == config:
            return self.cluster
        started = time.perf_counter()
        if self.cluster is not None:
            self.cluster.delete_app()
        self.cluster = EmbeddedCluster(config).start()
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
        self.deploys.append((test, time.perf_counter() - started))
        return self.cluster

    def close(self) -> None:
        if self.cluster is not None:
            self.cluster.delete_app()
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
