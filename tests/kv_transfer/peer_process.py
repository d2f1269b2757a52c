"""A KV-serving peer in its own process (spawned), driven over a pipe by the tests.

The peer allocates a pool through its transport, fills it with seeded random bytes, registers it and
answers: ("digests", block_ids) -> per-block SHA-256 computed on ITS side; ("exit",) -> close and exit.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
from dataclasses import dataclass
from multiprocessing.connection import Connection

import torch

from kv_transfer import (
    LayoutSignature,
    TransferEndpoint,
    TransportConfig,
    block_digests,
    make_transport,
    pool_shape,
)
from kv_transfer.blocks import torch_dtype


def fill_random(pool: torch.Tensor, seed: int) -> None:
    """Overwrite every byte of ``pool`` with seeded random bytes."""
    generator = torch.Generator().manual_seed(seed)
    flat = pool.reshape(-1).view(torch.uint8)
    flat.copy_(torch.randint(0, 256, flat.shape, dtype=torch.uint8, generator=generator))


def _serve(
    conn: Connection,
    config: TransportConfig,
    worker_id: str,
    layout: LayoutSignature,
    num_blocks: int,
    seed: int,
) -> None:
    transport = make_transport(config, worker_id)
    pool = transport.allocate_pool(pool_shape(layout, num_blocks), torch_dtype(layout.dtype))
    fill_random(pool, seed)
    endpoint = transport.register(pool, layout)
    conn.send(("ready", endpoint))
    while True:
        try:
            command, *args = conn.recv()
        except EOFError:
            break
        if command == "digests":
            conn.send(block_digests(pool, args[0]))
        elif command == "exit":
            break
    transport.close()
    conn.send("closed")


def peer_context() -> mp.context.BaseContext:
    """Fresh processes that do not inherit this (threaded, NIXL-holding) test process: forkserver with
    torch preloaded (a spawn per peer costs seconds of imports on a loaded 2-core machine)."""
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(["torch", "tests.kv_transfer.peer_process"])
    return context


@dataclass
class PeerProcess:
    """Handle on a spawned serving peer."""

    process: mp.process.BaseProcess
    conn: Connection
    endpoint: TransferEndpoint

    @classmethod
    def start(
        cls, config: TransportConfig, worker_id: str, layout: LayoutSignature, num_blocks: int, seed: int
    ) -> PeerProcess:
        context = peer_context()
        parent, child = context.Pipe()
        process = context.Process(
            target=_serve, args=(child, config, worker_id, layout, num_blocks, seed), daemon=True
        )
        process.start()
        child.close()
        if not parent.poll(60):
            process.kill()
            raise RuntimeError("peer process did not start in 60 s")
        status, endpoint = parent.recv()
        assert status == "ready"
        return cls(process, parent, endpoint)

    def digests(self, block_ids: list[int]) -> list[str]:
        self.conn.send(("digests", list(block_ids)))
        return self.conn.recv()

    def stop(self) -> None:
        """Ask the peer to close its transport and exit (a clean shutdown)."""
        if self.process.is_alive():
            self.conn.send(("exit",))
            if self.conn.poll(30):
                self.conn.recv()
        self.process.join(30)
        self.conn.close()

    def pause(self) -> None:
        """SIGSTOP: the peer stays alive but runs no code (a hung prefill worker)."""
        assert self.process.pid is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process.pid is not None
        os.kill(self.process.pid, signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL: no cleanup runs in the peer."""
        if self.process.pid is not None and self.process.is_alive():
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.join(30)
        self.conn.close()
