"""A two-pool Serve application for the real autoscaling checks: ``Prefill`` and ``Decode``
deployments that only report metrics, read from files the test writes (one value per pool, so every
replica of a pool reports the same). Imported by Serve's controller through the config's import_path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def build_fake_pools(args: dict[str, Any]) -> Any:
    """Application builder (``import_path: tests.autoscaling.fake_pools:build_fake_pools``).

    args: ``prefill_metric_file`` (queued_prefill_tokens), ``decode_metric_file``
    (kv_blocks_used_fraction).
    """
    from ray import serve

    @serve.deployment(name="Prefill", ray_actor_options={"num_cpus": 0})
    class Prefill:
        def __init__(self, path: str) -> None:
            self._path = Path(path)

        def record_autoscaling_stats(self) -> dict[str, float]:
            return {"queued_prefill_tokens": float(self._path.read_text() or 0)}

        def __call__(self) -> str:
            return "prefill"

    @serve.deployment(name="Decode", ray_actor_options={"num_cpus": 0})
    class Decode:
        def __init__(self, path: str, prefill: Any) -> None:
            self._path = Path(path)
            self._prefill = prefill

        def record_autoscaling_stats(self) -> dict[str, float]:
            return {"kv_blocks_used_fraction": float(self._path.read_text() or 0)}

        async def __call__(self) -> str:
            return await self._prefill.remote()

    return Decode.bind(args["decode_metric_file"], Prefill.bind(args["prefill_metric_file"]))
