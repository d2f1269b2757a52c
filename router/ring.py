"""Consistent-hash ring with virtual nodes.

Each worker owns ``virtual_nodes`` points on a 64-bit ring; a key belongs to the first point at or
clockwise after it. Point positions are BLAKE2b digests of ``(seed, worker id, index)``, never
Python's ``hash()`` (salted per process), so every process that builds a ring from the same worker
ids and seed gets the same ring. Adding a worker moves only the keys its new points capture (about
``1/(N+1)`` of them, all to the new worker); removing one moves only the keys it owned.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Iterable, Iterator


def ring_position(key: bytes) -> int:
    """Position of a key on the ring: its first 8 bytes, little-endian.

    Prefix keys are already BLAKE2b digests (uniform), so no second hash is needed; shorter keys are
    hashed first.
    """
    if len(key) < 8:
        key = hashlib.blake2b(key, digest_size=8).digest()
    return int.from_bytes(key[:8], "little")


_MASK = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15  # Fibonacci hashing: spreads an int key's bits over the ring


def int_key_position(key: int) -> int:
    """Ring position of an int key (a probe key of ``engine.prefix_summary``): its bits mixed, 64 bits."""
    return ((key & _MASK) * _GOLDEN) & _MASK


def _point(seed: bytes, worker_id: str, index: int) -> int:
    digest = hashlib.blake2b(
        seed + b"|" + worker_id.encode("utf-8") + b"#" + str(index).encode(), digest_size=8
    ).digest()
    return int.from_bytes(digest, "little")


class HashRing:
    """Consistent-hash ring of worker ids.

    Queries (``owner``, ``walk``) do not change state; ``set_workers`` does.
    """

    def __init__(
        self, worker_ids: Iterable[str] = (), virtual_nodes: int = 256, seed: str = "pdserve/ring/v1"
    ):
        if virtual_nodes <= 0:
            raise ValueError(f"virtual_nodes must be positive, got {virtual_nodes}")
        self._virtual_nodes = virtual_nodes
        self._seed = seed.encode("utf-8")
        self._workers: set[str] = set()
        # Sorted ring: _positions[i] is a point, _owners[i] the worker owning it.
        self._positions: list[int] = []
        self._owners: list[str] = []
        self.set_workers(worker_ids)

    @property
    def workers(self) -> frozenset[str]:
        """The workers on the ring."""
        return frozenset(self._workers)

    @property
    def num_workers(self) -> int:
        return len(self._workers)

    def set_workers(self, worker_ids: Iterable[str]) -> None:
        """Replace the worker set (the ring depends only on the set, not on the order given)."""
        workers = set(worker_ids)
        for worker_id in workers:
            if not isinstance(worker_id, str) or not worker_id:
                raise ValueError(f"worker ids must be non-empty strings, got {worker_id!r}")
        self._workers = workers
        # Ties between two workers' points (probability ~ 2^-64 per pair) break on worker id.
        points = sorted(
            (_point(self._seed, worker_id, index), worker_id)
            for worker_id in workers
            for index in range(self._virtual_nodes)
        )
        self._positions = [position for position, _ in points]
        self._owners = [worker_id for _, worker_id in points]
        self._orders = self._walk_orders()  # walk order from each point (walk_from_position)

    def _index(self, key: bytes) -> int:
        positions = self._positions
        if not positions:
            raise LookupError("the hash ring has no workers")
        # ring_position() inlined for the common 16-byte key (this is on every decision's path)
        position = int.from_bytes(key[:8], "little") if len(key) >= 8 else ring_position(key)
        index = bisect.bisect_left(positions, position)
        return 0 if index == len(positions) else index

    def walk_from_position(self, position: int) -> tuple[str, ...]:
        """:meth:`walk` from a 64-bit ring position instead of a key (an int key's mixed bits), as a
        tuple of distinct workers (precomputed per ring point by ``set_workers``)."""
        positions = self._positions
        if not positions:
            return ()
        start = bisect.bisect_left(positions, position & _MASK)
        return self._orders[0 if start == len(positions) else start]

    def _walk_orders(self) -> list[tuple[str, ...]]:
        """Distinct workers in ring order from each point: order(i) = owner(i), then order(i + 1)
        without it (one backward pass; O(points x workers))."""
        owners = self._owners
        num_points = len(owners)
        if not num_points:
            return []
        seen: dict[str, None] = {}
        for offset in range(num_points):  # order(0), scanning clockwise with wrap-around
            seen.setdefault(owners[offset], None)
            if len(seen) == len(self._workers):
                break
        orders: list[tuple[str, ...]] = [()] * num_points
        following = tuple(seen)
        for index in range(num_points - 1, -1, -1):
            owner = owners[index]
            if following[0] != owner:
                following = (owner, *(w for w in following if w != owner))
            orders[index] = following
        return orders

    def owner(self, key: bytes) -> str:
        """The worker owning ``key``. Raises ``LookupError`` on an empty ring."""
        return self._owners[self._index(key)]

    def walk(self, key: bytes) -> Iterator[str]:
        """Distinct workers in ring order from ``key``'s owner on; each worker once, all of them."""
        if not self._positions:
            return
        start = self._index(key)
        seen: set[str] = set()
        num_points = len(self._owners)
        for offset in range(num_points):
            worker_id = self._owners[(start + offset) % num_points]
            if worker_id not in seen:
                seen.add(worker_id)
                yield worker_id
                if len(seen) == len(self._workers):
                    return
