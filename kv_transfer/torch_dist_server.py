"""The serving (prefill) half of the torch.distributed transport.

A daemon thread accepts control connections; per connection a daemon thread checks the reader asked for
this incarnation, sets up the pair's process group (rank 0, private TCPStore), then answers each read
request ``{"runs": [[start_block, num_blocks], ...]}`` by ``send``-ing those blocks' bytes, gathered in
order into one message, to rank 1.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from datetime import timedelta

import torch
import torch.distributed as dist

from kv_transfer.config import TorchDistConfig
from kv_transfer.torch_dist_link import (
    abort_group,
    gather_runs,
    make_pair_group,
    process_group_backend,
    recv_message,
    send_message,
)

logger = logging.getLogger(__name__)
_ACCEPT_POLL_S = 0.2


def bind_control_socket(config: TorchDistConfig) -> socket.socket:
    """Listen on the first free port of the configured range (or an OS-picked one for 0..0)."""
    last_error: OSError | None = None
    for port in range(config.port_min, config.port_max + 1):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.bind((config.host, port))
        except OSError as exc:
            sock.close()
            last_error = exc
            continue
        sock.listen(64)
        sock.settimeout(_ACCEPT_POLL_S)
        return sock
    raise OSError(
        f"no free control port on {config.host} in {config.port_min}..{config.port_max} "
        f"(TorchDistConfig.port_min/port_max): {last_error}"
    )


class TorchDistServer:
    """Serves reads of one registered pool to any number of decode peers."""

    def __init__(
        self,
        config: TorchDistConfig,
        pool_bytes: torch.Tensor,
        block_bytes: int,
        incarnation: str,
        timeout_s: float,
    ) -> None:
        self.config = config
        self._pool_bytes = pool_bytes  # [num_blocks * block_bytes] uint8
        self._block_bytes = block_bytes
        self._incarnation = incarnation
        self._timeout_s = timeout_s
        self._listener = bind_control_socket(config)
        self.address: tuple[str, int] = self._listener.getsockname()[:2]
        self._closed = threading.Event()
        self._connections: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._accept_thread = threading.Thread(target=self._accept_loop, name="kv-dist-accept", daemon=True)
        self._accept_thread.start()

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(None)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            thread = threading.Thread(target=self._serve, args=(conn,), name="kv-dist-serve", daemon=True)
            with self._lock:
                if self._closed.is_set():
                    conn.close()
                    return
                self._connections.add(conn)
                self._threads = [t for t in self._threads if t.is_alive()] + [thread]
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        group: dist.ProcessGroup | None = None
        try:
            hello = recv_message(conn)
            if hello is None:
                return
            if hello.get("incarnation") != self._incarnation:
                send_message(
                    conn, {"error": f"stale endpoint: this server is incarnation {self._incarnation}"}
                )
                return
            timeout = timedelta(seconds=self.config.connect_timeout_s)
            store = dist.TCPStore(self.config.host, 0, 2, True, timeout=timeout, wait_for_workers=False)
            send_message(conn, {"store_port": store.port})
            group = make_pair_group(
                store, 0, self.config.host, process_group_backend(self._pool_bytes.device), self._timeout_s
            )
            while not self._closed.is_set():
                request = recv_message(conn)
                if request is None:
                    return
                data = gather_runs(self._pool_bytes, request["runs"], self._block_bytes)
                group.send([data], 1, 0).wait(timedelta(seconds=self._timeout_s))
        except Exception as exc:  # a reader that vanished or timed out ends only its own connection
            logger.info("torch_dist serve connection ended: %s: %s", type(exc).__name__, exc)
        finally:
            abort_group(group)
            with self._lock:
                self._connections.discard(conn)
            conn.close()

    def close(self) -> None:
        """Stop accepting, drop every connection, join the threads. Idempotent."""
        if self._closed.is_set():
            return
        self._closed.set()
        with self._lock:
            connections = list(self._connections)
            threads = list(self._threads)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in recv
        self._accept_thread.join(5)
        self._listener.close()
        for thread in threads:
            thread.join(self._timeout_s + 1)
