"""A multi-node Ray cluster on this machine for the tests: each node its own ``ray start ... --block``.

``RayNodes`` starts a head and worker nodes as subprocesses (each in its own session, bound to
127.0.0.1, with its own short temp dir, free ports and custom resources) and ends them by PID: SIGTERM
to each ``ray start`` process (its raylet and GCS share its fate), then SIGKILL to what is left of that
process's group. It never runs ``ray stop``, which would stop every Ray on the machine.

Ray 2.60 turns token authentication on for a cluster as soon as ``~/.ray/auth_token`` exists; the
nodes and every client of this cluster get ``RAY_AUTH_MODE=token`` and their own ``RAY_AUTH_TOKEN`` in
``env``, so nothing depends on that file. Queries that need a Ray driver (the nodes, where Serve put the
replicas) run in a subprocess (``python -m tests.integration.ray_nodes``): the test process may
already hold the session's local Ray (tests/conftest.py), and a process joins one Ray cluster at most.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.conftest import free_port

RAY = str(Path(sys.executable).parent / "ray")
REPO = Path(__file__).resolve().parents[2]


def cluster_env(token: str) -> dict[str, str]:
    """The environment of the nodes and their clients: token auth with this cluster's own token."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_USAGE_STATS_ENABLED="0")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


@dataclass
class RayNodes:
    """A head node and worker nodes, each started with its own custom resources."""

    root: Path  # short: Ray's unix sockets live under each node's temp dir (108-byte path limit)
    resources: list[dict[str, float]]  # the head's first, then one per worker node
    num_cpus: int = 1
    token: str = field(default_factory=lambda: secrets.token_hex(16))
    gcs_port: int = field(default_factory=free_port)
    processes: list[subprocess.Popen] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def env(self) -> dict[str, str]:
        return cluster_env(self.token)

    def _start_node(self, index: int) -> None:
        temp_dir = self.root / f"n{index}"
        temp_dir.mkdir(parents=True, exist_ok=True)
        role = (
            ["--head", f"--port={self.gcs_port}", f"--ray-client-server-port={free_port()}",
             "--include-dashboard=false"]
            if index == 0 else [f"--address={self.address}"]
        )  # fmt: skip
        command = [
            RAY, "start", *role, "--block", "--node-ip-address=127.0.0.1", f"--num-cpus={self.num_cpus}",
            "--num-gpus=0", f"--resources={json.dumps(self.resources[index])}", f"--temp-dir={temp_dir}",
            f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}",
            "--object-store-memory=100000000", "--disable-usage-stats",
        ]  # fmt: skip
        log = (self.root / f"node{index}.log").open("w")
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )
        self.processes.append(process)
        log.close()

    def start(self, timeout_s: float = 90.0) -> RayNodes:
        """Start the head, then the workers; return once every node is alive in the GCS."""
        self._start_node(0)
        for index in range(1, len(self.resources)):
            self._start_node(index)
        probe = self.query("nodes", str(len(self.resources)), str(timeout_s), timeout_s=timeout_s + 30)
        assert len(probe) == len(self.resources), probe
        return self

    def query(self, *args: str, timeout_s: float = 60.0) -> Any:
        """Run this module as a Ray driver of the cluster; its JSON answer."""
        for process in self.processes:
            assert process.poll() is None, f"a ray node exited with {process.returncode}: {self.logs()}"
        done = subprocess.run(
            [sys.executable, "-m", "tests.integration.ray_nodes", self.address, *args],
            capture_output=True, text=True, timeout=timeout_s, env=self.env, cwd=REPO,
        )  # fmt: skip
        assert done.returncode == 0, f"{args}: {done.stderr[-3000:]}\n{self.logs()}"
        return json.loads(done.stdout.splitlines()[-1])

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(self.root.glob("*.log")))

    def stop(self) -> None:
        """End the nodes by PID, workers first: SIGTERM, then SIGKILL to each one's own process group."""
        for process in reversed(self.processes):
            if process.poll() is None:
                process.terminate()
        for process in reversed(self.processes):
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(process.pid, signal.SIGKILL)  # its own group only (start_new_session)
            except ProcessLookupError:
                pass
            process.wait(timeout=10)

    def __enter__(self) -> RayNodes:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


# ---- the driver side (runs in a subprocess: python -m tests.integration.ray_nodes ADDRESS COMMAND ...) ----


def _alive_nodes() -> list[dict[str, Any]]:
    import ray

    return [
        {"node_id": n["NodeID"], "resources": n["Resources"]} for n in ray.nodes() if n["Alive"]
    ]


def _wait_nodes(expected: int, timeout_s: float) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    while True:
        nodes = _alive_nodes()
        if len(nodes) >= expected or time.monotonic() > deadline:
            return nodes
        time.sleep(0.5)


def _replicas(app_name: str) -> dict[str, list[str]]:
    """Deployment name -> node ids of its RUNNING replicas (from the Serve controller's details)."""
    from ray.serve.context import _get_global_client

    details: Mapping[str, Any] = _get_global_client().get_serve_details()
    deployments = details["applications"][app_name]["deployments"]
    return {
        name: [r["node_id"] for r in deployment["replicas"] if r["state"] == "RUNNING"]
        for name, deployment in deployments.items()
    }


def main(argv: list[str]) -> None:
    import logging

    import ray

    address, command, *args = argv
    ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    if command == "nodes":  # nodes EXPECTED TIMEOUT_S
        answer: Any = _wait_nodes(int(args[0]), float(args[1]))
    elif command == "replicas":  # replicas APP_NAME
        answer = {"nodes": _alive_nodes(), "replicas": _replicas(args[0])}
    else:
        raise SystemExit(f"unknown command {command!r}")
    print(json.dumps(answer))


if __name__ == "__main__":
    main(sys.argv[1:])
