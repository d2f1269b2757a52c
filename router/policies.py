"""Prefill routing policies: one small class each, behind one interface.

A policy sees the prefix key, the hash ring and the pool's load table, and returns a worker id with
its reason. Policies are deterministic: the same inputs in the same order give the same answers in
every process (round-robin and tie rotation keep a counter, advanced once per decision).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from engine.block_hash import BlockHash
from router.decisions import RouteReason
from router.load import LoadTable
from router.ring import HashRing


class PrefillPolicy(ABC):
    """Chooses a prefill worker. ``choose`` is a command: it may advance the policy's counter."""

    name: str

    @abstractmethod
    def choose(
        self, prefix_key: BlockHash | None, ring: HashRing, loads: LoadTable
    ) -> tuple[str, RouteReason]:
        """Return ``(worker_id, reason)``; the pool (``loads.worker_ids``) is non-empty."""


class _Rotation:
    """A counter that rotates tie-breaks so equal workers share the traffic."""

    def __init__(self) -> None:
        self._count = 0

    def next_offset(self, num_workers: int) -> int:
        offset = self._count % num_workers
        self._count += 1
        return offset


def least_loaded(loads: LoadTable, offset: int = 0) -> str:
    """Fewest queued prefill tokens, then fewest running requests, then rotated member order."""
    members = loads.worker_ids
    num_members = len(members)
    best_id = members[offset % num_members]
    best = (loads.queued_tokens(best_id), loads.running_requests(best_id))
    for step in range(1, num_members):
        worker_id = members[(offset + step) % num_members]
        candidate = (loads.queued_tokens(worker_id), loads.running_requests(worker_id))
        if candidate < best:
            best_id, best = worker_id, candidate
    return best_id


class RoundRobinPolicy(PrefillPolicy):
    """Members in sorted order, one after the other."""

    name = "round_robin"

    def __init__(self) -> None:
        self._rotation = _Rotation()

    def choose(
        self, prefix_key: BlockHash | None, ring: HashRing, loads: LoadTable
    ) -> tuple[str, RouteReason]:
        members = loads.worker_ids
        return members[self._rotation.next_offset(len(members))], RouteReason.ROUND_ROBIN


class LeastLoadedPolicy(PrefillPolicy):
    """Fewest queued prefill tokens (ties: fewest running requests, then rotating)."""

    name = "least_loaded"

    def __init__(self) -> None:
        self._rotation = _Rotation()

    def choose(
        self, prefix_key: BlockHash | None, ring: HashRing, loads: LoadTable
    ) -> tuple[str, RouteReason]:
        offset = self._rotation.next_offset(len(loads.worker_ids))
        return least_loaded(loads, offset), RouteReason.LEAST_LOADED


class ConsistentHashPolicy(PrefillPolicy):
    """The key's ring owner, whatever its load (a baseline); no key: least loaded."""

    name = "consistent_hash"

    def __init__(self) -> None:
        self._rotation = _Rotation()

    def choose(
        self, prefix_key: BlockHash | None, ring: HashRing, loads: LoadTable
    ) -> tuple[str, RouteReason]:
        if prefix_key is None:
            offset = self._rotation.next_offset(len(loads.worker_ids))
            return least_loaded(loads, offset), RouteReason.LEAST_LOADED
        return ring.owner(prefix_key), RouteReason.RING_OWNER


class PrefixHashPolicy(PrefillPolicy):
    """pdserve's policy: the key's ring owner unless it is hot; then the next cool worker in ring
    order (bounded load); if all are hot, the least loaded (ties: earliest in ring order).
    No key (no full block): least loaded."""

    name = "prefix_hash"

    def __init__(self) -> None:
        self._rotation = _Rotation()

    def choose(
        self, prefix_key: BlockHash | None, ring: HashRing, loads: LoadTable
    ) -> tuple[str, RouteReason]:
        if prefix_key is None:
            offset = self._rotation.next_offset(len(loads.worker_ids))
            return least_loaded(loads, offset), RouteReason.LEAST_LOADED
        owner = ring.owner(prefix_key)
        if not loads.is_hot(owner):
            return owner, RouteReason.RING_OWNER
        best_id = owner
        best = (loads.queued_tokens(owner), loads.running_requests(owner))
        for worker_id in ring.walk(prefix_key):
            if not loads.is_hot(worker_id):
                return worker_id, RouteReason.RING_WALK
            candidate = (loads.queued_tokens(worker_id), loads.running_requests(worker_id))
            if candidate < best:
                best_id, best = worker_id, candidate
        return best_id, RouteReason.LEAST_LOADED


def make_policy(name: str) -> PrefillPolicy:
    """A fresh policy by config name."""
    policies: dict[str, type[PrefillPolicy]] = {
        cls.name: cls for cls in (PrefixHashPolicy, RoundRobinPolicy, LeastLoadedPolicy, ConsistentHashPolicy)
    }
    if name not in policies:
        raise ValueError(f"unknown policy {name!r}; expected one of {', '.join(sorted(policies))}")
    return policies[name]()
