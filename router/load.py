"""Worker load reports and the per-pool load table with watermark hysteresis.

Workers report their load; every ingress replica keeps its own table from those reports (no shared
state). A worker's hot/cool state changes only when its own report arrives, so two tables fed the
same reports in the same order hold the same state.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from engine.prefix_summary import PrefixSummary
from router.config import RouterConfig


@dataclass(frozen=True)
class LoadReport:
    """One worker's load at one moment.

    Attributes:
        worker_id: the replica id the router knows the worker by.
        queued_prefill_tokens: prompt tokens the worker has accepted but not yet computed (uncached
            tokens of waiting requests plus the rest of running prefills).
        running_requests: requests the worker holds (waiting + running).
        free_kv_blocks: KV blocks it could allocate now (free or evictable cached blocks).
        total_kv_blocks: size of its KV pool in blocks.
        reported_at: when the report was taken (seconds, any clock the worker keeps monotonic); a
            report not newer than the one held for the same worker is ignored.
        prefix_summary: the probe keys of the prefixes the worker holds (``engine.prefix_summary``), with a
            generation the worker bumps when they change (the router re-reads the keys only then),
            or None when the worker publishes none (the router then knows nothing of its cache).
        computed_prompt_tokens: prompt tokens the worker has computed since it started (its prompt
            tokens minus those served from its cache): with ``queued_prefill_tokens``, the work it
            has taken on, which the cache_aware policy keeps even across workers for new prefixes.
        requests_received: requests the worker has taken in since it started, counted in the same
            snapshot as its queue; None when it does not say (replays, the simulator: their reports
            are taken after every request sent has arrived). With it the router keeps a request's
            local charge until a report has counted the request (see ``LoadTable.update``).
    """

    worker_id: str
    queued_prefill_tokens: int
    running_requests: int
    free_kv_blocks: int
    total_kv_blocks: int
    reported_at: float
    prefix_summary: PrefixSummary | None = None
    computed_prompt_tokens: int = 0
    requests_received: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.worker_id, str) or not self.worker_id:
            raise ValueError(f"worker_id must be a non-empty string, got {self.worker_id!r}")
        names = ("queued_prefill_tokens", "running_requests", "free_kv_blocks", "total_kv_blocks")
        for name in (*names, "computed_prompt_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.requests_received is not None and self.requests_received < 0:
            raise ValueError(f"requests_received must be >= 0, got {self.requests_received}")
        if self.free_kv_blocks > self.total_kv_blocks:
            raise ValueError(
                f"free_kv_blocks ({self.free_kv_blocks}) exceeds total_kv_blocks ({self.total_kv_blocks})"
            )
        if not math.isfinite(self.reported_at):
            raise ValueError(f"reported_at must be finite, got {self.reported_at}")


class LoadTable:
    """Latest report per worker of one pool, what the router sent since, and hot/cool state.

    Between two reports from a worker the router adds what it has itself sent there
    (:meth:`debit`), so a burst of decisions does not all land on one worker that looked idle in its
    last report. A report replaces the part of that estimate it has seen: all of it when the report
    does not count the requests it has received, else (see :meth:`update`) the oldest charges, one per
    request received since the previous report. Workers without a report count as idle (0 queued
    tokens, cool) for prefill; see ``free_kv_blocks`` for decode.
    """

    # A charge no report has counted is dropped by the this-many-th report from its worker after it
    # (the request never arrived: failed on its way, or cancelled before it was sent)
    CHARGE_LIFETIME_REPORTS = 3
    # Counted requests whose probe keys wait for a summary that has seen them, per worker, at most
    # (a worker whose summary never changes must not grow the table)
    MAX_ARRIVED = 1024

    def __init__(self, config: RouterConfig, worker_ids: Iterable[str] = ()):
        self._config = config
        self._members: tuple[str, ...] = ()
        self._member_set: frozenset[str] = frozenset()
        self._reports: dict[str, LoadReport] = {}
        # Sent and not yet counted by a report: [queued prefill tokens, running requests, kv blocks],
        # the sum of the charges in ``_charges`` (each: (reports applied when charged, tokens, requests,
        # blocks, the probe keys it added to ``held`` or None), oldest first)
        self._pending: dict[str, list[int]] = {}
        self._charges: dict[str, deque[tuple[int, int, int, int, list[int] | None]]] = {}
        # Counted by a report, with probe keys no summary has shown yet: (the request's arrival number
        # at the worker, those keys), oldest first; see ``_read_summary``
        self._arrived: dict[str, deque[tuple[int, list[int]]]] = {}
        self._num_reports: dict[str, int] = {}
        self._hot: set[str] = set()
        # Prefix summaries: the generation last read, and the set the router matches against (the
        # summary plus the probe keys the router has itself sent there since; see ``note_sent``).
        self._summary_generations: dict[str, int] = {}
        self._summary_sizes: dict[str, int] = {}
        self.held: dict[str, set[int]] = {}
        # per worker: the keys ``note_sent`` added to ``held`` that the summary read last lacks (taken
        # out again when the next summary is applied as a delta)
        self._sent: dict[str, list[int]] = {}
        self.set_workers(worker_ids)

    @property
    def worker_ids(self) -> tuple[str, ...]:
        """Members in sorted order (a deterministic iteration order for tie-breaks)."""
        return self._members

    def set_workers(self, worker_ids: Iterable[str]) -> None:
        """Replace the members; reports and state of workers that stay are kept, others dropped."""
        members = tuple(sorted(set(worker_ids)))
        keep = set(members)
        self._members = members
        self._member_set = frozenset(members)
        self._reports = {w: r for w, r in self._reports.items() if w in keep}
        self._pending = {w: p for w, p in self._pending.items() if w in keep}
        self._charges = {w: c for w, c in self._charges.items() if w in keep}
        self._num_reports = {w: n for w, n in self._num_reports.items() if w in keep}
        self._arrived = {w: a for w, a in self._arrived.items() if w in keep}
        self._hot &= keep
        self._summary_generations = {w: g for w, g in self._summary_generations.items() if w in keep}
        self.held = {w: self.held.get(w, set()) for w in members}
        self._sent = {w: self._sent.get(w, []) for w in members}
        # queued[w]: reported queued prefill tokens plus what was sent since (a plain dict: read on
        # every decision)
        self.queued = {w: self._reported_queued(w) for w in members}
        self._total_queued = sum(self.queued.values())
        # work[w]: prompt tokens w has computed (reported) plus queued(w): the work it has taken on
        self.work = {w: self.queued[w] + self._reported_computed(w) for w in members}
        self.total_work = sum(self.work.values())

    def update(self, report: LoadReport) -> bool:
        """Store a report (dropping the charges it has seen: ``_acknowledge``) and update that worker's
        hot/cool state.

        Returns False (and changes nothing) when the worker is not a member or the report is not
        newer than the one held: feeding the same report again is a no-op, so a caller may re-send
        every replica's latest report before each decision without wiping the local estimate.
        """
        worker_id = report.worker_id
        if worker_id not in self._member_set:
            return False
        previous = self._reports.get(worker_id)
        if previous is not None and report.reported_at <= previous.reported_at:
            return False
        self._total_queued -= self.queued_tokens(worker_id)
        self._reports[worker_id] = report
        num_reports = self._num_reports[worker_id] = self._num_reports.get(worker_id, 0) + 1
        still = self._acknowledge(worker_id, previous, report, num_reports)
        queued = report.queued_prefill_tokens + still
        self.queued[worker_id] = queued
        self._total_queued += queued
        work = report.computed_prompt_tokens + queued
        self.total_work += work - self.work[worker_id]
        self.work[worker_id] = work
        self._update_state(worker_id)
        summary = report.prefix_summary
        if summary is not None and summary.generation != self._summary_generations.get(worker_id):
            self._read_summary(worker_id, summary)
        return True

    def _acknowledge(
        self, worker_id: str, previous: LoadReport | None, report: LoadReport, num_reports: int
    ) -> int:
        """Drop the charges ``report`` has seen; returns the queued tokens of those left.

        A report that counts the requests it has received (``requests_received``) has seen, of this
        table's charges, at most as many as arrived since the previous report (0 before the first):
        the oldest that many go, since requests arrive in the order they were sent. The others stay,
        so a report taken while a request was on its way does not make its worker look idle. With
        several ingress replicas the count includes the others' requests, so more go than arrived from
        here: at worst the estimate of a report that counts nothing. A charge goes too with the
        ``CHARGE_LIFETIME_REPORTS``-th report after it. A report without the count (or from a restarted
        worker: a count that went down) replaces every charge.
        """
        charges = self._charges.get(worker_id)
        if not charges:
            return 0
        received = report.requests_received
        before = 0 if previous is None else previous.requests_received
        if received is None or before is None or received < before:
            charges.clear()
            self._arrived.pop(worker_id, None)
            del self._pending[worker_id]
            return 0
        pending = self._pending[worker_id]
        acknowledged = received - before
        oldest = num_reports - self.CHARGE_LIFETIME_REPORTS
        while charges and (acknowledged > 0 or charges[0][0] <= oldest):
            _, tokens, requests, blocks, keys = charges.popleft()
            pending[0] -= tokens
            pending[1] -= requests
            pending[2] -= blocks
            if keys is not None and acknowledged > 0:  # its arrival number: before + 1, before + 2, ...
                arrived = self._arrived.get(worker_id)
                if arrived is None:
                    arrived = self._arrived[worker_id] = deque(maxlen=self.MAX_ARRIVED)
                arrived.append((received - acknowledged + 1, keys))
            acknowledged -= 1
        if not charges:
            del self._pending[worker_id]
            return 0
        return pending[0]

    def _read_summary(self, worker_id: str, summary: PrefixSummary) -> None:
        """``held[worker_id]`` := the summary's keys (by its delta when it is relative to the
        generation held, else by re-reading the keys whole), plus the probe keys of prompts sent there
        that it lacks and may not have seen.

        A summary built before a sent prompt was prefilled lacks its keys, and dropping them then sends
        the prompt's followers elsewhere while it is still on its way. So the keys sent with a charge
        (``charge_prefill``) stay while no report has counted its request, or one has with an arrival
        number above the summary's ``requests_done`` (the worker had not finished with it). They go
        with a summary that counts the request done (it holds them, or they were evicted), with the
        charge's lifetime if no report ever counts it, and with every summary that does not count
        (-1: replays, the simulator). Keys from ``note_sent`` go with the next summary read.
        """
        held = self.held[worker_id]
        sent = self._sent[worker_id]
        base = summary.base_generation
        if base >= 0 and base == self._summary_generations.get(worker_id):
            if sent:
                held.difference_update(sent)  # back to the summary read last
            held.difference_update(summary.removed)
            held.update(summary.added)
        else:
            held = self.held[worker_id] = set(summary.keys)
        sent.clear()
        done = summary.requests_done
        if done < 0:
            self._arrived.pop(worker_id, None)
        else:
            unseen = [key for charge in self._charges.get(worker_id, ()) if charge[4] for key in charge[4]]
            arrived = self._arrived.get(worker_id)
            if arrived:
                while arrived and arrived[0][0] <= done:
                    arrived.popleft()
                for _, keys in arrived:
                    unseen += keys
            for key in unseen:
                if key not in held:
                    held.add(key)
                    sent.append(key)
        self._summary_generations[worker_id] = summary.generation
        self._summary_sizes[worker_id] = len(summary.keys)

    def note_sent(self, worker_id: str, probe_keys: list[int]) -> None:
        """Count ``probe_keys`` as held by ``worker_id`` until its next changed summary (the router
        has just sent it a prompt with them: its next turns should follow it even before a report)."""
        held = self.held[worker_id]
        new = [key for key in probe_keys if key not in held]
        if new:
            held.update(new)
            self._sent[worker_id] += new

    def charge_prefill(self, worker_id: str, queued_tokens: int, probe_keys: list[int]) -> None:
        """``debit(worker_id, queued_tokens, running_requests=1)`` then ``note_sent(worker_id,
        probe_keys)``, written out (once per cache_aware decision); ``worker_id`` must be a member."""
        pending = self._pending.get(worker_id)
        if pending is None:
            pending = self._pending[worker_id] = [0, 0, 0]
            self._charges[worker_id] = charges = deque()
        else:
            charges = self._charges[worker_id]
        pending[0] += queued_tokens
        pending[1] += 1
        held = self.held[worker_id]
        new = [key for key in probe_keys if key not in held]
        charges.append((self._num_reports.get(worker_id, 0), queued_tokens, 1, 0, new or None))
        self._total_queued += queued_tokens
        self.queued[worker_id] += queued_tokens
        self.total_work += queued_tokens
        self.work[worker_id] += queued_tokens
        self._update_state(worker_id)
        if new:
            held.update(new)
            self._sent[worker_id] += new

    def charge_decode(self, worker_id: str, kv_blocks: int) -> None:
        """``debit(worker_id, running_requests=1, kv_blocks=kv_blocks)`` (no queued tokens, so no
        hot/cool change), written out (once per decode choice); ``worker_id`` must be a member."""
        pending = self._pending.get(worker_id)
        charge = (self._num_reports.get(worker_id, 0), 0, 1, kv_blocks, None)
        if pending is None:
            self._pending[worker_id] = [0, 1, kv_blocks]
            self._charges[worker_id] = deque([charge])
        else:
            pending[1] += 1
            pending[2] += kv_blocks
            self._charges[worker_id].append(charge)

    def summary_size(self, worker_id: str) -> int:
        """Keys in the worker's last reported summary (0 if none)."""
        return self._summary_sizes.get(worker_id, 0) if worker_id in self._summary_generations else 0

    def debit(
        self, worker_id: str, queued_tokens: int = 0, running_requests: int = 0, kv_blocks: int = 0
    ) -> None:
        """Add work the router has just sent to ``worker_id`` (until its next report)."""
        if worker_id not in self._member_set:
            raise KeyError(f"unknown worker {worker_id!r}")
        pending = self._pending.setdefault(worker_id, [0, 0, 0])
        pending[0] += queued_tokens
        pending[1] += running_requests
        pending[2] += kv_blocks
        charge = (self._num_reports.get(worker_id, 0), queued_tokens, running_requests, kv_blocks, None)
        self._charges.setdefault(worker_id, deque()).append(charge)
        self._total_queued += queued_tokens
        self.queued[worker_id] += queued_tokens
        self.total_work += queued_tokens
        self.work[worker_id] += queued_tokens
        self._update_state(worker_id)

    def _update_state(self, worker_id: str) -> None:
        queued = self.queued[worker_id]  # == queued_tokens(worker_id), kept by update / debit
        config = self._config
        mean = self._total_queued / len(self._members)
        # queued < max(low floor, low factor * mean) and queued > max(high floor, high factor * mean),
        # written out (this runs on every decision)
        if worker_id in self._hot:
            if queued < config.low_watermark_tokens or queued < config.low_load_factor * mean:
                self._hot.discard(worker_id)
        elif queued > config.high_watermark_tokens and queued > config.high_load_factor * mean:
            self._hot.add(worker_id)

    def mean_queued_tokens(self) -> float:
        """Mean queued prefill tokens over members (unreported workers count as 0)."""
        return self._total_queued / len(self._members) if self._members else 0.0

    def is_hot(self, worker_id: str) -> bool:
        """Whether the worker is above its watermark (entered above high, not yet below low)."""
        return worker_id in self._hot

    def _reported_queued(self, worker_id: str) -> int:
        report = self._reports.get(worker_id)
        pending = self._pending.get(worker_id)
        return (report.queued_prefill_tokens if report else 0) + (pending[0] if pending else 0)

    def _reported_computed(self, worker_id: str) -> int:
        report = self._reports.get(worker_id)
        return report.computed_prompt_tokens if report else 0

    def queued_tokens(self, worker_id: str) -> int:
        """Reported queued prefill tokens plus what was sent since (0 if never reported)."""
        report = self._reports.get(worker_id)
        pending = self._pending.get(worker_id)
        return (report.queued_prefill_tokens if report else 0) + (pending[0] if pending else 0)

    def running_requests(self, worker_id: str) -> int:
        """Reported running requests plus those sent since (0 if never reported)."""
        report = self._reports.get(worker_id)
        pending = self._pending.get(worker_id)
        return (report.running_requests if report else 0) + (pending[1] if pending else 0)

    def most_free_kv(self) -> tuple[str | None, int, list[str]]:
        """(the reported worker with the most free KV blocks, ties: fewer running requests, then
        sorted id; its free blocks; the unreported workers in sorted order). One pass over the
        members with the reads of ``free_kv_blocks`` / ``running_requests`` inlined (the decode choice
        runs on every request)."""
        reports, pending_of = self._reports, self._pending
        best_id: str | None = None
        best: tuple[int, int] | None = None
        unreported: list[str] = []
        for worker_id in self._members:
            report = reports.get(worker_id)
            if report is None:
                unreported.append(worker_id)
                continue
            pending = pending_of.get(worker_id)
            if pending is None:
                candidate = (report.free_kv_blocks, -report.running_requests)
            else:
                candidate = (report.free_kv_blocks - pending[2], -report.running_requests - pending[1])
            if best is None or candidate > best:
                best_id, best = worker_id, candidate
        return best_id, (best[0] if best is not None else 0), unreported

    def free_kv_blocks(self, worker_id: str) -> int | None:
        """Reported free KV blocks minus those sent since (may go negative); None if never reported."""
        report = self._reports.get(worker_id)
        if report is None:
            return None
        pending = self._pending.get(worker_id)
        return report.free_kv_blocks - (pending[2] if pending else 0)
