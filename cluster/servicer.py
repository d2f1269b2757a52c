"""The gRPC servicer of ``pdserve.v1.PDServe`` (grpc.aio), and the server the ingress replica runs.

``Generate`` reads its request with ``cluster.validation.parse_generate_request`` (the bytes-typed twin,
so invalid UTF-8 and negative numbers are reported by field), validates, and streams from
``RequestPath``. Every refusal is ``await context.abort(code, "field: reason")``; any other failure is
translated to a status here (never a Ray traceback) by ``status_for``, from the type of the cause under
Ray's and Serve's wrappers: RESOURCE_EXHAUSTED when a pool has no room, UNAVAILABLE when a replica died
or is unreachable, DEADLINE_EXCEEDED after ``request_timeout_s``, INTERNAL otherwise.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
    gRPCStatusError,
)

from cluster.admission import AdmissionRefused, NeverFits, retry_after_metadata
from cluster.attribution import tenant_kv_infos
from cluster.migration import MigrationFailed
from cluster.replica_directory import REPLICA_DIRECTORY
from cluster.request_path import DECODE_DEPLOYMENT, PREFILL_DEPLOYMENT, RequestPath
from cluster.stats import ReplicaLoad
from cluster.tenancy import Tenancy, TenancyError
from cluster.tls import TlsConfig, grpc_server_credentials
from cluster.tracing import grpc_parent
from cluster.validation import RequestError, WireParseFailure, parse_generate_request, validate
from engine.block_pool import OutOfBlocksError
from protos import pdserve_pb2 as pb
from worker_common.messages import NoKVSpaceError

logger = logging.getLogger(__name__)

SERVICE_NAME = "pdserve.v1.PDServe"


# Errors told apart by type, never by their text. Checked in this order on the unwrapped cause.
_RESOURCE_EXHAUSTED: tuple[type[BaseException], ...] = (
    NoKVSpaceError,
    OutOfBlocksError,
    BackPressureError,
    AdmissionRefused,  # cluster.admission: no KV budget, queue full or waited too long
)
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    RayActorError,  # ActorDiedError and ActorUnavailableError are RayActorErrors
    ReplicaUnavailableError,
    DeploymentUnavailableError,
    MigrationFailed,  # cluster.migration: a decode replica was lost and the stream could not move
)


def unwrap_cause(error: BaseException) -> BaseException:
    """The exception a Ray or Serve wrapper carries: ``RayTaskError.cause`` (a remote call raised it;
    Ray re-raises it as a subclass of both), ``gRPCStatusError.original_exception``; nested wrappers too."""
    for _ in range(16):  # wrappers nest a few deep at most; never loop on a cycle
        if isinstance(error, RayTaskError) and isinstance(error.cause, BaseException):
            cause = error.cause
        elif isinstance(error, gRPCStatusError):
            cause = error.original_exception
        else:
            return error
        if cause is error:
            return error
        error = cause
    return error


def status_for(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status for an exception raised on the request path, from the cause's type (one line)."""
    cause = unwrap_cause(error)
    message = _first_line(f"{type(cause).__name__}: {cause}")
    if isinstance(cause, AdmissionRefused | MigrationFailed | NeverFits):  # worded for the client
        message = _first_line(str(cause))
    if isinstance(cause, NeverFits):  # cluster.admission: more KV blocks than one replica holds
        return grpc.StatusCode.INVALID_ARGUMENT, message
    if isinstance(cause, _RESOURCE_EXHAUSTED):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, message
    if isinstance(cause, _UNAVAILABLE):
        return grpc.StatusCode.UNAVAILABLE, message
    if isinstance(cause, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, "request_timeout_s passed"
    return grpc.StatusCode.INTERNAL, message


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0][:500] if lines else "internal error"


def authorization(context: grpc.aio.ServicerContext) -> str | None:
    """The ``authorization`` metadata value of a call (gRPC lower-cases metadata keys)."""
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return value if isinstance(value, str) else None
    return None


async def abort_refused(context: grpc.aio.ServicerContext, error: RequestError) -> None:
    """End the call with ``error``'s status (and its ``retry-after`` trailer when tenancy gave one)."""
    trailers = error.trailing_metadata() if isinstance(error, TenancyError) else ()
    await context.abort(error.code, error.message, trailing_metadata=trailers)


class PDServeServicer:
    """Generate / Health / ClusterInfo over one ``RequestPath``; ``tenancy``: API keys, rate limits and
    usage metering (``cluster.tenancy``; default: keys off, no limits, metered in plain counters)."""

    def __init__(self, path: RequestPath, tenancy: Tenancy | None = None) -> None:
        self.path = path
        self.tenancy = tenancy if tenancy is not None else Tenancy.disabled()

    async def Generate(
        self, wire: Any, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        try:
            principal = self.tenancy.authenticate(authorization(context))  # before any other answer
            if isinstance(wire, WireParseFailure):
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, wire.message)
            tokenizer = self.path.model.tokenizer
            request = validate(wire, tokenizer.encode, self.path.model.limits, tokenizer.encode_chat)
            admitted = self.tenancy.admit(principal, request, claimed_field="tenant_id")
        except RequestError as error:
            await abort_refused(context, error)
        parent = grpc_parent(self.path.tracer, context, wire)  # W3C traceparent in the metadata
        stream = self.tenancy.meter(admitted, self.path.generate(admitted.request, parent))
        try:
            async with asyncio.timeout(self.path.config.request_timeout_s):
                async for response in stream:
                    yield response
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as error:
            code, message = status_for(error)
            logger.warning("request %s failed: %s %s", request.request_id, code.name, message)
            await context.abort(code, message, trailing_metadata=retry_after_metadata(error, code))
        finally:
            await stream.aclose()

    async def Health(self, request: pb.HealthRequest, context: grpc.aio.ServicerContext) -> pb.HealthResponse:
        status = pb.HealthResponse.SERVING if await self.pools_ready() else pb.HealthResponse.NOT_SERVING
        return pb.HealthResponse(status=status, model=self.path.model.name)

    async def ClusterInfo(
        self, request: pb.ClusterInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.ClusterInfoResponse:
        principal = None
        if self.tenancy.is_auth_enabled:  # then a key is needed, and it sees its own tenant's usage
            try:
                principal = self.tenancy.authenticate(authorization(context))
            except TenancyError as error:
                await abort_refused(context, error)
        config = self.path.config
        response = pb.ClusterInfoResponse(
            model=self.path.model.name,
            block_size=config.engine.block_size,
            kv_transport="none (colocated)" if config.is_colocated else config.kv_transfer.backend,
            router_policy=config.router.policy,
        )
        for name, loads in await self.pool_stats():
            pool = response.pools.add(name=name)
            for load in loads:
                pool.replicas.add(**{key: getattr(load, key) for key in _REPLICA_FIELDS})
            own = None if principal is None or principal.is_admin else principal.tenant  # a key sees its own
            pool.tenants.extend(tenant_kv_infos(loads, own))  # the per-tenant KV review (cluster.attribution)
        response.tenant_usage.extend(self.tenancy.usage_for(principal))
        return response

    async def pools_ready(self) -> bool:
        """True when every pool (prefill and decode; decode only when colocated) has at least one replica
        answering a stats call within ``REPLICA_TIMEOUT_S``; a dead or slow replica alone does not count.
        The gRPC ``Health`` and HTTP ``/health`` both answer from this."""
        return all(loads for _, loads in await self.pool_stats())

    async def pool_stats(self) -> list[tuple[str, list[ReplicaLoad]]]:
        """Fresh stats from the replicas of every pool that answer within ``REPLICA_TIMEOUT_S`` (asked
        directly and all at once, not the routing copies); a replica that fails or is slow is left out."""
        pools: list[tuple[str, Any, str]] = [("decode", self.path.decode, DECODE_DEPLOYMENT)]
        if self.path.prefill is not None:
            pools.insert(0, ("prefill", self.path.prefill, PREFILL_DEPLOYMENT))
        asked = [_ask_replicas(handle, deployment) for _, handle, deployment in pools]
        answers = await asyncio.gather(*asked)
        return [(name, loads) for (name, _, _), loads in zip(pools, answers, strict=True)]


REPLICA_TIMEOUT_S = 2.0  # a replica's stats call is a snapshot read: a healthy one answers in milliseconds


async def _ask_replicas(handle: Any, deployment: str) -> list[ReplicaLoad]:
    """``replica_stats`` of each replica of ``deployment`` that answers in time, sorted by replica id."""
    views = REPLICA_DIRECTORY.replicas(deployment)
    if not views:  # the handle's first call creates its router, which then lists the replicas
        calls = [handle.replica_stats.remote()]
    else:
        calls = [handle.replica_stats.remote(target_replica_id=view.replica_id) for view in views]
    answers = await asyncio.gather(*(_answer(call, deployment) for call in calls))
    return sorted((load for load in answers if load is not None), key=lambda load: load.replica_id)


async def _answer(call: Any, deployment: str) -> ReplicaLoad | None:
    try:
        async with asyncio.timeout(REPLICA_TIMEOUT_S):
            return await call
    except Exception as error:  # dead, restarting or stuck: the pool's other replicas still count
        logger.warning(
            "a %s replica did not answer its stats call: %s",
            deployment,
            _first_line(f"{type(error).__name__}: {error}"),
        )
        return None


_REPLICA_FIELDS = (
    "replica_id",
    "running_requests",
    "queued_requests",
    "queued_prefill_tokens",
    "kv_blocks_total",
    "kv_blocks_used",
    "kv_blocks_cached",
    "kv_blocks_free",  # neither used nor cached (ReplicaLoad's kv_blocks_free)
    "prefix_hit_rate",
)


def make_server(
    servicer: PDServeServicer, host: str, port: int, tls: TlsConfig | None = None
) -> tuple[grpc.aio.Server, int]:
    """A grpc.aio server for ``servicer`` bound to ``host:port`` (port 0: any free one), over TLS when
    ``tls`` is enabled; returns the port."""
    handlers = {
        "Generate": grpc.unary_stream_rpc_method_handler(
            servicer.Generate,
            request_deserializer=parse_generate_request,
            response_serializer=pb.GenerateResponse.SerializeToString,
        ),
        "Health": grpc.unary_unary_rpc_method_handler(
            servicer.Health,
            request_deserializer=pb.HealthRequest.FromString,
            response_serializer=pb.HealthResponse.SerializeToString,
        ),
        "ClusterInfo": grpc.unary_unary_rpc_method_handler(
            servicer.ClusterInfo,
            request_deserializer=pb.ClusterInfoRequest.FromString,
            response_serializer=pb.ClusterInfoResponse.SerializeToString,
        ),
    }
    # so_reuseport off: a second server on a taken port must fail loudly, not share it silently.
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    if tls is not None and tls.is_enabled:
        bound = server.add_secure_port(f"{host}:{port}", grpc_server_credentials(tls))
    else:
        bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise RuntimeError(f"grpc: cannot bind {host}:{port} (in use?)")
    return server, bound
