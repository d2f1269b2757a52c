"""The prefill worker's prefix summary: the probe keys of the prefixes it still holds, for the router.

The router (``router/summary.py``, ``router/cache_aware.py``) scores workers by the prompt tokens they
hold, from a compact summary each worker publishes with its load report (``ReplicaLoad.prefix_summary``):
the *probe keys* of the prompts it prefilled, at depths 1, 2, 4, 8, ... full blocks, kept while the
block at that depth is still in the engine's prefix index (``engine.prefix_index.PrefixIndex``, read
through its public ``in``). Most recently prefilled first, at most ``max_keys`` keys (8 bytes each,
~9 bytes pickled), rebuilt at most every ``period_s`` (between rebuilds the same tuple is published,
and the router skips re-reading it).

All methods run on the engine thread (``note`` when a prefill finishes, ``refresh`` from the loop's
housekeeping); ``summary`` is a plain attribute the replica's event loop reads (one reference swap).

``probe_keys`` here is a copy of ``router.summary.probe_keys`` (``worker_common`` may not import
``router``: tests/test_code_shape.py); ``tests/router/test_router_summary.py`` checks the two agree.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

from engine.block_hash import block_hashes

MAX_PROBE_BLOCKS = 4096
SAMPLES_PER_SEGMENT = 16


class PrefixSummary(NamedTuple):
    """What ``ReplicaLoad.prefix_summary`` carries: the keys and a generation bumped when they change
    (the same shape as ``router.summary.PrefixSummary``; a NamedTuple survives ``dataclasses.asdict``)."""

    generation: int
    keys: tuple[int, ...]


def probe_depths(num_full_blocks: int) -> list[int]:
    """1, 2, 4, ... up to the prompt's full blocks (and ``MAX_PROBE_BLOCKS``)."""
    depths = []
    depth = 1
    while depth <= num_full_blocks and depth <= MAX_PROBE_BLOCKS:
        depths.append(depth)
        depth *= 2
    return depths


def tenant_root(tenant: str) -> int:
    digest = hashlib.blake2b(b"pdserve/probe/v1|" + tenant.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


def probe_keys(token_ids: Sequence[int], block_size: int, tenant: str = "") -> list[int]:
    """The prompt's probe keys (see ``router/summary.py`` for the definition)."""
    depths = probe_depths(len(token_ids) // block_size)
    tokens = tuple(token_ids)
    key = tenant_root(tenant)
    keys = []
    start = 0
    for depth in depths:
        end = depth * block_size
        stride = (end - start) // SAMPLES_PER_SEGMENT or 1
        key = hash((key, tokens[start:end:stride], tokens[end - 1]))
        keys.append(key)
        start = end
    return keys


class PrefixSummaryBuilder:
    """Probe key -> the engine chain hash of the block at its depth, for prompts prefilled here."""

    def __init__(self, block_size: int, max_keys: int = 4096, period_s: float = 1.0) -> None:
        self.block_size = block_size
        self.max_keys = max_keys
        self.period_s = period_s
        self._entries: dict[int, bytes] = {}  # insertion order = prefill order
        self._built_at = -float("inf")
        self.summary = PrefixSummary(0, ())
        self.build_s = 0.0  # duration of the last rebuild (measured; docs/router.md)

    def configure(self, max_keys: int, period_s: float) -> None:
        """Set the cap and period (the cluster's ``router`` section); before the first request."""
        self.max_keys = max_keys
        self.period_s = period_s

    def note(self, token_ids: Sequence[int], tenant: str = "") -> None:
        """A prompt was prefilled here (its full blocks are now in the prefix cache)."""
        keys = probe_keys(token_ids, self.block_size, tenant)
        if not keys:
            return
        depths = probe_depths(len(token_ids) // self.block_size)
        chain = block_hashes(token_ids, self.block_size, salt=tenant, max_blocks=depths[-1])
        entries = self._entries
        for key, depth in zip(keys, depths, strict=True):
            entries.pop(key, None)
            entries[key] = chain[depth - 1]
        if len(entries) > 2 * self.max_keys:
            for key in list(entries)[: len(entries) - 2 * self.max_keys]:
                del entries[key]

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
        entries = self._entries
        keys: list[int] = []
        stale: list[int] = []
        for key in reversed(entries):
            if entries[key] in index:
                if len(keys) < self.max_keys:
                    keys.append(key)
            else:
                stale.append(key)
        for key in stale:
            del entries[key]
        summary = tuple(keys)
        if summary != self.summary.keys:
            self.summary = PrefixSummary(self.summary.generation + 1, summary)
        self.build_s = time.perf_counter() - started
        return self.summary
