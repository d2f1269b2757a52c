"""One request's path through the cluster, as the ingress drives it (docs/request-path.md).

disaggregated: choose a prefill replica -> ``prefill`` (first token + KV handle) -> stream the first
token to the client at once (TTFT) -> choose a decode replica -> stream ``generate`` from it; its first
message reports the pull, and the ingress then tells the prefill replica that pinned the blocks to
release them. colocated: one decode replica does everything (``DecodeRequest`` without a handle).
The text comes from the engines (``PrefillResult.first_text``, ``DecodeChunk.text``): the ingress never
detokenizes.

A client cancel or disconnect arrives as ``asyncio.CancelledError`` wherever the path is waiting: the
decode stream is cancelled (the decode replica aborts and frees its blocks), and a prefill that is still
running or pinned is aborted on its replica (fire-and-forget, so the cancel itself cannot cancel it).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from cluster.admission import KVAdmission, Ticket
from cluster.attribution import CacheAttributionRecorder
from cluster.config import ClusterConfig
from cluster.metrics import IngressMetrics, RequestFacts
from cluster.migration import (
    RESUME_PREFILL_SAMPLING,
    DecodeReplicaLost,
    MigrationEvent,
    MigrationLog,
    StreamProgress,
    decode_reports_within,
    watch_decode,
)
from cluster.model_info import ModelInfo
from cluster.replica_directory import REPLICA_DIRECTORY, ReplicaView
from cluster.route_policy import RoutePolicy
from cluster.tracing import NULL_SPAN, TraceParent, make_tracer
from cluster.validation import ValidRequest
from kv_transfer.base import KVHandle
from protos import pdserve_pb2 as pb
from worker_common.messages import CacheAttribution, DecodeChunk, DecodeRequest, PrefillResult, WorkerRequest

logger = logging.getLogger(__name__)

FINISH_REASONS = {
    "length": pb.FINISH_REASON_LENGTH,
    "stop": pb.FINISH_REASON_STOP,
    "eos": pb.FINISH_REASON_EOS,
    "context": pb.FINISH_REASON_CONTEXT,
}

PREFILL_DEPLOYMENT = "PrefillDeployment"
DECODE_DEPLOYMENT = "DecodeDeployment"

_Piece = tuple[list[int], str, str | None]  # new token ids, their text, finish reason or None


@dataclass
class _Trace:
    """Timings and facts of one request, filled in as it moves."""

    arrival: float = field(default_factory=time.perf_counter)
    first_sent: float | None = None
    last_sent: float | None = None
    queue_ms: float = 0.0
    prefill_ms: float = 0.0
    kv_transfer_ms: float = 0.0
    num_cached_tokens: int = 0
    num_output_tokens: int = 0
    route: pb.RouteInfo = field(default_factory=pb.RouteInfo)
    message_gaps: list[tuple[float, int]] = field(default_factory=list)  # (s since previous, its tokens)
    kv_transfer_bytes: int = 0  # blocks handed to decode x block bytes
    has_prefill_phase: bool = False
    has_kv_transfer: bool = False
    span: Any = NULL_SPAN  # cluster.tracing.RequestSpan: the ingress span (a no-op object when off)
    cache: CacheAttribution | None = None  # the prefill's cache attribution with the route (disaggregated)
    ticket: Ticket | None = None  # cluster.admission: the KV blocks reserved for the request


class RequestPath:
    """Drives requests through the pools; one per ingress replica."""

    def __init__(self, config: ClusterConfig, model: ModelInfo, prefill: Any, decode: Any) -> None:
        self.config = config
        self.model = model
        self.prefill = prefill  # DeploymentHandle of PrefillDeployment (None when colocated)
        self.decode = decode  # DeploymentHandle of DecodeDeployment
        self.decode_stream = decode.options(stream=True)
        self.policy = RoutePolicy(config.router)
        self.metrics = IngressMetrics(config.metrics)  # recorded in _finish; served on HTTP /metrics
        self.attribution = CacheAttributionRecorder(config.attribution, self.metrics.registry)
        self.tracer = make_tracer(config.tracing, "ingress", model=model.name)  # NULL_TRACER when off
        self._background: set[asyncio.Task[Any]] = set()  # fire-and-forget notices kept alive here
        self.migration = MigrationLog(config.migration)  # decode-replica losses and the moves they caused
        self.admission = KVAdmission(
            config.admission,
            config.engine.block_size,
            config.worker_pools,
            self._kv_blocks_per_replica,
            config.ingress.num_replicas,
        )
        self.metrics.watch_reliability(self.migration, self.admission)  # migrations, refusals, queue depth

    async def generate(
        self, request: ValidRequest, parent: TraceParent | None = None
    ) -> AsyncIterator[pb.GenerateResponse]:
        """Yield the responses of one validated request (the last one carries usage and timings);
        ``parent``: the caller's trace headers (``cluster.tracing.grpc_parent`` / ``http_parent``)."""
        trace = _Trace()
        internal_id = f"{request.request_id}#{uuid.uuid4().hex[:8]}"  # unique in the engines
        trace.span = self.tracer.start_request(request, parent, internal_id)
        work = WorkerRequest(
            internal_id,
            request.prompt_token_ids,
            request.sampling,
            request.tenant,
            time.time(),
            trace.span.context,
        )
        source: Any
        if self.config.is_colocated:
            source = self._colocated(work, trace)
        else:
            source = self._disaggregated(work, trace)
        try:
            trace.ticket = await self.admission.admit(
                len(request.prompt_token_ids), request.sampling.max_tokens
            )
            async for response in self._responses(source, request, trace):
                yield response
        finally:
            await source.aclose()  # runs the path's cleanup now, even when we were cancelled at a yield
            if trace.ticket is not None:
                trace.ticket.release()  # cluster.admission: the request's KV reservation ends here
            trace.span.end()  # no-op after _finish; else the span ends as failed or cancelled

    async def _responses(
        self,
        source: AsyncIterator[_Piece],
        request: ValidRequest,
        trace: _Trace,
    ) -> AsyncIterator[pb.GenerateResponse]:
        num_output_tokens = 0
        async for token_ids, text, finish_reason in source:
            num_output_tokens += len(token_ids)
            response = pb.GenerateResponse(request_id=request.request_id, token_ids=token_ids, text=text)
            now = time.perf_counter()
            if trace.first_sent is None:
                trace.first_sent = now
            elif token_ids:
                trace.message_gaps.append((now - (trace.last_sent or now), len(token_ids)))
            trace.last_sent = now
            trace.num_output_tokens = num_output_tokens
            if finish_reason is not None:
                self._finish(response, request, trace, finish_reason)
            yield response
            if finish_reason is not None:
                return

    # ---- the two paths: each yields (new token ids, their text, finish reason or None) -------------

    async def _disaggregated(self, work: WorkerRequest, trace: _Trace) -> AsyncIterator[_Piece]:
        prefill_views = await self._replicas(PREFILL_DEPLOYMENT, self.prefill)
        decode_views = await self._replicas(DECODE_DEPLOYMENT, self.decode)
        choice = self.policy.choose_prefill(work.prompt_token_ids, work.tenant, prefill_views, decode_views)
        trace.span.routed("prefill", choice.replica_id, choice.reason)
        result = await self._prefill(work, choice.replica_id)
        trace.prefill_ms = result.prefill_ms
        trace.queue_ms = (time.perf_counter() - trace.arrival) * 1e3 - result.prefill_ms
        trace.num_cached_tokens = result.num_cached_tokens
        trace.cache = result.cache.with_route(choice.reason)
        trace.route.prefill_replica = result.replica_id
        trace.route.reason = f"prefill={choice.reason}"
        trace.has_prefill_phase = True
        if not result.is_prefilled:  # the first token ended it; the prefill replica unpinned at once
            yield [result.first_token_id], result.first_text, result.finish_reason
            return
        assert result.handle is not None
        is_handed_over = False  # from then on _decode releases or aborts the pinned blocks
        try:
            yield [result.first_token_id], result.first_text, None
            decode_views = self._healthy(await self._replicas(DECODE_DEPLOYMENT, self.decode))
            decode_choice = self.policy.choose_decode(len(result.handle.block_ids), decode_views)
            trace.kv_transfer_bytes = _handle_bytes(result.handle)
            trace.route.reason += f" decode={decode_choice.reason}"
            item = DecodeRequest(work, result.first_token_id, result.handle, len(result.first_text))
            progress = StreamProgress([result.first_token_id], len(result.first_text))
            is_handed_over = True
            async for piece in self._decode(work, item, decode_choice.replica_id, result, trace, progress):
                yield piece
        finally:
            if not is_handed_over:  # cancelled at the first token: nothing may stay pinned
                self._notify_prefill("abort", result)

    async def _colocated(self, work: WorkerRequest, trace: _Trace) -> AsyncIterator[_Piece]:
        decode_views = self._healthy(await self._replicas(DECODE_DEPLOYMENT, self.decode))
        expected_blocks = -(-len(work.prompt_token_ids) // self.config.engine.block_size)
        choice = self.policy.choose_decode(expected_blocks, decode_views)
        trace.route.reason = f"colocated={choice.reason}"
        trace.span.routed("colocated", choice.replica_id, choice.reason)
        item = DecodeRequest(work, None, None)
        async for piece in self._decode(work, item, choice.replica_id, None, trace, StreamProgress()):
            yield piece

    # ---- decoding, and moving a stream when its decode replica is lost (cluster.migration) ---------

    async def _decode(
        self,
        work: WorkerRequest,
        item: DecodeRequest,
        replica_id: str | None,
        result: PrefillResult | None,
        trace: _Trace,
        progress: StreamProgress,
    ) -> AsyncIterator[_Piece]:
        """Stream ``item`` from a decode replica; when it is lost, resume on another (limit in config)."""
        num_losses = 0
        event: MigrationEvent | None = None
        while True:
            try:
                async for chunk in self._decode_stream(item, replica_id, result, trace):
                    if event is not None and event.outcome == "moving":
                        event.resumed, event.to_replica = time.time(), chunk.replica_id
                        event.outcome = "resumed"
                    piece = _piece_of(chunk)
                    progress.add(piece[0], piece[1])
                    yield piece
                    if chunk.finished:
                        return
                raise DecodeReplicaLost(replica_id or "", "the stream ended before its finish", time.time())
            except DecodeReplicaLost as loss:
                num_losses += 1
                event = self.migration.on_loss(work.request_id, loss, progress, num_losses)
                logger.warning("request %s: %s; migrating (%d)", work.request_id, loss, num_losses)
                trace.route.reason += f" migrated_from={loss.replica_id}"
                item, replica_id, result = await self._resume(work, progress, event)

    async def _decode_stream(
        self, item: DecodeRequest, replica_id: str | None, result: PrefillResult | None, trace: _Trace
    ) -> AsyncIterator[DecodeChunk]:
        """One decode replica's stream of ``item`` (``DecodeReplicaLost`` when it breaks or goes silent);
        releases ``result``'s pinned prefill blocks once the replica pulled them, aborts them otherwise."""
        is_released = result is None
        stream = self.decode_stream.generate.remote(item, target_replica_id=replica_id)
        try:
            timeout_s = self.config.migration.heartbeat_timeout_s
            is_reporting = decode_reports_within(timeout_s)  # no message yet + replica reporting: queued
            async for chunk in watch_decode(stream, timeout_s, replica_id or "", is_reporting):
                if chunk.is_transfer_report:
                    self._on_transfer(chunk, trace)
                    if result is not None:
                        self._notify_prefill("release", result)
                        is_released = True
                    continue
                if self.config.is_colocated:
                    trace.num_cached_tokens = max(trace.num_cached_tokens, chunk.num_cached_tokens)
                yield chunk
                if chunk.finished:
                    return
        finally:
            stream.cancel()
            if not is_released:  # cancelled or failed before the decode side pulled
                self._notify_prefill("abort", result)

    async def _resume(
        self, work: WorkerRequest, progress: StreamProgress, event: MigrationEvent
    ) -> tuple[DecodeRequest, str | None, PrefillResult | None]:
        """The request again, from what the client has: re-prefill prompt + sent tokens (all but the
        last) on the prefill pool, or let the decode replica recompute them (colocated)."""
        resumed = dataclasses.replace(work, request_id=_fresh_id(work.request_id))
        sent = tuple(progress.token_ids)
        views = await self._replicas(DECODE_DEPLOYMENT, self.decode)
        others = [view for view in views if view.replica_id != event.from_replica]
        decode_views = self.migration.healthy(others) or others  # a suspect, but not the one just lost
        if not decode_views:
            logger.warning("request %s: no other decode replica known; Serve picks one", work.request_id)
        num_blocks = -(-(len(work.prompt_token_ids) + len(sent)) // self.config.engine.block_size)
        choice = self.policy.choose_decode(num_blocks, decode_views) if decode_views else None
        target = choice.replica_id if choice is not None else None
        if self.config.is_colocated or not sent:
            return DecodeRequest(resumed, None, None, progress.num_chars, sent), target, None
        prompt = work.prompt_token_ids + sent[:-1]
        prefill_work = WorkerRequest(
            resumed.request_id, prompt, RESUME_PREFILL_SAMPLING, work.tenant, time.time(), work.trace_context
        )
        prefill_views = await self._replicas(PREFILL_DEPLOYMENT, self.prefill)
        prefill_choice = self.policy.choose_prefill(prompt, work.tenant, prefill_views, decode_views)
        result = await self._prefill(prefill_work, prefill_choice.replica_id)
        if result.handle is None:
            self._notify_prefill("abort", result)
            raise self.migration.failed(event, f"the re-prefill ended ({result.finish_reason})")
        item = DecodeRequest(resumed, sent[-1], result.handle, progress.num_chars, sent[:-1])
        return item, target, result

    async def _prefill(self, work: WorkerRequest, replica_id: str | None) -> PrefillResult:
        """Prefill ``work`` on ``replica_id``; a cancel or failure on the way aborts it there."""
        try:
            return await self.prefill.prefill.remote(work, target_replica_id=replica_id)
        except BaseException:
            self._notify_prefill("abort", None, work.request_id, replica_id)
            raise

    def _kv_blocks_per_replica(self, pool: str) -> list[int]:
        """Each replica's ``kv_blocks_total`` in ``pool``, from the load reports (the admission budget)."""
        deployment = PREFILL_DEPLOYMENT if pool == "prefill" else DECODE_DEPLOYMENT
        views = REPLICA_DIRECTORY.replicas(deployment)
        return [view.load.kv_blocks_total for view in views if view.load is not None]

    def _healthy(self, views: list[ReplicaView]) -> list[ReplicaView]:
        """Decode replicas not under suspicion (cluster.migration); all of them if none is left."""
        return self.migration.healthy(views) or views

    # ---- helpers ----------------------------------------------------------------------------------

    async def warm_up(self) -> None:
        """Make the handles' routers learn their replicas now, so the first request is routed by policy."""
        try:
            await self._replicas(DECODE_DEPLOYMENT, self.decode)
            if self.prefill is not None:
                await self._replicas(PREFILL_DEPLOYMENT, self.prefill)
        except Exception as error:  # replicas still starting: the first requests will warm up instead
            logger.info("router warm-up deferred: %s", error)

    async def _replicas(self, deployment: str, handle: Any) -> list[ReplicaView]:
        """The pool's replicas and their load reports; the first call through a handle creates its router."""
        views = REPLICA_DIRECTORY.replicas(deployment)
        if not views:
            await handle.replica_stats.remote()
            views = REPLICA_DIRECTORY.replicas(deployment)
        return views

    def _on_transfer(self, chunk: DecodeChunk, trace: _Trace) -> None:
        """The decode replica's first message: where the request runs and how its KV got there."""
        trace.route.decode_replica = chunk.replica_id
        if self.config.is_colocated:
            trace.route.prefill_replica = chunk.replica_id
            if not trace.queue_ms:
                trace.queue_ms = (time.perf_counter() - trace.arrival) * 1e3
            return
        trace.kv_transfer_ms = chunk.kv_transfer_ms
        trace.route.kv_transport = chunk.kv_transport
        trace.has_kv_transfer = True
        if trace.ticket is not None:
            trace.ticket.release_prefill()  # the prefill pool's blocks are unpinned now

    def _notify_prefill(
        self,
        method: str,
        result: PrefillResult | None,
        request_id: str = "",
        fallback_replica: str | None = None,
    ) -> None:
        """Send release/abort to the prefill replica holding the request, without waiting for it."""
        request_id = result.request_id if result is not None else request_id
        replica = result.replica_id if result is not None else fallback_replica
        call = getattr(self.prefill, method).remote(request_id, target_replica_id=replica)

        async def wait() -> None:
            try:
                await call
            except Exception as error:  # a dead replica's lease already ended; nothing else to do
                logger.warning("%s of %s on %s failed: %s", method, request_id, replica, error)

        task = asyncio.get_running_loop().create_task(wait())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _finish(
        self, response: pb.GenerateResponse, request: ValidRequest, trace: _Trace, reason: str
    ) -> None:
        response.finish_reason = FINISH_REASONS.get(reason, pb.FINISH_REASON_UNSPECIFIED)
        response.usage.prompt_tokens = len(request.prompt_token_ids)
        response.usage.cached_tokens = trace.num_cached_tokens
        response.usage.completion_tokens = trace.num_output_tokens
        first = trace.first_sent or trace.arrival
        last = trace.last_sent or first
        timings = response.timings
        timings.queue_ms = max(0.0, trace.queue_ms)
        timings.prefill_ms = trace.prefill_ms
        timings.kv_transfer_ms = trace.kv_transfer_ms
        timings.ttft_ms = (first - trace.arrival) * 1e3
        timings.mean_tpot_ms = (
            (last - first) * 1e3 / (trace.num_output_tokens - 1) if trace.num_output_tokens > 1 else 0.0
        )
        timings.e2e_ms = (last - trace.arrival) * 1e3
        response.route.CopyFrom(trace.route)
        facts = RequestFacts(
            tuple(trace.message_gaps), trace.kv_transfer_bytes, trace.has_prefill_phase, trace.has_kv_transfer
        )
        self.attribution.record(response, trace.cache)  # response.cache, attribution metrics, hit-rate check
        self.metrics.record(response, facts)
        trace.span.finish(response)


def _handle_bytes(handle: KVHandle) -> int:
    """The KV bytes a handle lends: its blocks x block bytes (what a pull moves at most)."""
    return len(handle.block_ids) * handle.layout.bytes_per_token * handle.layout.block_size


def _fresh_id(internal_id: str) -> str:
    """Another internal id for the same client request (``"<client id>#<8 hex>"``): a resumed request
    is new to the engines it visits."""
    return f"{internal_id.rpartition('#')[0] or internal_id}#{uuid.uuid4().hex[:8]}"


def _piece_of(chunk: DecodeChunk) -> _Piece:
    return chunk.token_ids, chunk.text, (chunk.finish_reason or "length") if chunk.finished else None
