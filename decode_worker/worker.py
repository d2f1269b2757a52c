"""The decode worker: pulls a request's KV, joins it to the running batch, and streams its tokens.

Queues a request passes through, in order:
1. ``generate()`` (the replica's event loop) registers a per-request asyncio queue in ``_streams``.
2. Admission on the engine thread: ``allocate_blocks`` reserves local blocks for the prompt's KV.
3. The pull runs in a helper thread: ``transport.read_blocks(handle, local_ids).wait(timeout)``.
   DONE -> ``add_prefilled_request`` (the sequence joins the continuous batch with its KV in place).
   FAILED (peer gone, timeout, layout mismatch) -> ``free_allocated`` and ``add_request`` with the
   output tokens the client already has (``DecodeRequest.known_output_ids``): prompt and those are
   recomputed here and sampling goes on at the next output position (position-seeded, so the tokens
   are the ones the prefill side's KV would have produced).
   Either way the engine detokenizes the first token again (a stop string may span it) and drops the
   ``DecodeRequest.num_chars_sent`` characters of text the prefill side already sent.
   The first message ``generate`` yields is the transfer report: the caller then releases the prefill
   side's pinned blocks.
4. Every engine step's outputs cross to the event loop in one ``call_soon_threadsafe`` and land in the
   request queues; ``generate`` yields everything queued since its last yield as ONE chunk, so under
   load a message carries several tokens (the stream is never capped by per-message cost).
5. Finish, cancel (``GeneratorExit``/``CancelledError`` when the caller goes away) or failure: the
   request is aborted on the engine, which frees its blocks.

In colocated mode (``DecodeRequest.handle`` and ``first_token_id`` both None) step 3 is just
``add_request``: the replica prefills and decodes its own request, no transfer.

A migrated stream (``cluster.migration``) arrives as a ``DecodeRequest`` with ``resumed_output_ids``:
the engine joins it with those outputs already counted (``add_prefilled_request(earlier_output_ids=)``
or ``add_request(output_token_ids=)``), so positions, ``max_tokens`` and the text continue.
While a stream waits (admission, the pull, no new token) ``generate`` yields a heartbeat chunk every
``heartbeat_interval_s``, so the ingress tells a hung replica (no message at all) from a slow one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from worker_common.engine_loop import EngineLoop, layout_of
from worker_common.messages import DecodeChunk, DecodeRequest, NoKVSpaceError
from worker_common.protocols import WorkerEngine, WorkerTransport

if TYPE_CHECKING:
    from engine.outputs import EngineStats, RequestOutput
    from kv_transfer.base import KVHandle

logger = logging.getLogger(__name__)

__all__ = ["DecodeWorker", "NoKVSpaceError"]

T = TypeVar("T")


@dataclass
class _Stream:
    queue: asyncio.Queue[RequestOutput | BaseException] = field(default_factory=asyncio.Queue)


class DecodeWorker:
    """Plain decode logic around one engine and one KV transport (no Ray here)."""

    def __init__(
        self,
        engine: WorkerEngine,
        transport: WorkerTransport | None,
        worker_id: str,
        backend: str,
        transfer_timeout_s: float,
        dtype: str,
        block_size: int,
        coalesce_every_streams: int = 8,
        coalesce_max_wait_s: float = 0.1,
        pull_delay_s: float = 0.0,
        heartbeat_interval_s: float = 0.25,
    ) -> None:
        self.engine = engine
        self.heartbeat_interval_s = heartbeat_interval_s
        self.pull_delay_s = pull_delay_s  # test hook (kv_transfer.test_pull_delay_s): 0 in production
        self.coalesce_every_streams = coalesce_every_streams
        self.coalesce_max_wait_s = coalesce_max_wait_s
        self.transport = transport  # None in colocated mode: nothing is ever pulled
        if transport is not None:
            transport.register(engine.kv_cache, layout_of(engine, dtype, block_size))
        self.worker_id = worker_id
        self.backend = backend
        self.transfer_timeout_s = transfer_timeout_s
        self._streams: dict[str, _Stream] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self.num_recomputed = 0
        self.engine_loop = EngineLoop(engine, self._on_outputs, None, self._on_failure, name="decode-engine")
        self.engine_loop.start()

    async def generate(self, work: DecodeRequest) -> AsyncIterator[DecodeChunk]:
        """Admit ``work`` (pull or compute its KV) and yield its tokens, coalesced per yield."""
        self._loop = asyncio.get_running_loop()
        request_id = work.request.request_id
        stream = _Stream()
        self._streams[request_id] = stream
        is_finished = False
        admission = asyncio.ensure_future(self._admit(work, stream))
        try:
            while not admission.done():  # a pull may take up to the transfer timeout: stay heard
                await asyncio.wait((admission,), timeout=self.heartbeat_interval_s)
                if not admission.done():
                    yield self._heartbeat()
            yield admission.result()
            while not is_finished:
                items = await self._next_items(stream)
                if not items:
                    yield self._heartbeat()
                    continue
                chunk = self._coalesce(items, stream)
                is_finished = chunk.finished
                if chunk.token_ids or chunk.text or is_finished:
                    yield chunk
        finally:
            admission.cancel()
            self._streams.pop(request_id, None)
            if not is_finished:  # cancelled or failed: abort frees running blocks and reserved ones alike
                self.engine_loop.call(lambda engine: engine.abort_request(request_id))

    def _heartbeat(self) -> DecodeChunk:
        return DecodeChunk([], replica_id=self.worker_id, is_heartbeat=True)

    def live_request_ids(self) -> set[str]:
        """Requests whose client stream is open (any thread: copied whole; the KV review's orphans are the
        requests the engine still holds without one)."""
        return set(self._streams)

    def stats(self) -> EngineStats:
        """The latest ``EngineStats`` snapshot (refreshed by the engine loop)."""
        return self.engine_loop.stats

    def close(self) -> None:
        self.engine_loop.stop()
        if self.transport is not None:
            self.transport.close()

    # ---- admission ------------------------------------------------------------------------------

    async def _admit(self, work: DecodeRequest, stream: _Stream) -> DecodeChunk:
        request = work.request
        params = request.sampling.to_engine(work.num_chars_sent)
        prompt = list(request.prompt_token_ids)
        started = time.perf_counter()
        known = list(work.known_output_ids)  # recomputed with the prompt; sampling goes on after them
        if work.handle is None or work.first_token_id is None:
            await self._call(
                lambda engine: engine.add_request(
                    request.request_id, prompt, params, tenant=request.tenant, output_token_ids=known
                )
            )
            return DecodeChunk(
                [], replica_id=self.worker_id, is_transfer_report=True, num_prompt_tokens=len(prompt)
            )
        handle, first_token_id, earlier = work.handle, work.first_token_id, list(work.resumed_output_ids)

        def allocate(engine: WorkerEngine) -> list[int]:
            num_blocks = len(handle.block_ids)
            if not engine.can_allocate_blocks(num_blocks):
                raise NoKVSpaceError(f"decode replica {self.worker_id}: no room for {num_blocks} KV blocks")
            return list(engine.allocate_blocks(request.request_id, handle.num_tokens, request.tenant))

        local_ids = await self._call(allocate)
        # The prompt's KV fills exactly len(local_ids) blocks; a pinned tail block (if any) is not pulled.
        handle = dataclasses.replace(handle, block_ids=tuple(handle.block_ids[: len(local_ids)]))
        if self.pull_delay_s > 0:  # test hook: a window in which a fault test kills the prefill peer
            await asyncio.sleep(self.pull_delay_s)
        error = await asyncio.to_thread(self._pull, handle, local_ids)
        transfer_ms = (time.perf_counter() - started) * 1e3
        if error is None:
            await self._call(
                lambda engine: engine.add_prefilled_request(
                    request.request_id,
                    prompt,
                    first_token_id,
                    local_ids,
                    params,
                    tenant=request.tenant,
                    earlier_output_ids=earlier,
                )
            )
            kv_transport = self.backend
        else:
            logger.warning("KV pull for %s failed (%s): recomputing the prompt", request.request_id, error)
            self.num_recomputed += 1

            def recompute(engine: WorkerEngine) -> None:
                engine.free_allocated(request.request_id)
                engine.add_request(
                    request.request_id, prompt, params, tenant=request.tenant, output_token_ids=known
                )

            await self._call(recompute)
            kv_transport = "recompute"
        return DecodeChunk(
            [], replica_id=self.worker_id, is_transfer_report=True, kv_transport=kv_transport,
            kv_transfer_ms=transfer_ms, num_prompt_tokens=len(prompt), error=error,
        )  # fmt: skip

    def _pull(self, handle: KVHandle, local_ids: list[int]) -> str | None:
        """Pull ``handle``'s blocks into ``local_ids`` (helper thread); the error text, or None when DONE."""
        from kv_transfer.base import TransferStatus

        assert self.transport is not None, "colocated replicas never pull"
        try:
            transfer = self.transport.read_blocks(handle, local_ids)
            status = transfer.wait(self.transfer_timeout_s)
        except Exception as error:  # layout mismatch, stale endpoint, peer gone
            return f"{type(error).__name__}: {error}"
        if status is TransferStatus.DONE:
            return None
        return transfer.error or f"transfer ended {status.value}"

    async def _call(self, fn: Callable[[WorkerEngine], T]) -> T:
        return await asyncio.wrap_future(self.engine_loop.call(fn))

    # ---- streaming ------------------------------------------------------------------------------

    async def _next_items(self, stream: _Stream) -> list[RequestOutput | BaseException]:
        """Wait for the next outputs; under load, keep collecting until the message is worth sending.

        With N streams open on this replica a message waits for ``ceil(N / coalesce_every_streams)``
        tokens (or ``coalesce_max_wait_s``, or the finish): one token per message up to that many
        streams, fewer messages per token above it, so per-message costs (Ray stream item, gRPC
        message) shrink exactly when the replica is busiest. Nothing for ``heartbeat_interval_s``: an
        empty list (the caller sends a heartbeat).
        """
        try:
            async with asyncio.timeout(self.heartbeat_interval_s):
                items = [await stream.queue.get()]
        except TimeoutError:
            return []  # nothing for a heartbeat interval: the caller sends a heartbeat
        target = -(-len(self._streams) // self.coalesce_every_streams)
        if target <= 1:
            return items
        deadline = asyncio.get_running_loop().time() + self.coalesce_max_wait_s
        num_tokens = _num_tokens(items)
        while num_tokens < target and not _is_final(items[-1]):
            try:
                async with asyncio.timeout_at(deadline):
                    items.append(await stream.queue.get())
            except TimeoutError:
                break
            num_tokens = _num_tokens(items)
        return items

    def _coalesce(self, items: list[RequestOutput | BaseException], stream: _Stream) -> DecodeChunk:
        """Merge the first queued item with everything else queued right now into one chunk."""
        while not stream.queue.empty():
            items.append(stream.queue.get_nowait())
        chunk = DecodeChunk([], replica_id=self.worker_id)
        for item in items:
            if isinstance(item, BaseException):
                raise item
            chunk.token_ids.extend(item.new_token_ids)
            chunk.text += item.new_text or ""  # the engine already dropped the text prefill sent
            chunk.num_cached_tokens = max(chunk.num_cached_tokens, int(item.num_cached_tokens or 0))
            if item.finished:
                chunk.finished = True
                chunk.finish_reason = item.finish_reason
        return chunk

    def _on_outputs(self, outputs: list[RequestOutput]) -> None:
        """Engine thread: hand one step's outputs to the event loop in a single callback."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._deliver, outputs)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is not None:
                stream.queue.put_nowait(output)

    def _on_failure(self, error: BaseException) -> None:
        if self._loop is not None:
            failure = RuntimeError(f"engine step failed: {error}")
            self._loop.call_soon_threadsafe(self._fail_all, failure)

    def _fail_all(self, error: BaseException) -> None:
        for stream in self._streams.values():
            stream.queue.put_nowait(error)


def _num_tokens(items: list[RequestOutput | BaseException]) -> int:
    return sum(len(item.new_token_ids) for item in items if not isinstance(item, BaseException))


def _is_final(item: RequestOutput | BaseException) -> bool:
    return isinstance(item, BaseException) or bool(item.finished)
