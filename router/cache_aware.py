"""The ``cache_aware`` prefill policy: expected cached tokens against queued work, from the workers'
own prefix summaries; the hash ring for prefixes nobody holds; hot prefixes split over ring successors.

Cost of sending a prompt of ``P`` tokens to worker ``w`` (tokens; divide by a prefill rate for seconds):

    cost(w) = queued_prefill_tokens(w) + P - cached(w)

``cached(w)`` is the depth (in tokens) of the deepest leading probe key of the prompt that ``w``'s
summary holds (``engine.prefix_summary``: depths 1, 2, 4, ... blocks), or what the router sent there since
that summary. ``cost`` is the work ``w`` must finish before this prompt's first token: its TTFT times
the prefill rate, every worker having the same rate.

Decision (``d`` = deepest probe depth any worker holds, ``d0`` = the shallowest depth every worker
that holds anything at all holds, 0 unless at least two do: a preamble every caching worker shares,
such as a system prompt or Mooncake's universal first block, even while some workers are still
empty; ``ring key`` = the first probe key nobody holds, or the deepest one):

1. ``d > d0`` (someone holds this prompt's own prefix, not just what everyone shares), or every
   worker holds all of the prompt's probes (a hot prefix copied everywhere): the
   *primary* is the first holder of depth ``d`` along the ring walk from the ring key; another holder
   takes it only if cheaper by more than ``split_margin_tokens`` (``cache_split``: a hot prefix's
   traffic spread over its copies; when it cools, the ties go back to the primary and the copies age
   out). If even the chosen holder costs more than ``margin = min(replicate_margin_tokens,
   replicate_margin_factor * cached tokens of the holders)`` (factor 0: no cap) above the
   cheapest worker, the prompt goes to the first worker along the ring walk within that margin of the
   cheapest (``replicate``: a new copy, always on the same successors, so every ingress replica
   grows the same copies). Between the two margins nothing changes: hysteresis.
2. Otherwise (a prefix nobody holds yet: a new conversation): the first worker along the ring walk
   whose cost is within ``new_prefix_slack_tokens`` of the cheapest and whose *work taken on*
   (computed prompt tokens since it started + queued, from its reports) is at most
   ``max(new_prefix_work_floor_tokens, new_prefix_work_factor * the pool's mean)`` (if none within
   the slack is, the first within the slack): ``ring_owner`` if that is the ring owner, else
   ``ring_walk``. New conversations spread by the ring, bursts of one new prefix land together, a
   long queue is still avoided, and, since a conversation's later turns follow its cache, no worker
   collects more than its share of the conversations' work (bounded-load consistent hashing on
   cumulative work; factor 1.0 by default, 0 turns the bound off).

Deterministic: only the reports, the worker set and the router's own decisions count.
"""

from __future__ import annotations

from router.config import RouterConfig
from router.decisions import RouteReason
from router.load import LoadTable
from router.ring import HashRing, int_key_position


class CacheAwarePolicy:
    """See the module docstring. ``choose`` returns (worker, reason, expected cached tokens)."""

    name = "cache_aware"

    def __init__(self, config: RouterConfig):
        self._replicate_margin = config.replicate_margin_tokens
        self._split_margin = config.split_margin_tokens
        self._margin_factor = config.replicate_margin_factor
        self._new_slack = config.new_prefix_slack_tokens
        self._work_factor = config.new_prefix_work_factor
        self._work_floor = config.new_prefix_work_floor_tokens

    def choose(
        self,
        probes: list[int],
        depths: tuple[int, ...],
        num_tokens: int,
        ring: HashRing,
        loads: LoadTable,
    ) -> tuple[str, RouteReason, int]:
        """``probes``: the prompt's probe keys; ``depths``: tokens each covers (same length).

        Costs are kept as ``queued(w) - saved(w)`` (the docstring's cost minus ``P``, the same for
        every worker, so every comparison gives the same answer); ``saved`` holds the holders only.
        """
        queued = loads.queued
        if not probes:
            walk = ring.walk_from_position(0)
            return self._within(walk, queued, {}, min(queued.values())), RouteReason.LEAST_LOADED, 0
        num_probes = len(probes)
        cap = num_tokens - 1 if num_tokens > 0 else 0  # the last prompt token is always computed
        cheapest = min(queued.values())
        matched: dict[str, int] = {}  # workers holding at least the first probe -> probes held
        saved: dict[str, int] = {}  # the same workers -> cached tokens they save
        deepest = 0
        caching = 0  # workers holding anything at all
        first = probes[0]
        for worker_id, keys in loads.held.items():
            if not keys:
                continue
            caching += 1
            if first in keys:
                depth = 1
                while depth < num_probes and probes[depth] in keys:
                    depth += 1
                matched[worker_id] = depth
                tokens = depths[depth - 1]
                saved[worker_id] = tokens = tokens if tokens < cap else cap
                if queued[worker_id] - tokens < cheapest:
                    cheapest = queued[worker_id] - tokens
                if depth > deepest:
                    deepest = depth
        shallowest = min(matched.values()) if len(matched) == caching > 1 else 0
        ring_key = probes[deepest] if deepest < num_probes else probes[-1]
        position = int_key_position(ring_key)
        if deepest > shallowest or deepest == num_probes:  # its own prefix, or all of it everywhere
            return self._to_holder(deepest, depths, matched, queued, saved, cheapest, ring, position)
        walk = ring.walk_from_position(position)
        owner = walk[0]
        limit = cheapest + self._new_slack
        if self._work_factor:
            work_cap = max(self._work_floor, self._work_factor * loads.total_work / len(queued))
            chosen = self._within_work(walk, queued, saved, limit, loads.work, work_cap)
        elif queued[owner] - saved.get(owner, 0) <= limit:
            chosen = owner
        else:
            chosen = self._within(walk, queued, saved, limit)
        reason = RouteReason.RING_OWNER if chosen == owner else RouteReason.RING_WALK
        return chosen, reason, _cached(depths, matched.get(chosen, 0))

    def _to_holder(
        self,
        deepest: int,
        depths: tuple[int, ...],
        matched: dict[str, int],
        queued: dict[str, int],
        saved: dict[str, int],
        cheapest: int,
        ring: HashRing,
        position: int,
    ) -> tuple[str, RouteReason, int]:
        holders = [worker_id for worker_id, depth in matched.items() if depth == deepest]
        walk = None
        if len(holders) == 1:  # the only holder is the first along any walk, and the cheapest
            primary = best = holders[0]
        else:
            walk = ring.walk_from_position(position)
            primary = best = None
            for worker_id in walk:
                if matched.get(worker_id) != deepest:
                    continue
                if primary is None:
                    primary = best = worker_id
                elif queued[worker_id] - saved[worker_id] < queued[best] - saved[best]:  # type: ignore[index]
                    best = worker_id
            assert primary is not None and best is not None
        if queued[best] - saved[best] < queued[primary] - saved[primary] - self._split_margin:
            chosen, reason = best, RouteReason.CACHE_SPLIT
        else:
            chosen, reason = primary, RouteReason.PREFIX_CACHE
        # the margin is capped by a multiple of what the holder has cached: a holder of a short shared
        # preamble is no reason to queue (otherwise new conversations pile onto its first holder)
        margin = self._replicate_margin
        if self._margin_factor:
            margin = min(margin, int(self._margin_factor * _cached(depths, deepest)))
        if queued[chosen] - saved[chosen] > cheapest + margin:
            if walk is None:
                walk = ring.walk_from_position(position)
            chosen = self._within(walk, queued, saved, cheapest + margin)
            reason = RouteReason.REPLICATE
        return chosen, reason, _cached(depths, matched.get(chosen, 0))

    @classmethod
    def _within_work(
        cls, walk, queued: dict[str, int], saved: dict[str, int], limit: int, work: dict[str, int], cap: float
    ) -> str:
        """The first worker of ``walk`` with cost at most ``limit`` and work at most ``cap``, or
        without the work bound if none is under it."""
        for worker_id in walk:
            if queued[worker_id] - saved.get(worker_id, 0) <= limit and work[worker_id] <= cap:
                return worker_id
        return cls._within(walk, queued, saved, limit)

    @staticmethod
    def _within(walk, queued: dict[str, int], saved: dict[str, int], limit: int) -> str:
        """The first worker of ``walk`` whose cost (``queued - saved``) is at most ``limit``."""
        for worker_id in walk:
            if queued[worker_id] - saved.get(worker_id, 0) <= limit:
                return worker_id
        raise AssertionError("the cheapest worker is on every walk")


def _cached(depths: tuple[int, ...], depth: int) -> int:
    return depths[depth - 1] if depth else 0
