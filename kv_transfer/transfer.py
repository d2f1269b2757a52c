"""One pull in flight: its status enum, the ``Transfer`` contract, the state machine every backend shares
(``TransferState``), and the daemon worker that runs copies.

Lifecycle: PENDING -> TRANSFERRING -> DONE | FAILED. The first terminal state wins; later attempts to
finish are ignored. A transfer's deadline is ``timeout_s`` after ``read_blocks``: whoever looks at it
after that (``status``, ``wait``) ends it FAILED with a "timed out" error, even if nobody waits.

Guarantee to the caller: once a transfer is terminal, the transport writes no more bytes into its
local blocks (copies run chunk by chunk under ``writing()``, which refuses after the end), so the
decode side may free or reuse the blocks of a FAILED transfer at once.
"""

from __future__ import annotations

import enum
import math
import queue
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class TransferError(RuntimeError):
    """A transfer failed (peer gone, timeout, stale endpoint)."""


class TransferStatus(enum.Enum):
    PENDING = "pending"
    TRANSFERRING = "transferring"
    DONE = "done"
    FAILED = "failed"


class Transfer(ABC):
    """One pull in flight."""

    @property
    @abstractmethod
    def status(self) -> TransferStatus: ...

    @property
    @abstractmethod
    def error(self) -> str | None: ...

    @abstractmethod
    def wait(self, timeout: float | None = None) -> TransferStatus:
        """Block until DONE or FAILED, or until ``timeout`` seconds pass (then FAILED: timed out)."""


_TERMINAL = (TransferStatus.DONE, TransferStatus.FAILED)
_SPIN_S = 50e-6  # polled backends: busy-poll this long before the first sleep (a sleep costs ~60 us)


class TransferAborted(TransferError):
    """Raised inside a copy when its transfer already ended (timeout, close)."""


class TransferState(Transfer):
    """A ``Transfer`` whose work is done elsewhere (a worker thread, or a backend polled via ``_poll``)."""

    def __init__(self, timeout_s: float, description: str = "", lease_expires_at: float = math.inf) -> None:
        self.timeout_s = timeout_s
        self.description = description
        self.lease_expires_at = lease_expires_at  # wall clock: past it the peer may reuse the blocks
        self.deadline = time.monotonic() + timeout_s
        self._status = TransferStatus.PENDING
        self._error: str | None = None
        self._lock = threading.Lock()  # held while bytes are written and while the state changes
        self._done = threading.Event()

    # -- queries -----------------------------------------------------------------------------------
    @property
    def status(self) -> TransferStatus:
        """The current status (polls the backend and enforces the deadline; never blocks long)."""
        self._refresh()
        return self._status

    @property
    def error(self) -> str | None:
        return self._error

    @property
    def is_terminal(self) -> bool:
        return self._status in _TERMINAL

    # -- waiting -----------------------------------------------------------------------------------
    def wait(self, timeout: float | None = None) -> TransferStatus:
        """Block until DONE or FAILED, at most until the deadline or ``timeout`` seconds (then FAILED)."""
        wait_until = self.deadline if timeout is None else min(self.deadline, time.monotonic() + timeout)
        poll_s = self._poll_interval()
        delay = 1e-5
        spin_until = time.monotonic() + _SPIN_S if poll_s is not None else 0.0
        while True:
            self._refresh()
            if self.is_terminal:
                return self._status
            now = time.monotonic()
            if now >= wait_until:
                self._give_up(now, timeout)
                return self._status
            if poll_s is None:
                self._done.wait(wait_until - now)
            elif now < spin_until:  # small reads finish in microseconds: re-poll before sleeping
                continue
            else:  # backends without completion callbacks: back off from 10 us to poll_s
                self._done.wait(min(delay, wait_until - now))
                delay = min(delay * 2, poll_s)

    def _give_up(self, now: float, timeout: float | None) -> None:
        if now >= self.deadline:
            self.fail(self._timeout_error())
        else:
            self.fail(f"wait() timed out after {timeout:g}s")

    # -- transitions (backends) --------------------------------------------------------------------
    def begin(self) -> bool:
        """PENDING -> TRANSFERRING; False when the transfer already ended (or the lease already expired)."""
        if time.time() >= self.lease_expires_at:
            self.fail(self._lease_error())
        with self._lock:
            if self._status is TransferStatus.PENDING:
                self._status = TransferStatus.TRANSFERRING
            return not self.is_terminal

    def succeed(self) -> bool:
        """End DONE (unless already terminal, or past the deadline: then FAILED); True when DONE now."""
        if time.monotonic() > self.deadline:
            self.fail(self._timeout_error())
            return False
        if time.time() >= self.lease_expires_at:  # the peer may have reused the blocks mid-copy
            self.fail(self._lease_error())
            return False
        return self._finish(TransferStatus.DONE, None)

    def fail(self, error: str) -> bool:
        """End FAILED with ``error`` (unless already terminal); True when this call ended it."""
        return self._finish(TransferStatus.FAILED, error)

    @contextmanager
    def writing(self) -> Iterator[None]:
        """Hold the transfer while one chunk of bytes is written; raise if it already ended."""
        if time.monotonic() > self.deadline:
            self.fail(self._timeout_error())
        with self._lock:
            if self.is_terminal:
                raise TransferAborted(self._error or "transfer already ended")
            yield

    # -- backend hooks -----------------------------------------------------------------------------
    def _poll(self) -> None:
        """Advance a polled backend (NIXL: check_xfer_state). Default: nothing, a worker finishes it."""

    def _poll_interval(self) -> float | None:
        """Max sleep between polls for polled backends; None when a worker signals completion."""
        return None

    def _on_finish(self, status: TransferStatus) -> None:
        """Release backend resources once terminal (called once, outside the lock)."""

    # -- internals ---------------------------------------------------------------------------------
    def _refresh(self) -> None:
        if self.is_terminal:
            return
        self._poll()
        if not self.is_terminal and time.monotonic() >= self.deadline:
            self.fail(self._timeout_error())

    def _lease_error(self) -> str:
        return "the handle's lease expired before the transfer completed (the peer may reuse the blocks)"

    def _timeout_error(self) -> str:
        return f"timed out after {self.timeout_s:g}s (TransportConfig.timeout_s)"

    def _finish(self, status: TransferStatus, error: str | None) -> bool:
        with self._lock:
            if self.is_terminal:
                return False
            self._status, self._error = status, error
        self._on_finish(status)
        self._done.set()
        return True

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.description}, {self._status.value}, error={self._error!r})"


class WorkerThread:
    """One daemon thread running submitted jobs in order (a transport's copy or receive loop)."""

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, job: Callable[[], None]) -> None:
        self._jobs.put(job)

    def stop(self, timeout: float = 5.0) -> None:
        """Finish queued jobs, then end the thread (idempotent)."""
        if self._thread.is_alive():
            self._jobs.put(None)
            if threading.current_thread() is not self._thread:
                self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            job()  # jobs catch their own errors and end their transfer FAILED
