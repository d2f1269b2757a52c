"""Rehearse deploy/serve-config.yaml on this machine, CPU only: ``python deploy/rehearse_local.py``.

Starts its own local Ray with the worker groups' custom resources (``prefill``, ``decode``,
``ingress``), deploys the Serve config by config deploy (as KubeRay does, so the application-level
policy is in force), waits for RUNNING, prints where each replica runs, makes one ``Generate`` call
through the ingress, and shuts down. Only what cannot hold on a CPU box is substituted: the built-in
model, float32, a small KV cache, the ``shm`` transport, no GPUs, one ingress replica, a loopback port.
Not part of ``make test`` (it needs a Ray of its own, and a minute or two on 2 cores).
"""

from __future__ import annotations

import copy
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

SERVE_CONFIG = Path(__file__).resolve().parent / "serve-config.yaml"
POOL_OF = {"PrefillDeployment": "prefill", "DecodeDeployment": "decode", "IngressDeployment": "ingress"}


def cpu_config(config: dict[str, Any], port: int) -> dict[str, Any]:
    """The Serve config with the CPU substitutions listed in the module docstring."""
    from engine.builtin import BUILTIN_MODEL_ID

    config = copy.deepcopy(config)
    config["proxy_location"] = "Disabled"
    config.pop("http_options", None)
    (app,) = config["applications"]
    args = app["args"]
    args["engine"].update(model=BUILTIN_MODEL_ID, dtype="float32", kv_cache_bytes=16 << 20,
                          max_num_batched_tokens=512, max_num_seqs=16)
    args.update(kv_transfer={"backend": "shm", "timeout_s": 10.0}, grpc={"host": "127.0.0.1", "port": port})
    for pool in ("prefill", "decode"):
        args[pool].update(num_cpus=0.5, num_gpus=0, min_replicas=1, max_replicas=2)
    args["ingress"].update(num_replicas=1, num_cpus=0.1)
    for deployment in app["deployments"]:
        pool = POOL_OF[deployment["name"]]
        deployment["ray_actor_options"].update(num_cpus=args[pool]["num_cpus"], num_gpus=0)
        if "autoscaling_config" in deployment:
            deployment["autoscaling_config"].update(min_replicas=1, max_replicas=2)
        else:
            deployment["num_replicas"] = 1
    return config


def main() -> int:
    """Deploy, check, call once, shut down; exit status 0 when the call returned tokens."""
    import ray
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    from cluster.client import collect, connect, stream
    from protos import pdserve_pb2 as pb

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    config = cpu_config(yaml.safe_load(SERVE_CONFIG.read_text()), port)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ray_rh_", dir="/tmp") as temp_dir:
        ray.init(num_cpus=4, resources={"prefill": 1, "decode": 1, "ingress": 1}, include_dashboard=False,
                 _temp_dir=temp_dir, log_to_driver=False)
        try:
            serve.start(proxy_location="Disabled")
            _get_global_client().deploy_apps(ServeDeploySchema.model_validate(config))
            status = None
            while status is None or status.status not in ("RUNNING", "DEPLOY_FAILED"):
                time.sleep(0.2)
                status = serve.status().applications.get("pdserve")
            print(f"application: {status.status} after {time.monotonic() - start:.1f} s {status.message}")
            for name, deployment in status.deployments.items():
                print(f"  {name}: {deployment.status} {dict(deployment.replica_states)}")
            available = ray.available_resources()
            left = {name: available.get(name, 0.0) for name in ("prefill", "decode", "ingress")}
            print(f"custom resources left (all taken = each replica sits on its group): {left}")
            if status.status != "RUNNING":
                return 1
            channel, stub = connect(f"127.0.0.1:{port}")
            result = collect(stream(stub, pb.GenerateRequest(text="hello world", max_tokens=8), timeout=120))
            channel.close()
            print(f"generate: {len(result.token_ids)} tokens, finish={result.finish_reason}, "
                  f"route={result.route}")
            return 0 if result.token_ids else 1
        finally:
            serve.shutdown()
            ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
