"""The prefill worker: computes a prompt's KV, samples the first token, and lends the KV to decode.

Queues a request passes through, in order:
1. ``prefill()`` (the replica's event loop) registers an asyncio future in ``_pending`` and posts
   ``add_request(prefill_only=True)`` to the engine thread (``EngineLoop.call``).
2. The engine thread schedules it (chunked prefill, batched with other prompts, prefix cache reuse);
   when its first token comes out, ``_on_outputs`` reads the pinned block ids, starts a lease and
   resolves the future through ``call_soon_threadsafe``.
3. ``prefill()`` returns a ``PrefillResult`` with a ``KVHandle`` (endpoint, block ids, token count,
   layout, lease expiry). The blocks stay pinned until ``release()`` (the decode side has pulled them)
   or ``abort()`` (client gone), or until the lease expires (checked in ``_expire_leases`` on every loop
   turn). Full blocks then stay in the prefix cache for later prompts.

A cancelled ``prefill()`` (the client went away while it was queued or running) aborts the request on
the engine, which frees or unpins its blocks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from kv_transfer.base import KVHandle, TransferEndpoint
from prefill_worker.engine_loop import EngineLoop, layout_of
from prefill_worker.requests import PrefillResult, SamplingSpec, WorkerRequest

logger = logging.getLogger(__name__)


@dataclass
class _PendingPrefill:
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[PrefillResult]
    request: WorkerRequest
    arrival: float  # time.perf_counter() at the replica
    added: float = 0.0  # when the engine thread took the request


def first_token_finish(
    token_id: int,
    sampling: SamplingSpec,
    eos_token_id: int | None,
    num_prompt_tokens: int,
    max_model_len: int,
) -> str | None:
    """Why the request ends with its first token, or None when decoding should go on."""
    if not sampling.ignore_eos and eos_token_id is not None and token_id == eos_token_id:
        return "eos"
    if token_id in sampling.stop_token_ids:
        return "stop"
    if sampling.max_tokens <= 1:
        return "length"
    if num_prompt_tokens + 1 >= max_model_len:
        return "context"
    return None


class PrefillWorker:
    """Plain prefill logic around one engine and one KV transport (no Ray here)."""

    def __init__(
        self,
        engine: Any,
        transport: Any,
        worker_id: str,
        dtype: str,
        block_size: int,
        lease_s: float,
        max_model_len: int,
    ) -> None:
        self.engine = engine
        self.max_model_len = max_model_len
        self.transport = transport
        self.worker_id = worker_id
        self.lease_s = lease_s
        self.endpoint: TransferEndpoint = transport.register(
            engine.kv_cache, layout_of(engine, dtype, block_size)
        )
        self._pending: dict[str, _PendingPrefill] = {}
        self._leases: dict[str, float] = {}  # request id -> lease expiry (time.time()); engine thread only
        self.num_leases_expired = 0
        self.engine_loop = EngineLoop(
            engine, self._on_outputs, self._expire_leases, self._on_failure, name="prefill-engine"
        )
        self.engine_loop.start()

    async def prefill(self, request: WorkerRequest) -> PrefillResult:
        """Prefill ``request`` and return its first token with a handle on its pinned KV."""
        loop = asyncio.get_running_loop()
        pending = _PendingPrefill(loop, loop.create_future(), request, time.perf_counter())
        self._pending[request.request_id] = pending
        params = request.sampling.to_engine()

        def add(engine: Any) -> None:
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
            self.engine_loop.call(lambda engine: self._drop(engine, request.request_id))
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
        await asyncio.wrap_future(self.engine_loop.call(lambda engine: self._drop(engine, request_id)))

    def stats(self) -> Any:
        """The latest ``EngineStats`` snapshot (refreshed by the engine loop)."""
        return self.engine_loop.stats

    @property
    def num_pinned(self) -> int:
        return len(self._leases)

    def close(self) -> None:
        self.engine_loop.stop()
        self.transport.close()

    # ---- engine thread -------------------------------------------------------------------------

    def _on_outputs(self, outputs: list[Any]) -> None:
        for output in outputs:
            if not output.finished:
                continue
            pending = self._pending.pop(output.request_id, None)
            if pending is None:  # aborted meanwhile: _drop has run or will run
                continue
            result = self._result_for(output, pending)
            pending.loop.call_soon_threadsafe(_resolve, pending.future, result)

    def _result_for(self, output: Any, pending: _PendingPrefill) -> PrefillResult:
        request = pending.request
        now = time.perf_counter()
        first_token_id = int(output.new_token_ids[0])
        num_prompt_tokens = len(request.prompt_token_ids)
        # "stop"/"eos" from the engine are real; its "length" also marks the end of every prefill_only run.
        finish_reason = output.finish_reason if output.finish_reason in ("stop", "eos") else None
        finish_reason = finish_reason or first_token_finish(
            first_token_id,
            request.sampling,
            self.engine.tokenizer.eos_token_id,
            num_prompt_tokens,
            self.max_model_len,
        )
        handle = None
        if finish_reason is None:
            block_ids = tuple(self.engine.pinned_blocks(request.request_id))
            expires = time.time() + self.lease_s
            self._leases[request.request_id] = expires
            handle = KVHandle(request.request_id, self.endpoint, block_ids, num_prompt_tokens, expires)
        else:
            self.engine.release_pinned(request.request_id)
        return PrefillResult(
            request_id=request.request_id,
            replica_id=self.worker_id,
            first_token_id=first_token_id,
            finish_reason=finish_reason,
            handle=handle,
            num_prompt_tokens=num_prompt_tokens,
            num_cached_tokens=int(output.num_cached_tokens),
            queue_ms=(pending.added - pending.arrival) * 1e3,
            prefill_ms=(now - pending.added) * 1e3,
        )

    def _unpin(self, engine: Any, request_id: str) -> bool:
        if self._leases.pop(request_id, None) is None:
            return False
        engine.release_pinned(request_id)
        return True

    def _drop(self, engine: Any, request_id: str) -> None:
        self._leases.pop(request_id, None)
        engine.abort_request(request_id)

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
