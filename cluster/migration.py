"""Moving a stream off a decode replica that died, hung or is being drained (docs/request-path.md).

The ingress reads every decode stream through ``watch_decode``: a Ray actor error (the replica process
died, or Serve killed it at the end of a drain) or ``heartbeat_timeout_s`` without any message (decode
replicas send a heartbeat chunk every ``heartbeat_interval_s`` while a stream waits, so only a hung or
unreachable replica goes silent) raises ``DecodeReplicaLost``. ``cluster.request_path`` then resumes the
request on another decode replica from what the client already has (``StreamProgress``): the prompt
plus the tokens sent so far, minus the last one, are prefilled again on the prefill pool (its prefix
cache holds the prompt's blocks) with ``RESUME_PREFILL_SAMPLING``; the new decode replica pulls that KV
and joins the request with the sent tokens counted as output (``DecodeRequest.resumed_output_ids``), so
the next token is the next output position (greedy and position-seeded sampling give the tokens an
undisturbed run gives) and its text continues after ``num_chars_sent`` characters. Colocated, the new
decode replica recomputes prompt + sent tokens itself.

A request moves at most ``max_migrations`` times; then, or when no healthy decode replica is left, it
ends with UNAVAILABLE (``MigrationFailed``) naming the replica and the reason. ``MigrationLog`` keeps
the recent events (detection timestamps) and the replicas under suspicion, which new requests and
migrations avoid for ``suspect_s``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from typing import Annotated, Any

from pydantic import BaseModel as _BaseModel
from pydantic import Field, model_validator

from cluster.replica_directory import REPLICA_DIRECTORY, ReplicaView
from engine.config import STRICT_FROZEN
from worker_common.messages import DecodeChunk, SamplingSpec

logger = logging.getLogger(__name__)

# The prefill side of a migration only computes KV: its sampled token is dropped. Greedy, and it must
# not end the request (a first token that ends it would unpin at once and lend no KV).
RESUME_PREFILL_SAMPLING = SamplingSpec(max_tokens=2, ignore_eos=True)

MAX_EVENTS = 1024


class MigrationConfig(_BaseModel):
    """The ``migration:`` section: how decode-replica loss is detected and how often a stream may move."""

    model_config = STRICT_FROZEN

    enabled: bool = True
    max_migrations: Annotated[int, Field(ge=0)] = 2  # per request; one more loss ends it UNAVAILABLE
    heartbeat_interval_s: Annotated[float, Field(gt=0)] = 0.25  # decode side: a waiting stream says so
    # ingress: silence this long = replica hung. 10 s, not less: at 1.5 s, 1,000 streams on one decode
    # replica of a loaded 2-core VM were taken for lost (docs/benchmarks.md); a dead one is seen at once
    heartbeat_timeout_s: Annotated[float, Field(gt=0)] = 10.0
    suspect_s: Annotated[float, Field(ge=0)] = 10.0  # a replica that lost a stream gets no new ones
    # Serve's graceful_shutdown_timeout_s of the decode pool: a replica being scaled down finishes its
    # streams for this long; Serve then kills it and the streams left migrate like after a crash.
    drain_timeout_s: Annotated[float, Field(ge=0)] = 20.0

    @model_validator(mode="after")
    def _check(self) -> MigrationConfig:
        if self.heartbeat_timeout_s <= 2 * self.heartbeat_interval_s:
            raise ValueError(
                f"heartbeat_timeout_s: must exceed 2 x heartbeat_interval_s ({self.heartbeat_interval_s}), "
                f"got {self.heartbeat_timeout_s}"
            )
        return self


class DecodeReplicaLost(Exception):
    """A decode stream broke (the replica died) or went silent past the heartbeat timeout."""

    def __init__(self, replica_id: str, reason: str, last_heard: float) -> None:
        super().__init__(f"decode replica {replica_id or '?'}: {reason}")
        self.replica_id = replica_id
        self.reason = reason
        self.last_heard = last_heard  # time.time() of the last message from it
        self.detected = time.time()


class MigrationFailed(Exception):
    """A stream could not move (limit reached, no healthy replica): the client gets UNAVAILABLE."""


def is_replica_loss(error: BaseException) -> bool:
    """Whether ``error`` (raised by a decode stream) means its replica is gone: a Ray actor error, or
    Serve's replica-unavailable, possibly inside a ``RayTaskError``."""
    from ray.exceptions import RayActorError, RayTaskError
    from ray.serve.exceptions import ReplicaUnavailableError

    for _ in range(8):
        if isinstance(error, RayActorError | ReplicaUnavailableError):
            return True
        cause = getattr(error, "cause", None) if isinstance(error, RayTaskError) else None
        if not isinstance(cause, BaseException) or cause is error:
            return False
        error = cause
    return False


async def watch_decode(
    stream: Any, timeout_s: float, replica_id: str, is_reporting: Callable[[str], bool] | None = None
) -> AsyncIterator[DecodeChunk]:
    """The chunks of one decode stream, heartbeats dropped; ``DecodeReplicaLost`` when it breaks or is
    silent for ``timeout_s`` (``replica_id``: the target, or "" until the first message names it).

    Before its first message a call may still wait in Serve's queue for a free slot on the replica
    (``max_ongoing_requests``): no heartbeat comes from there. So until the first message, silence is a
    loss only once ``is_reporting(replica_id)`` says the replica (any decode replica, for "") stopped
    publishing its load reports; a busy healthy one keeps reporting. Without it, silence is a loss."""
    iterator = aiter(stream)
    last_heard = time.time()
    has_heard = False
    pending: asyncio.Future[DecodeChunk] | None = None
    try:
        while True:
            if pending is None:  # never cancelled on a timeout: cancelling it would cancel the call
                pending = asyncio.ensure_future(anext(iterator))
            done, _ = await asyncio.wait((pending,), timeout=timeout_s)
            if not done:
                if not has_heard and is_reporting is not None and is_reporting(replica_id):
                    continue  # queued for a slot on a replica that is alive and reporting
                raise DecodeReplicaLost(replica_id, f"no message for {timeout_s:g} s", last_heard)
            finished, pending = pending, None
            try:
                chunk = finished.result()
            except StopAsyncIteration:
                return
            except asyncio.CancelledError:  # the call was cancelled under us (we were not): Serve's doing
                logger.warning("decode stream on %s cancelled by Serve; treated as lost", replica_id or "?")
                raise DecodeReplicaLost(replica_id, "the call was cancelled by Serve", last_heard) from None
            except Exception as error:
                if is_replica_loss(error):
                    reason = f"{type(error).__name__}: {_first_line(str(error))}"
                    raise DecodeReplicaLost(replica_id, reason, last_heard) from error
                raise
            last_heard, has_heard = time.time(), True
            replica_id = chunk.replica_id or replica_id
            if not chunk.is_heartbeat:
                yield chunk
    finally:
        if pending is not None:
            pending.cancel()


def decode_reports_within(within_s: float) -> Callable[[str], bool]:
    """``watch_decode``'s ``is_reporting``: whether the decode replica ``replica_id`` (every decode
    replica, for "") published a load report in the last ``within_s`` seconds, as this process's Serve
    router holds them."""

    def is_reporting(replica_id: str) -> bool:
        views = [
            view
            for view in REPLICA_DIRECTORY.replicas("DecodeDeployment")
            if not replica_id or view.replica_id == replica_id
        ]
        now = time.time()
        return bool(views) and all(
            view.load is not None and now - view.load.reported_at <= within_s for view in views
        )

    return is_reporting


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0][:200] if lines else ""


@dataclass
class StreamProgress:
    """What the client has of one request: every token id sent and the characters of text."""

    token_ids: list[int] = field(default_factory=list)
    num_chars: int = 0

    def add(self, token_ids: list[int], text: str) -> None:
        self.token_ids.extend(token_ids)
        self.num_chars += len(text)


@dataclass
class MigrationEvent:
    """One move, with wall-clock times (``time.time()``) the tests and operators read."""

    request_id: str
    from_replica: str
    reason: str
    num_tokens_sent: int
    last_heard: float  # the last message from the lost replica
    detected: float  # when the ingress gave up on it
    resumed: float = 0.0  # the first new token from the new replica reached the path (0: not yet)
    to_replica: str = ""
    outcome: str = "moving"  # moving | resumed | failed


class MigrationLog:
    """This ingress replica's migrations: recent events and the decode replicas under suspicion."""

    def __init__(self, config: MigrationConfig) -> None:
        self.config = config
        self.events: deque[MigrationEvent] = deque(maxlen=MAX_EVENTS)
        self.num_migrations = 0
        self.num_failed = 0
        self._suspects: dict[str, float] = {}  # replica id -> time.monotonic() until which it is avoided

    def on_loss(
        self, request_id: str, loss: DecodeReplicaLost, progress: StreamProgress, count: int
    ) -> MigrationEvent:
        """Record a loss; raise ``MigrationFailed`` when the request may not move again."""
        if loss.replica_id:
            self._suspects[loss.replica_id] = time.monotonic() + self.config.suspect_s
        event = MigrationEvent(
            request_id, loss.replica_id, loss.reason, len(progress.token_ids), loss.last_heard, loss.detected
        )
        self.events.append(event)
        if not self.config.enabled or count > self.config.max_migrations:
            event.outcome = "failed"
            self.num_failed += 1
            limit = self.config.max_migrations if self.config.enabled else 0
            why = f"not migrated (migration.max_migrations={limit} reached)"
            raise MigrationFailed(f"{loss}; {why}") from loss
        self.num_migrations += 1
        return event

    def failed(self, event: MigrationEvent, why: str) -> MigrationFailed:
        event.outcome = "failed"
        self.num_failed += 1
        return MigrationFailed(f"decode replica {event.from_replica}: {event.reason}; not migrated: {why}")

    def healthy(self, views: list[ReplicaView]) -> list[ReplicaView]:
        """``views`` without the replicas under suspicion (possibly none)."""
        if not self._suspects:
            return views
        now = time.monotonic()
        self._suspects = {rid: until for rid, until in self._suspects.items() if until > now}
        return [view for view in views if view.replica_id not in self._suspects]

    def snapshot(self) -> dict[str, Any]:
        """Counters and the recent events as plain data (``IngressDeployment.migration_stats``)."""
        return {
            "num_migrations": self.num_migrations,
            "num_failed": self.num_failed,
            "suspects": sorted(self._suspects),
            "events": [asdict(event) for event in self.events],
        }
