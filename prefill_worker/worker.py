"""The prefill worker: computes a prompt's KV, samples the first token, and lends the KV to decode.

Queues a request passes through, in order:
1. ``prefill()`` (the replica's event loop) registers an asyncio future in ``_pending`` and posts
   ``add_request(prefill_only=True)`` to the engine thread (``EngineLoop.call``).
2. The engine thread schedules it (chunked prefill, batched with other prompts, prefix cache reuse);
   when its first token comes out, the engine says why it left: "prefilled" (decode goes on) or the stop
   rule that token met (the stop rules live in the engine only). ``_on_outputs`` then starts a lease on
   the pinned blocks (prefilled) or unpins them at once (ended), and resolves the future through
   ``call_soon_threadsafe``.
3. ``prefill()`` returns a ``PrefillResult`` with a ``KVHandle`` (endpoint, block ids, token count,
   layout, lease expiry) in ``_leases``. The blocks stay pinned until ``release()`` (the decode side has
   pulled them) or ``abort()`` (client gone), or until the lease expires (checked in ``_expire_leases``
   on every loop turn). Full blocks then stay in the prefix cache for later prompts.

A cancelled ``prefill()`` (the client went away while it was queued or running) aborts the request on
the engine, which frees or unpins its blocks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kv_transfer.base import KVHandle, TransferEndpoint
from worker_common.engine_loop import EngineLoop, layout_of
from worker_common.messages import CacheAttribution, PrefillResult, WorkerRequest
from worker_common.prefix_summary import PrefixSummaryBuilder
from worker_common.protocols import WorkerEngine, WorkerTransport

if TYPE_CHECKING:
    from engine.outputs import EngineStats, RequestOutput

logger = logging.getLogger(__name__)

# A burst of prompts reaching an idle prefill engine starts in one forward: the loop takes arrivals
# while the next comes within 5 ms, for at most 50 ms (EngineLoop ``gather``). A lone prompt waits 5 ms
# (a 128-token SmolLM2 prefill takes 100-140 ms of CPU); 32 at once went as 1 + 16 + 15 (the first alone,
# then two full forwards), which left the decode replica stepping one sequence for seconds
# (docs/benchmarks.md, issue 12 acc 6).
PREFILL_GATHER_GAP_S = 0.005
PREFILL_GATHER_MAX_S = 0.05


@dataclass
class _PendingPrefill:
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[PrefillResult]
    request: WorkerRequest
    arrival: float  # time.perf_counter() at the replica
    added: float = 0.0  # when the engine thread took the request


class PrefillWorker:
    """Plain prefill logic around one engine and one KV transport (no Ray here)."""

    def __init__(
        self,
        engine: WorkerEngine,
        transport: WorkerTransport,
        worker_id: str,
        dtype: str,
        block_size: int,
        lease_s: float,
    ) -> None:
        self.engine = engine
        self.transport = transport
        self.worker_id = worker_id
        self.lease_s = lease_s
        self.block_size = block_size
        self.endpoint: TransferEndpoint = transport.register(
            engine.kv_cache, layout_of(engine, dtype, block_size)
        )
        self._pending: dict[str, _PendingPrefill] = {}
        self._leases: dict[str, float] = {}  # request id -> lease expiry (time.time()); engine thread only
        self.num_leases_expired = 0
        self.prefix_summary = PrefixSummaryBuilder(block_size)  # for the router: worker_common.prefix_summary
        self.engine_loop = EngineLoop(
            engine,
            self._on_outputs,
            self._housekeeping,
            self._on_failure,
            name="prefill-engine",
            gather=(PREFILL_GATHER_GAP_S, PREFILL_GATHER_MAX_S),
        )
        self.engine_loop.start()

    async def prefill(self, request: WorkerRequest) -> PrefillResult:
        """Prefill ``request`` and return its first token with a handle on its pinned KV."""
        loop = asyncio.get_running_loop()
        pending = _PendingPrefill(loop, loop.create_future(), request, time.perf_counter())
        self._pending[request.request_id] = pending
        params = request.sampling.to_engine()

        def add(engine: WorkerEngine) -> None:
            pending.added = time.perf_counter()
            engine.add_request(
                request.request_id,
                list(request.prompt_token_ids),
                params,
                tenant=request.tenant,
                prefill_only=True,
            )

        try:
            await asyncio.wrap_future(self.engine_loop.call(add))
            return await pending.future
        except BaseException:
            # Cancelled (client gone) or failed: nothing may stay pinned or queued for this request.
            self._pending.pop(request.request_id, None)
            self.engine_loop.call(lambda engine: self._abort(engine, request.request_id))
            raise

    async def release(self, request_id: str) -> bool:
        """Unpin ``request_id``'s blocks (the decode side has them). Idempotent; False if not pinned."""
        return await asyncio.wrap_future(
            self.engine_loop.call(lambda engine: self._unpin(engine, request_id))
        )

    async def abort(self, request_id: str) -> None:
        """Stop and forget ``request_id`` wherever it is (queued, prefilling or pinned). Idempotent."""
        pending = self._pending.pop(request_id, None)
        if pending is not None and not pending.future.done():
            pending.future.cancel()
        await asyncio.wrap_future(self.engine_loop.call(lambda engine: self._abort(engine, request_id)))

    def stats(self) -> EngineStats:
        """The latest ``EngineStats`` snapshot (refreshed by the engine loop)."""
        return self.engine_loop.stats

    def live_request_ids(self) -> set[str]:
        """Requests with a live caller: a prefill awaited, or pinned KV whose lease has not expired (from
        any thread: each dict is copied whole, atomic under the GIL). The KV review's orphans: the rest."""
        now = time.time()
        return set(self._pending) | {rid for rid, expires in dict(self._leases).items() if expires > now}

    @property
    def num_pinned(self) -> int:
        return len(self._leases)

    def close(self) -> None:
        self.engine_loop.stop()
        self.transport.close()

    # ---- engine thread -------------------------------------------------------------------------

    def _on_outputs(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            if not output.finished:
                continue
            pending = self._pending.pop(output.request_id, None)
            if pending is None:  # aborted meanwhile: _abort has run or will run
                continue
            result = self._result_for(output, pending)
            pending.loop.call_soon_threadsafe(_resolve, pending.future, result)

    def _result_for(self, output: RequestOutput, pending: _PendingPrefill) -> PrefillResult:
        """The engine's answer as a ``PrefillResult``: a lease and a handle when prefilled, else unpinned."""
        request = pending.request
        now = time.perf_counter()
        num_prompt_tokens = len(request.prompt_token_ids)
        handle = None
        self.prefix_summary.note(request.prompt_token_ids, request.tenant)
        if output.is_prefilled:
            block_ids = tuple(self.engine.pinned_blocks(request.request_id))
            expires = time.time() + self.lease_s
            self._leases[request.request_id] = expires
            handle = KVHandle(request.request_id, self.endpoint, block_ids, num_prompt_tokens, expires)
        else:  # the first token ended the request (stop, eos, length, context): nothing to lend
            self.engine.release_pinned(request.request_id)
        return PrefillResult(
            request_id=request.request_id,
            replica_id=self.worker_id,
            first_token_id=int(output.new_token_ids[0]),
            finish_reason=str(output.finish_reason),
            handle=handle,
            num_prompt_tokens=num_prompt_tokens,
            num_cached_tokens=int(output.num_cached_tokens),
            queue_ms=(pending.added - pending.arrival) * 1e3,
            prefill_ms=(now - pending.added) * 1e3,
            first_text=output.new_text or "",
            cache=CacheAttribution.from_miss(output.prefix_miss, self.block_size, self.worker_id),
        )

    def _unpin(self, engine: WorkerEngine, request_id: str) -> bool:
        if self._leases.pop(request_id, None) is None:
            return False
        engine.release_pinned(request_id)
        return True

    def _abort(self, engine: WorkerEngine, request_id: str) -> None:
        """End the lease (if any) and abort: the engine frees, unpins or dequeues the request's blocks."""
        self._leases.pop(request_id, None)
        engine.abort_request(request_id)

    def _housekeeping(self) -> None:
        self._expire_leases()
        self.prefix_summary.refresh(self.engine)

    def _expire_leases(self) -> None:
        if not self._leases:
            return
        now = time.time()
        for request_id in [rid for rid, expires in self._leases.items() if expires <= now]:
            logger.warning("lease of %s expired before a release arrived: unpinning", request_id)
            self.num_leases_expired += 1
            self._unpin(self.engine, request_id)

    def _on_failure(self, error: BaseException) -> None:
        for request_id in list(self._pending):
            pending = self._pending.pop(request_id, None)
            if pending is not None:
                pending.loop.call_soon_threadsafe(_fail, pending.future, error)


def _resolve(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _fail(future: asyncio.Future[Any], error: BaseException) -> None:
    if not future.done():
        future.set_exception(RuntimeError(f"engine step failed: {error}"))
