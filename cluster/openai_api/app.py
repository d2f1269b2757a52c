"""The Starlette application of the OpenAI API over one ``RequestPath`` (the gRPC API's router and pools).

Every route answers in OpenAI's shapes; every failure is an ``ApiError`` (docs/api.md, "HTTP API").
A client that goes away cancels its request wherever it is: while the body is generated, a watcher on
the ASGI ``receive`` channel sees ``http.disconnect`` and cancels the work; once streaming, Starlette's
``StreamingResponse`` does the same. Cancelling the path's generator frees the request's blocks on both
pools, as a gRPC cancel does.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import suppress
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Send

from cluster.metrics import IngressMetrics, PoolLoads
from cluster.openai_api.errors import ApiError, bad_request, from_grpc
from cluster.openai_api.metrics import HttpMetrics
from cluster.openai_api.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    chat_wire,
    completion_wire,
    ignored_fields,
    parse_body,
    validated,
)
from cluster.openai_api.responses import DONE_EVENT, ResponseBuilder, sse_event
from cluster.request_path import RequestPath
from cluster.servicer import status_for
from cluster.tenancy import Tenancy
from cluster.tracing import http_parent
from protos import pdserve_pb2 as pb

logger = logging.getLogger(__name__)

Responses = AsyncIterator[pb.GenerateResponse]
CLIENT_GONE_STATUS = 499  # nginx's "client closed request": counted in metrics, never seen by a client


class ClientGone(Exception):
    """The client disconnected before the response started."""


class _EventStream(StreamingResponse):
    """``StreamingResponse`` that always closes its body iterator, even when cancelled at a ``send``
    (Starlette leaves a generator suspended at a ``yield`` to the garbage collector)."""

    async def stream_response(self, send: Send) -> None:
        try:
            await super().stream_response(send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()  # type: ignore[attr-defined]


class OpenAIApp:
    """The routes; ``pools_ready`` is the gRPC servicer's readiness check (every pool has a live replica)."""

    def __init__(
        self,
        path: RequestPath,
        pools_ready: Callable[[], Awaitable[bool]],
        max_body_bytes: int,
        ingress_metrics: IngressMetrics | None = None,
        pool_stats: Callable[[], Awaitable[PoolLoads]] | None = None,
        tenancy: Tenancy | None = None,
    ) -> None:
        """``ingress_metrics``: the ingress's registry, which ``/metrics`` serves with the HTTP counters;
        ``pool_stats``: the replicas' fresh loads (the servicer's), asked for at each scrape."""
        self.path = path
        self.pools_ready = pools_ready
        self.max_body_bytes = max_body_bytes
        self.ingress_metrics = ingress_metrics
        self.pool_stats = pool_stats
        self.tenancy = tenancy if tenancy is not None else Tenancy.disabled()  # keys, limits, usage
        self.metrics = HttpMetrics(ingress_metrics.registry if ingress_metrics is not None else None)
        self._ignored_logged: set[str] = set()
        self.app = Starlette(
            routes=[
                Route("/v1/completions", self.completions, methods=["POST"]),
                Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
                Route("/v1/models", self.models, methods=["GET"]),
                Route("/health", self.health, methods=["GET"]),
                Route("/metrics", self.metrics_route, methods=["GET"]),
            ]
        )

    # ---- routes -----------------------------------------------------------------------------------

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, "/v1/completions", is_chat=False)

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, "/v1/chat/completions", is_chat=True)

    async def models(self, request: Request) -> Response:
        try:
            self.tenancy.http_principal(request.headers.get("authorization"))  # /v1/* needs a key when on
        except ApiError as error:
            return self._error("/v1/models", error)
        model = {
            "id": self.path.model.name,
            "object": "model",
            "created": 0,
            "owned_by": "pdserve",
            "max_model_len": self.path.model.limits.max_model_len,
        }
        return self._json("/v1/models", {"object": "list", "data": [model]})

    async def health(self, request: Request) -> Response:
        try:
            is_ready = await self.pools_ready()
        except Exception as error:  # the check itself failed: not serving, never a 500
            logger.warning("health check failed: %s", error)
            is_ready = False
        if is_ready:
            return self._json("/health", {"status": "ok", "model": self.path.model.name})
        error = ApiError(503, "a pool has no live replica", "service_unavailable_error", None, "not_serving")
        return self._error("/health", error)

    async def metrics_route(self, request: Request) -> Response:
        self.metrics.count_request("/metrics", 200)
        if self.ingress_metrics is not None and self.pool_stats is not None:
            self.ingress_metrics.set_pool_loads(await self.pool_stats())
        payload, content_type = self.metrics.render(request.headers.get("accept", ""))
        return Response(payload, headers={"Content-Type": content_type})

    # ---- generation -------------------------------------------------------------------------------

    async def _generate(self, request: Request, endpoint: str, is_chat: bool) -> Response:
        try:
            principal = self.tenancy.http_principal(request.headers.get("authorization"))  # 401 first
            data = await self._read_json(request)
            body = parse_body(ChatCompletionRequest if is_chat else CompletionRequest, data)
            self._log_ignored(endpoint, body)
            if body.model is not None and body.model != self.path.model.name:
                raise ApiError(
                    404,
                    f"model: {body.model!r} is not served here (served: {self.path.model.name!r})",
                    "not_found_error",
                    "model",
                    "model_not_found",
                )
            wire = chat_wire(body) if is_chat else completion_wire(body)
            request_id = f"{'chatcmpl' if is_chat else 'cmpl'}-{uuid.uuid4().hex}"
            valid = validated(wire, body, self.path.model.tokenizer, self.path.model.limits, request_id)
            builder = ResponseBuilder(
                request_id, self.path.model.name, is_chat, body.include_usage, body.return_token_ids
            )
            admitted = self.tenancy.http_admit(principal, valid)  # the key's tenant; 429 over its limits
            parent = http_parent(self.path.tracer, request.headers, is_chat)  # W3C traceparent header
            stream = self.tenancy.meter(admitted, self.path.generate(admitted.request, parent))
            if body.stream:
                return await self._stream(request, endpoint, stream, builder)
            return await self._complete(request, endpoint, stream, builder)
        except ApiError as error:
            return self._error(endpoint, error)
        except ClientGone:
            self.metrics.count_request(endpoint, CLIENT_GONE_STATUS)
            return Response(status_code=CLIENT_GONE_STATUS)

    async def _complete(
        self, request: Request, endpoint: str, stream: Responses, builder: ResponseBuilder
    ) -> Response:
        async def collect() -> tuple[str, list[int], pb.GenerateResponse]:
            parts, token_ids, last = [], [], pb.GenerateResponse()
            async with asyncio.timeout(self.path.config.request_timeout_s):
                async for response in stream:
                    parts.append(response.text)
                    token_ids.extend(response.token_ids)
                    last = response
            return "".join(parts), token_ids, last

        try:
            text, token_ids, last = await _unless_disconnected(collect(), request.receive)
        except (ApiError, ClientGone):
            raise
        except Exception as error:
            raise _path_error(error) from None
        finally:
            await stream.aclose()
        self.metrics.count_usage(last)
        return self._json(endpoint, builder.full(text, last, token_ids))

    async def _stream(
        self, request: Request, endpoint: str, stream: Responses, builder: ResponseBuilder
    ) -> Response:
        """Wait for the first message (so a refusal before any token is a real HTTP status), then stream."""
        deadline = asyncio.get_running_loop().time() + self.path.config.request_timeout_s
        try:
            async with asyncio.timeout_at(deadline):
                first = await _unless_disconnected(anext(stream), request.receive)
        except BaseException as error:
            await stream.aclose()
            if isinstance(error, (ApiError, ClientGone)) or not isinstance(error, Exception):
                raise
            raise _path_error(error) from None
        self.metrics.count_request(endpoint, 200)
        return _EventStream(
            self._events(stream, first, builder, deadline),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def _events(
        self,
        stream: AsyncIterator[pb.GenerateResponse],
        first: pb.GenerateResponse,
        builder: ResponseBuilder,
        deadline: float,
    ) -> AsyncIterator[bytes]:
        self.metrics.open_streams.inc()
        try:
            for event in builder.first_events():
                yield event
            response = first
            async with asyncio.timeout_at(deadline):
                while True:
                    for event in builder.events(response):
                        yield event
                    if response.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
                        self.metrics.count_usage(response)
                        return
                    response = await anext(stream)
        except Exception as error:  # headers are out: the error goes in the stream, as vLLM does
            api_error = _path_error(error)
            logger.warning("stream %s failed: %s", builder.request_id, api_error.message)
            yield sse_event(api_error.body())
            yield DONE_EVENT
        finally:
            self.metrics.open_streams.dec()
            await stream.aclose()

    # ---- helpers ----------------------------------------------------------------------------------

    async def _read_json(self, request: Request) -> Any:
        """The body as JSON: 413 past ``max_body_bytes`` (declared or sent), 400 when not JSON."""
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise _too_large(int(declared), self.max_body_bytes)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise _too_large(size, self.max_body_bytes)
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError) as error:
            raise bad_request(None, f"body: not valid JSON ({error})", "invalid_json") from None

    def _log_ignored(self, endpoint: str, body: Any) -> None:
        for name in ignored_fields(body):
            if name not in self._ignored_logged:  # once per field name, not per request
                self._ignored_logged.add(name)
                logger.warning("%s: ignoring unknown field %r", endpoint, name)

    def _json(self, endpoint: str, payload: dict[str, Any]) -> Response:
        self.metrics.count_request(endpoint, 200)
        return JSONResponse(payload)

    def _error(self, endpoint: str, error: ApiError) -> Response:
        self.metrics.count_request(endpoint, error.status)
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers())


def _too_large(size: int, limit: int) -> ApiError:
    return ApiError(
        413, f"body: {size} bytes is over the limit of {limit} bytes", "invalid_request_error", None,
        "request_too_large",
    )


def _path_error(error: BaseException) -> ApiError:
    """A failure on the request path, as ``cluster.servicer.status_for`` classifies it for gRPC."""
    if isinstance(error, ApiError):
        return error
    code, message = status_for(error)
    return from_grpc(code, message)


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(awaitable: Awaitable[Any], receive: Receive) -> Any:
    """``await awaitable``, cancelled (and ``ClientGone`` raised) if the client disconnects first."""
    work = asyncio.ensure_future(awaitable)
    watcher = asyncio.ensure_future(_wait_disconnect(receive))
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not work.done():
            work.cancel()
            with suppress(asyncio.CancelledError):
                await work
    if work.cancelled():
        raise ClientGone
    return work.result()

