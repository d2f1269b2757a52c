"""Prefix summaries: which prompt prefixes a worker holds, as a small set of *probe keys*.

A worker cannot ship its whole prefix index to every ingress replica, and the router cannot hash a
4k-token prompt into 256 BLAKE2b block hashes per decision (~300 us). Both sides instead agree on a
cheap, sampled key for a prompt's prefix at a few *probe depths* (in full blocks):

    depths  1, 2, 4, 8, ..., 2**k   (powers of two up to MAX_PROBE_BLOCKS, and no deeper than the
                                     prompt's full blocks)
    key_0 = tenant root (BLAKE2b of the tenant, as an int)
    key_j = hash((key_{j-1}, tokens[a:b:stride], tokens[b-1]))   for segment [a, b) = [d_{j-1}, d_j)
            blocks in tokens, stride = max(1, (b - a) // SAMPLES_PER_SEGMENT)

``hash`` of a tuple of ints is CPython's tuple hash (xxHash-based since 3.8; ints hash to
themselves mod 2**61 - 1), which does not depend on ``PYTHONHASHSEED`` (only str / bytes hashes are
salted): every process computes the same keys, in C, in about 0.5 us per probe. A key names a
*sampled* prefix, so two prompts that differ only between samples share it; that is a routing hint
gone wrong (the worker's engine checks the exact chain hashes), never a wrong answer.

A worker's summary is the probe keys of prompts it prefilled whose block at that depth is still in
its prefix cache (``worker_common.prefix_summary`` builds it from the engine's prefix index, the
replay from its simulated caches), most recent first, at most ``RouterConfig.summary_max_keys``.

It lives in ``engine`` (torch-free, like ``engine.block_hash``) because both sides use it: the router
and the replay here, the prefill worker through ``worker_common.prefix_summary``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from functools import lru_cache
from typing import NamedTuple

SUMMARY_VERSION = 1
MAX_PROBE_BLOCKS = 4096  # deepest probe: 4096 blocks (64k tokens at block size 16)
SAMPLES_PER_SEGMENT = 16
_MAX_CACHED_ROOTS = 4096
_roots: dict[str, int] = {}


class PrefixSummary(NamedTuple):
    """One worker's summary as the router reads it (``LoadReport.prefix_summary``).

    Attributes:
        generation: bumped by the worker each time ``keys`` changes; the router re-reads ``keys``
            only when it differs from the generation it holds (so a report costs O(1) otherwise).
        keys: probe keys of the prefixes the worker holds, most recently prefilled first.
        base_generation: the generation ``added`` / ``removed`` are relative to (-1: no delta).
        added: keys in ``keys`` that were not in generation ``base_generation``'s keys (as sets).
        removed: keys of generation ``base_generation`` that are not in ``keys``. A router holding
            ``base_generation`` applies the delta (O(changed keys)) instead of re-reading ``keys``
            whole (O(keys): ~0.2-0.5 ms for 4,096 keys); one holding another generation re-reads.
        requests_done: requests the worker's engine had finished with (prefilled, ended or aborted)
            when it built this generation, -1 when it does not say (replays, the simulator). The
            router keeps the probe keys of a prompt it sent there, and this summary lacks, until a
            summary built after that prompt was done (``LoadTable._read_summary``).
    """

    generation: int
    keys: tuple[int, ...]
    base_generation: int = -1
    added: tuple[int, ...] = ()
    removed: tuple[int, ...] = ()
    requests_done: int = -1


def tenant_root(tenant: str) -> int:
    """The chain's start for ``tenant``: 8 bytes of BLAKE2b, as an int (cached)."""
    root = _roots.get(tenant)
    if root is None:
        if len(_roots) >= _MAX_CACHED_ROOTS:
            _roots.clear()
        digest = hashlib.blake2b(b"pdserve/probe/v1|" + tenant.encode("utf-8"), digest_size=8).digest()
        root = _roots[tenant] = int.from_bytes(digest, "little") >> 2
    return root


@lru_cache(maxsize=256)
def probe_depths(num_full_blocks: int) -> tuple[int, ...]:
    """Probe depths in blocks for a prompt of ``num_full_blocks`` full blocks (1, 2, 4, ...)."""
    depths = []
    depth = 1
    while depth <= num_full_blocks and depth <= MAX_PROBE_BLOCKS:
        depths.append(depth)
        depth *= 2
    return tuple(depths)


def probe_keys(token_ids: Sequence[int], block_size: int, tenant: str = "") -> list[int]:
    """The prompt's probe keys, one per depth of :func:`probe_depths` (shallowest first).

    ``token_ids`` may be a tuple or a list (a list's samples are copied into tuples); for a trace
    given as per-block ids, pass the ids with ``block_size=1``. Only the sampled positions are read
    (about 16 per probe, ~150 of a 4k-token prompt); this runs on every cache_aware decision, hence
    the comprehensions (a plain loop with ``append`` costs ~25 % more).
    """
    segments = _segments(len(token_ids) // block_size, block_size)
    key = _roots.get(tenant)
    if key is None:
        key = tenant_root(tenant)
    if isinstance(token_ids, tuple):
        return [key := hash((key, token_ids[a:b:s], token_ids[b - 1])) for a, b, s in segments]
    return [key := hash((key, tuple(token_ids[a:b:s]), token_ids[b - 1])) for a, b, s in segments]


@lru_cache(maxsize=1024)
def _segments(num_full_blocks: int, block_size: int) -> tuple[tuple[int, int, int], ...]:
    """(start, end, stride) in tokens of each probe's segment."""
    segments = []
    start = 0
    for depth in probe_depths(num_full_blocks):
        end = depth * block_size
        segments.append((start, end, (end - start) // SAMPLES_PER_SEGMENT or 1))
        start = end
    return tuple(segments)


def depth_tokens(block_size: int, num_probes: int) -> tuple[int, ...]:
    """Tokens covered by each of the first ``num_probes`` probes."""
    return tuple((1 << j) * block_size for j in range(num_probes))


class SummaryBuilder:
    """A worker's side of the summary: remembers (probe key -> anchor) for the prompts it prefilled
    and publishes the keys whose anchor is still cached, most recently prefilled first.

    The anchor of a probe key is whatever names the cached block at that depth in the worker's own
    cache (the engine: the block's chain hash; the replay: its block id); ``build`` asks
    ``is_cached(anchor)``. At most ``max_keys`` keys are published; entries beyond twice that are
    forgotten oldest first. ``worker_common.prefix_summary.PrefixSummaryBuilder`` runs it over the
    engine's prefix index.
    """

    def __init__(self, max_keys: int):
        if max_keys <= 0:
            raise ValueError(f"max_keys must be positive, got {max_keys}")
        self.max_keys = max_keys
        self._entries: dict[int, object] = {}  # insertion order = prefill order (re-noted: moved last)
        self._summary = PrefixSummary(0, ())

    def note(self, keys: Sequence[int], anchors: Sequence[object]) -> None:
        """A prompt with these probe keys (and the anchors of their depths) was prefilled here."""
        entries = self._entries
        for key, anchor in zip(keys, anchors, strict=True):
            entries.pop(key, None)
            entries[key] = anchor
        if len(entries) > 2 * self.max_keys:
            for key in list(entries)[: len(entries) - 2 * self.max_keys]:
                del entries[key]

    def build(self, is_cached, requests_done: int = -1) -> PrefixSummary:
        """The summary now: keys still cached, newest first, at most ``max_keys`` (the same object,
        same generation, when nothing changed), with the delta from the previous generation;
        ``requests_done``: the engine's count of requests done as it builds (see ``PrefixSummary``)."""
        entries = self._entries
        keys: list[int] = []
        stale: list[int] = []
        for key in reversed(entries):
            if is_cached(entries[key]):
                if len(keys) < self.max_keys:
                    keys.append(key)
            else:
                stale.append(key)
        for key in stale:
            del entries[key]
        summary = tuple(keys)
        previous = self._summary
        if summary != previous.keys:
            before, after = set(previous.keys), set(summary)
            added = tuple(key for key in summary if key not in before)
            removed = tuple(key for key in previous.keys if key not in after)
            generation = previous.generation
            self._summary = PrefixSummary(generation + 1, summary, generation, added, removed, requests_done)
        return self._summary
