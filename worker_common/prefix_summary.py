"""The prefill worker's prefix summary: the probe keys of the prefixes it still holds, for the router.

The router (``router/cache_aware.py``, keys from ``engine/prefix_summary.py``) scores workers by the
prompt tokens they hold, from a compact summary each worker publishes with its load report
(``ReplicaLoad.prefix_summary``):
the *probe keys* of the prompts it prefilled, at depths 1, 2, 4, 8, ... full blocks, kept while the
block at that depth is still in the engine's prefix index (``engine.prefix_index.PrefixIndex``, read
through its public ``in``). Most recently prefilled first, at most ``max_keys`` keys (8 bytes each,
~9 bytes pickled), rebuilt at most every ``period_s`` (between rebuilds the same tuple is published,
and the router skips re-reading it).

All methods run on the engine thread (``note`` when a prefill finishes, ``refresh`` from the loop's
housekeeping); ``summary`` is a plain attribute the replica's event loop reads (one reference swap).

The keys, the summary type and the bookkeeping are ``engine.prefix_summary``'s (the router's too, so
both sides compute the same keys by construction); this module adds the engine's anchors and the period.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from engine.block_hash import block_hashes
from engine.prefix_summary import PrefixSummary, SummaryBuilder, probe_depths, probe_keys

__all__ = ["PrefixSummary", "PrefixSummaryBuilder"]


class PrefixSummaryBuilder:
    """Probe key -> the engine chain hash of the block at its depth, for prompts prefilled here."""

    def __init__(self, block_size: int, max_keys: int = 4096, period_s: float = 1.0) -> None:
        self.block_size = block_size
        self.period_s = period_s
        self._builder = SummaryBuilder(max_keys)  # anchors: the engine chain hash at each depth
        self._built_at = -float("inf")
        self.summary = PrefixSummary(0, ())
        self.build_s = 0.0  # duration of the last rebuild (measured; docs/router.md)

    @property
    def max_keys(self) -> int:
        return self._builder.max_keys

    def configure(self, max_keys: int, period_s: float) -> None:
        """Set the cap and period (the cluster's ``router`` section); before the first request."""
        self._builder.max_keys = max_keys
        self.period_s = period_s

    def note(self, token_ids: Sequence[int], tenant: str = "") -> None:
        """A prompt was prefilled here (its full blocks are now in the prefix cache)."""
        depths = probe_depths(len(token_ids) // self.block_size)
        if not depths:
            return
        chain = block_hashes(token_ids, self.block_size, salt=tenant, max_blocks=depths[-1])
        keys = probe_keys(token_ids, self.block_size, tenant)
        self._builder.note(keys, [chain[depth - 1] for depth in depths])

    def refresh(self, engine: Any, now: float | None = None) -> PrefixSummary:
        """Rebuild ``summary`` from the engine's prefix index if ``period_s`` has passed (the same
        object, same generation, otherwise and when nothing changed)."""
        now = time.monotonic() if now is None else now
        if now - self._built_at < self.period_s:
            return self.summary
        index = getattr(getattr(engine, "pool", None), "index", None)
        if index is None:
            return self.summary
        started = time.perf_counter()
        self._built_at = now
        self.summary = self._builder.build(index.__contains__, getattr(engine, "num_requests_done", -1))
        self.build_s = time.perf_counter() - started
        return self.summary
