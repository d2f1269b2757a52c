"""One engine, one background thread: commands -> schedule/run (``engine.step``) -> deliver outputs.

Both worker kinds (prefill and decode) own exactly one ``LLMEngine`` and never touch it from another
thread. Everything else (Serve's async methods on the replica's event loop) talks to it through
``EngineLoop.call(fn)``: ``fn(engine)`` runs on the engine thread between two steps and its result
comes back as a ``concurrent.futures.Future`` (``asyncio.wrap_future`` to await it). Outputs of each
step go to ``on_outputs`` (still on the engine thread; the workers hand them to the event loop with
one ``call_soon_threadsafe`` per step). ``housekeeping`` runs after every step and at least every
``idle_wait_s`` (prefill leases expire there). ``stats`` is a snapshot refreshed by the loop, so
readers never touch the engine.

Both workers import this module: it is the one engine loop they share.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from kv_transfer.base import LayoutSignature
from worker_common.protocols import WorkerEngine

if TYPE_CHECKING:
    from engine.outputs import EngineStats, RequestOutput

logger = logging.getLogger(__name__)

T = TypeVar("T")

OutputsCallback = Callable[[list["RequestOutput"]], None]


class EngineLoop:
    """Owns the engine thread. ``call`` is thread-safe; everything else runs on the thread."""

    def __init__(
        self,
        engine: WorkerEngine,
        on_outputs: OutputsCallback,
        housekeeping: Callable[[], None] | None = None,
        on_failure: Callable[[BaseException], None] | None = None,
        idle_wait_s: float = 0.02,
        name: str = "engine-loop",
        gather: tuple[float, float] = (0.0, 0.0),
    ) -> None:
        """``gather``: ``(gap_s, max_s)``; when a command wakes an idle engine, keep taking commands while
        the next one comes within ``gap_s`` of the last, for at most ``max_s``, before the first step: a
        burst of requests then starts in one forward instead of the first alone (off: ``(0, 0)``)."""
        self.engine = engine
        self._gather_gap_s, self._gather_max_s = gather
        self._on_outputs = on_outputs
        self._housekeeping = housekeeping
        self._on_failure = on_failure
        self._idle_wait_s = idle_wait_s
        self._commands: queue.SimpleQueue[
            tuple[Callable[[WorkerEngine], Any], concurrent.futures.Future[Any]]
        ] = queue.SimpleQueue()
        self._stopping = threading.Event()
        self.stats: EngineStats = engine.stats()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the thread to finish its current step and exit."""
        self._stopping.set()
        self._thread.join(timeout)

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def call(self, fn: Callable[[WorkerEngine], T]) -> concurrent.futures.Future[T]:
        """Run ``fn(engine)`` on the engine thread before its next step."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._commands.put((fn, future))
        return future

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                was_idle = not self.engine.has_unfinished_requests()
                self._drain_commands(block=was_idle)
                if was_idle and self._gather_max_s > 0 and self.engine.has_unfinished_requests():
                    self._gather()
                if self.engine.has_unfinished_requests():
                    outputs = self.engine.step()
                    if outputs:
                        self._on_outputs(outputs)
                if self._housekeeping is not None:
                    self._housekeeping()
                self.stats = self.engine.stats()
            except Exception as error:  # the loop must outlive one bad step: report and go on
                logger.exception("engine step failed")
                if self._on_failure is not None:
                    self._on_failure(error)
                time.sleep(self._idle_wait_s)

    def _gather(self) -> None:
        """Take the rest of a burst of commands (``gather``) before the first step after idling."""
        deadline = time.monotonic() + self._gather_max_s
        while (left := deadline - time.monotonic()) > 0:
            if not self._drain_commands(block=True, timeout=min(self._gather_gap_s, left)):
                return

    def _drain_commands(self, block: bool, timeout: float | None = None) -> bool:
        """Run the queued commands (waiting up to ``timeout``, default ``idle_wait_s``, for the first when
        ``block``); whether there was any."""
        try:
            wait = self._idle_wait_s if timeout is None else timeout
            item = self._commands.get(timeout=wait) if block else self._commands.get_nowait()
        except queue.Empty:
            return False
        while True:
            fn, future = item
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(self.engine))
                except BaseException as error:
                    future.set_exception(error)
            try:
                item = self._commands.get_nowait()
            except queue.Empty:
                return True


def layout_of(engine: WorkerEngine, dtype: str, block_size: int) -> LayoutSignature:
    """The KV layout signature of ``engine``'s pool ``[num_blocks, layers, 2, block, kv_heads, head_dim]``."""
    _, num_layers, _, _, num_kv_heads, head_dim = engine.kv_cache.shape
    return LayoutSignature(
        model_id=engine.layout_fingerprint(),
        dtype=dtype,
        block_size=block_size,
        num_layers=int(num_layers),
        num_kv_heads=int(num_kv_heads),
        head_dim=int(head_dim),
    )
