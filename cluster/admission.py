"""Admission control at the ingress: each pool admits by its KV budget, behind one bounded queue.

A request reserves, for its whole life, the KV blocks it will need at ``max_tokens`` on the decode pool
(``ceil((prompt + max_tokens) / block_size)``) and, until the decode side has pulled its KV, the blocks
of its prompt (plus the first token's) on the prefill pool. A pool's budget is the sum of its replicas'
``kv_blocks_total`` (their published load reports) x ``overcommit``, divided among the ingress
replicas (each keeps its own books, no shared state). A request that fits both budgets, with nobody
queued ahead of it, is admitted at once; otherwise it waits in a FIFO queue of at most ``max_queue``
requests for at most ``max_queue_wait_s``. Beyond that it is refused at once with
``AdmissionRefused`` (RESOURCE_EXHAUSTED, gRPC trailing metadata ``retry-after``; HTTP 429 with
``Retry-After``). ``overcommit`` 1.0 never lets the reservations exceed the blocks (no preemption,
never an out-of-memory: the KV pool is preallocated); above 1.0 the engines' preemption (recompute)
absorbs the requests that do reach ``max_tokens`` together.

A request that needs more blocks than one replica of a pool holds can never run: ``NeverFits``
(INVALID_ARGUMENT, naming prompt, ``max_tokens`` and both block counts). Validation refuses most such
requests first (INVALID_ARGUMENT too: the context is capped by one replica's KV pool); this covers replicas
that report a smaller pool than the ingress assumed. Before any replica has reported its load the
budget is unknown and requests are admitted (start-up).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

from pydantic import BaseModel, Field

from engine.config import STRICT_FROZEN

POOLS = ("prefill", "decode")


class AdmissionConfig(BaseModel):
    """The ``admission:`` section (cluster/admission.py)."""

    model_config = STRICT_FROZEN

    enabled: bool = True
    max_queue: Annotated[int, Field(ge=0)] = 64  # requests waiting for KV budget, per ingress replica
    max_queue_wait_s: Annotated[float, Field(ge=0)] = 10.0  # longer: refused (RESOURCE_EXHAUSTED)
    # reservations may reach this x a pool's KV blocks (> 1: rely on the engines' preemption)
    overcommit: Annotated[float, Field(gt=0)] = 1.0
    retry_after_s: Annotated[int, Field(ge=1)] = 1  # the hint sent with a refusal (whole seconds)


class AdmissionRefused(Exception):
    """No KV budget and no room (or time) left in the queue: RESOURCE_EXHAUSTED with a retry hint."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class NeverFits(Exception):
    """The request needs more KV blocks than one replica of a pool holds: INVALID_ARGUMENT."""


@dataclass(frozen=True)
class KVNeed:
    """Blocks one request reserves: ``blocks[pool]``; ``prefill`` only until the decode side pulled."""

    num_prompt_tokens: int
    max_tokens: int
    blocks: dict[str, int]


@dataclass
class Ticket:
    """An admitted request's reservation; ``release_prefill`` / ``release`` are idempotent."""

    need: KVNeed
    owner: KVAdmission
    held: dict[str, int] = field(default_factory=dict)

    def release_prefill(self) -> None:
        self.owner.give_back(self, ("prefill",))

    def release(self) -> None:
        self.owner.give_back(self, POOLS)


@dataclass
class _Waiter:
    need: KVNeed
    future: asyncio.Future[Ticket]


class KVAdmission:
    """One ingress replica's books: blocks reserved per pool, the wait queue, counters."""

    def __init__(
        self,
        config: AdmissionConfig,
        block_size: int,
        pools: tuple[str, ...],
        capacity: Callable[[str], list[int]],
        num_ingress_replicas: int = 1,
    ) -> None:
        self.config = config
        self.block_size = block_size
        self.pools = pools  # ("decode",) when colocated
        self._capacity = capacity  # pool -> each replica's kv_blocks_total (reported so far)
        self.num_ingress_replicas = num_ingress_replicas
        self.reserved = dict.fromkeys(pools, 0)
        self._queue: deque[_Waiter] = deque()
        self.max_queue_depth_seen = 0
        self.counts = {
            "admitted": 0,
            "queued": 0,
            "refused_queue_full": 0,
            "refused_wait": 0,
            "never_fits": 0,
        }

    def need_of(self, num_prompt_tokens: int, max_tokens: int) -> KVNeed:
        blocks = {"decode": -(-(num_prompt_tokens + max_tokens) // self.block_size)}
        if "prefill" in self.pools:
            blocks["prefill"] = num_prompt_tokens // self.block_size + 1  # prompt + the first token's
        return KVNeed(num_prompt_tokens, max_tokens, blocks)

    async def admit(self, num_prompt_tokens: int, max_tokens: int) -> Ticket:
        """A reservation for the request, at once or after queueing; else ``AdmissionRefused`` or
        ``NeverFits``. A cancel while queued leaves the queue (and the books) as they were."""
        need = self.need_of(num_prompt_tokens, max_tokens)
        if not self.config.enabled:
            return Ticket(need, self)
        budgets = self._check_fits(need)
        if not self._queue and self._fits(need, budgets):
            return self._reserve(need)
        if len(self._queue) >= self.config.max_queue:
            self.counts["refused_queue_full"] += 1
            raise AdmissionRefused(
                f"admission: KV budget in use and the queue is full ({self.config.max_queue} waiting); "
                f"retry after {self.config.retry_after_s} s",
                self.config.retry_after_s,
            )
        return await self._wait(need)

    async def _wait(self, need: KVNeed) -> Ticket:
        waiter = _Waiter(need, asyncio.get_running_loop().create_future())
        self._queue.append(waiter)
        self.counts["queued"] += 1
        self.max_queue_depth_seen = max(self.max_queue_depth_seen, len(self._queue))
        ticket: Ticket | None = None
        try:
            async with asyncio.timeout(self.config.max_queue_wait_s):
                ticket = await waiter.future
            return ticket
        except TimeoutError:
            self.counts["refused_wait"] += 1
            raise AdmissionRefused(
                f"admission: no KV budget within max_queue_wait_s ({self.config.max_queue_wait_s:g} s); "
                f"retry after {self.config.retry_after_s} s",
                self.config.retry_after_s,
            ) from None
        finally:
            if waiter in self._queue:  # timed out or cancelled while waiting
                self._queue.remove(waiter)
                self._wake()
            elif ticket is None and waiter.future.done() and not waiter.future.cancelled():
                waiter.future.result().release()  # admitted just as it gave up: give the blocks back

    def give_back(self, ticket: Ticket, pools: tuple[str, ...]) -> None:
        for pool in pools:
            blocks = ticket.held.pop(pool, 0)
            if blocks:
                self.reserved[pool] -= blocks
        self._wake()

    def _wake(self) -> None:
        """Admit queued requests in order while the head fits."""
        budgets = self._budgets()
        while self._queue and self._fits(self._queue[0].need, budgets):
            waiter = self._queue.popleft()
            if not waiter.future.done():
                waiter.future.set_result(self._reserve(waiter.need))

    def _reserve(self, need: KVNeed) -> Ticket:
        ticket = Ticket(need, self)
        for pool in self.pools:
            ticket.held[pool] = need.blocks[pool]
            self.reserved[pool] += need.blocks[pool]
        self.counts["admitted"] += 1
        return ticket

    def _budgets(self) -> dict[str, float | None]:
        """Blocks this ingress replica may reserve per pool (None: no load report yet, unknown)."""
        budgets: dict[str, float | None] = {}
        for pool in self.pools:
            totals = self._capacity(pool)
            budgets[pool] = (
                sum(totals) * self.config.overcommit / self.num_ingress_replicas if totals else None
            )
        return budgets

    def _fits(self, need: KVNeed, budgets: dict[str, float | None]) -> bool:
        return all(
            budget is None or self.reserved[pool] + need.blocks[pool] <= budget
            for pool, budget in budgets.items()
        )

    def _check_fits(self, need: KVNeed) -> dict[str, float | None]:
        for pool in self.pools:
            totals = self._capacity(pool)
            if totals and need.blocks[pool] > max(totals):
                self.counts["never_fits"] += 1
                raise NeverFits(
                    f"max_tokens: prompt ({need.num_prompt_tokens} tokens) + max_tokens ({need.max_tokens}) "
                    f"need {need.blocks[pool]} KV blocks of {self.block_size} tokens on the {pool} pool; "
                    f"its largest replica holds {max(totals)}"
                )
        return self._budgets()

    def snapshot(self) -> dict[str, Any]:
        """The books as plain data (``IngressDeployment.admission_stats``)."""
        return {
            "queue_depth": len(self._queue),
            "max_queue_depth_seen": self.max_queue_depth_seen,
            "max_queue": self.config.max_queue,
            "reserved_blocks": dict(self.reserved),
            "budget_blocks": self._budgets(),
            **self.counts,
            "time": time.time(),
        }


def retry_after_metadata(error: BaseException, code: Any) -> tuple[tuple[str, str], ...]:
    """gRPC trailing metadata for a failed call: ``retry-after`` (whole seconds) on RESOURCE_EXHAUSTED,
    the admission's own hint when it refused, 1 s for the pools' other load shedding."""
    import grpc

    if isinstance(error, AdmissionRefused):
        return (("retry-after", str(error.retry_after_s)),)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return (("retry-after", "1"),)
    return ()
