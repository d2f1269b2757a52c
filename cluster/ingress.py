"""The ingress deployment: each replica runs the public gRPC API itself on its own event loop.

Serve's gRPC proxy costs about 1.1 ms of CPU per streamed message on a small machine, which would
cap token streaming; so the application runs with Serve's proxies disabled and every ingress replica
starts a ``grpc.aio`` server (``cluster.servicer``) bound to ``grpc.host:grpc.port`` from the config.
Workers are reached through ``DeploymentHandle``s; decode streams arrive already coalesced (several
tokens per message under load).

The event loop is uvloop's: every Ray worker process installs uvloop's loop policy at start when uvloop
is importable (``ray/_private/workers/default_worker.py``, ``RAY_USE_UVLOOP`` on by default), and Serve
runs the replica's code on a loop from ``asyncio.new_event_loop()`` in its own thread, so that loop is a
``uvloop.Loop``. That is why uvloop is a declared dependency: Ray does not require it. The replica
reports its loop class (``event_loop``) and warns when it is not uvloop.

With ``http.enabled`` (the default) the replica also serves the OpenAI-compatible HTTP API
(``cluster.openai_api``: Starlette on uvicorn, same loop) on ``http.host:http.port``, over the same
``RequestPath``; it starts and stops with the gRPC server.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from cluster.auth import check_exposure
from cluster.config import config_from_dict
from cluster.model_info import load_model_info
from cluster.openai_api.app import OpenAIApp
from cluster.openai_api.server import HttpServer
from cluster.request_path import RequestPath
from cluster.servicer import PDServeServicer, make_server
from cluster.tenancy import Tenancy

logger = logging.getLogger(__name__)


class IngressDeployment:
    """Serves gRPC; holds handles to the prefill pool (None when colocated) and the decode pool."""

    async def __init__(self, config_dict: dict[str, Any], prefill: Any, decode: Any) -> None:
        config = config_from_dict(config_dict)
        self.path = RequestPath(config, load_model_info(config), prefill, decode)
        check_exposure(config.auth, {"grpc.host": config.grpc.host, "http.host": config.http.host})
        tenancy = Tenancy.for_config(config, self.path.metrics.registry)  # keys, rate limits, usage
        self.servicer = PDServeServicer(self.path, tenancy)
        self.server, self.port = make_server(self.servicer, config.grpc.host, config.grpc.port, config.tls)
        self.http: HttpServer | None = None
        if config.http.enabled:
            ready = self.servicer.pools_ready
            api = OpenAIApp(
                self.path, ready, config.http.max_body_bytes, self.path.metrics, self.servicer.pool_stats,
                tenancy,
            )
            self.http = HttpServer(api.app, config.http.host, config.http.port, config.tls)
        await self.server.start()
        if self.http is not None:
            await self.http.start()
        loop = asyncio.get_running_loop()
        self._warm_up = loop.create_task(self.path.warm_up())
        self.address = f"{config.grpc.host}:{self.port}"
        self.loop_class = f"{type(loop).__module__}.{type(loop).__qualname__}"
        if not self.loop_class.startswith("uvloop."):
            logger.warning("ingress event loop is %s, not uvloop (is uvloop installed?)", self.loop_class)
        logger.info("pdserve gRPC API on %s (event loop %s)", self.address, self.loop_class)
        if self.http is not None:
            logger.info("pdserve OpenAI HTTP API on http://%s", self.http.address)

    async def grpc_address(self) -> str:
        """Where this replica's gRPC API listens (``host:port``; the port is the bound one)."""
        return self.address

    async def http_address(self) -> str:
        """Where this replica's OpenAI HTTP API listens (``host:port``, the bound port); "" when disabled."""
        return self.http.address if self.http is not None else ""

    async def event_loop(self) -> str:
        """The class of the event loop the gRPC server runs on (``uvloop.Loop`` when uvloop is installed)."""
        return self.loop_class

    async def migration_stats(self) -> dict[str, Any]:
        """This replica's decode-stream migrations: counters, suspects, recent events (cluster.migration)."""
        return self.path.migration.snapshot()

    async def admission_stats(self) -> dict[str, Any]:
        """This replica's admission books: queue depth (now, max seen), reservations, refusals."""
        return self.path.admission.snapshot()

    async def check_health(self) -> None:
        """Serve's health check: the gRPC server (and the HTTP server when enabled) must still be serving."""
        if self.server is None:
            raise RuntimeError("gRPC server stopped")
        if self.http is not None and not self.http.is_serving:
            raise RuntimeError("HTTP server stopped")

    async def __del__(self) -> None:
        server, self.server = self.server, None
        http, self.http = getattr(self, "http", None), None
        if http is not None:
            await http.stop()
        if server is not None:
            await server.stop(grace=1.0)
