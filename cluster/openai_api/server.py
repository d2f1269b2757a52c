"""uvicorn serving the OpenAI app on the ingress replica's own event loop (uvloop under Ray).

docs/benchmarks.md, "HTTP stack", measures it against aiohttp: both cost 6-14 us per SSE event, far
below a request-path message; aiohttp came out ahead in 4 of 5 runs, and a port would touch this file
and ``app.py`` only. The socket is bound here, before the server starts, so a taken port fails at once
and port 0 reports the port it got.
"""

from __future__ import annotations

import asyncio
import logging
import socket

import uvicorn

from cluster.tls import TlsConfig, uvicorn_ssl_options

logger = logging.getLogger(__name__)


class HttpServer:
    """One uvicorn server for an ASGI ``app`` on ``host:port`` (port 0: any free one)."""

    def __init__(self, app: object, host: str, port: int, tls: TlsConfig | None = None) -> None:
        self.sock = _bind(host, port)
        self.host = host
        self.port = int(self.sock.getsockname()[1])
        config = uvicorn.Config(
            app,
            http="httptools",
            lifespan="off",
            log_config=None,  # the replica's logging stays as Ray set it up
            access_log=False,
            timeout_graceful_shutdown=1,
            **uvicorn_ssl_options(tls),  # HTTPS when tls has a cert and key (cluster/tls.py)
        )
        self.server = uvicorn.Server(config)
        self._task: asyncio.Task[None] | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def is_serving(self) -> bool:
        """Started and not stopped (the serve task still runs)."""
        return self._task is not None and not self._task.done()

    async def start(self) -> None:
        """Serve in the background on the running loop; returns once it accepts connections."""
        self._task = asyncio.get_running_loop().create_task(self.server.serve(sockets=[self.sock]))
        while not self.server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise RuntimeError(f"http: server on {self.address} stopped while starting")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        """Stop accepting, end open connections (after at most ~1 s of grace), close the socket."""
        task, self._task = self._task, None
        if task is None:
            return
        self.server.should_exit = True
        try:
            await asyncio.wait_for(task, timeout=5.0)
        except (asyncio.TimeoutError, Exception) as error:
            logger.warning("http server on %s did not stop cleanly: %s", self.address, error)
        finally:
            self.sock.close()


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT only; no SO_REUSEPORT sharing
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise RuntimeError(f"http: cannot bind {host}:{port} ({error.strerror or error})") from None
    sock.listen(2048)
    sock.setblocking(False)
    return sock
