"""One replica's load and KV facts, from the engine's ``EngineStats`` snapshot, as plain numbers.

The same dict is the replica's routing load report (``record_routing_stats``), the source of its
autoscaling metrics, and one ``ReplicaInfo`` of ``ClusterInfo``.
"""

from __future__ import annotations

import time
from typing import Any


def replica_stats(stats: Any) -> dict[str, Any]:
    """``EngineStats`` -> the load-report dict (field names as in ``ReplicaInfo`` of the API)."""
    prompt_tokens = int(stats.num_prompt_tokens)
    return {
        "running_requests": int(stats.num_running),
        "queued_requests": int(stats.num_waiting),
        "queued_prefill_tokens": int(stats.num_queued_prefill_tokens),
        "kv_blocks_total": int(stats.num_blocks_total),
        "kv_blocks_used": int(stats.num_blocks_used),
        "kv_blocks_cached": int(stats.num_blocks_cached),
        # EngineStats.num_blocks_free counts cached blocks too (allocatable); the API reports them apart.
        "kv_blocks_free": int(stats.num_blocks_total)
        - int(stats.num_blocks_used)
        - int(stats.num_blocks_cached),
        "kv_blocks_allocatable": int(stats.num_blocks_free),
        "prompt_tokens": prompt_tokens,
        "cached_tokens": int(stats.num_cached_tokens),
        "prefix_hit_rate": (int(stats.num_cached_tokens) / prompt_tokens) if prompt_tokens else 0.0,
        "generated_tokens": int(stats.num_generated_tokens),
        "preemptions": int(stats.num_preemptions),
        "reported_at": time.time(),  # the router ignores a report older than the one it holds
    }
