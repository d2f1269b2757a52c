"""``cluster.autoscaling``'s pool policies, wrapped to write down what the Serve controller gave them.

Serve runs the policies in its controller process; each tick appends one JSON line to
``record_path(app, deployment)``: the running replicas, the per-replica metric values the policy
observed (``cluster.autoscaling.observe`` of the real ``AutoscalingContext``), and its decision.
Nothing else changes: the decision returned is the pdserve policy's own.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from cluster import autoscaling


def record_path(app_name: str, deployment_name: str) -> Path:
    return Path(tempfile.gettempdir()) / f"pdserve-autoscale-{app_name}-{deployment_name}.jsonl"


def _record(ctx: Any, num_replicas: int, state: dict[str, Any]) -> None:
    observation = autoscaling.observe(ctx)
    line = {
        "num_running_replicas": observation.num_running_replicas,
        "target_num_replicas": observation.target_num_replicas,
        "metrics": {name: list(values) for name, values in observation.metrics.items()},
        "num_replicas": num_replicas,
        "decision": state.get("pdserve_last_decision"),
    }
    with record_path(ctx.app_name, ctx.deployment_name).open("a") as out:
        out.write(json.dumps(line) + "\n")


def prefill_policy(ctx: Any) -> tuple[int, dict[str, Any]]:
    num_replicas, state = autoscaling.prefill_policy(ctx)
    _record(ctx, num_replicas, state)
    return num_replicas, state


def decode_policy(ctx: Any) -> tuple[int, dict[str, Any]]:
    num_replicas, state = autoscaling.decode_policy(ctx)
    _record(ctx, num_replicas, state)
    return num_replicas, state
