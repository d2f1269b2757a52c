"""Pieces of the torch.distributed transport: control-channel framing and 2-rank process groups.

Each (prefill, decode) pair gets its own control TCP connection and its own 2-rank process group built
from a private ``TCPStore`` (rank 0 = the serving prefill side, rank 1 = the reading decode side), so no
global ``init_process_group`` and no world-wide rank assignment is needed: pairs come and go freely.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

_LENGTH = struct.Struct("!I")
_MAX_MESSAGE = 16 << 20


def send_message(sock: socket.socket, message: dict[str, Any]) -> None:
    """Send one length-prefixed JSON message."""
    body = json.dumps(message).encode()
    sock.sendall(_LENGTH.pack(len(body)) + body)


def recv_message(sock: socket.socket) -> dict[str, Any] | None:
    """Receive one message; None when the peer closed the connection."""
    header = _recv_exactly(sock, _LENGTH.size)
    if header is None:
        return None
    (length,) = _LENGTH.unpack(header)
    if length > _MAX_MESSAGE:
        raise ConnectionError(f"control message of {length} bytes is too large")
    body = _recv_exactly(sock, length)
    if body is None:
        return None
    return json.loads(body)


def _recv_exactly(sock: socket.socket, length: int) -> bytes | None:
    chunks, remaining = [], length
    while remaining:
        try:
            chunk = sock.recv(remaining)
        except (ConnectionResetError, OSError):
            return None
        if not chunk:
            return None
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def process_group_backend(device: torch.device) -> str:
    """The collective backend for a pool on ``device``: NCCL for GPU memory, gloo for host memory."""
    return "nccl" if device.type == "cuda" else "gloo"


def make_pair_group(
    store: dist.Store, rank: int, local_host: str, backend: str, timeout_s: float
) -> dist.ProcessGroup:
    """A 2-rank gloo (CPU) or NCCL (CUDA) group over ``store``; blocks until both ranks join."""
    timeout = timedelta(seconds=timeout_s)
    if backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, 2, options)
    options = dist.ProcessGroupGloo._Options()
    options._timeout = timeout
    options._devices = [dist.ProcessGroupGloo.create_device(hostname=local_host)]
    return dist.ProcessGroupGloo(store, rank, 2, options)


def abort_group(group: dist.ProcessGroup | None) -> None:
    """Tear a pair's group down, also with an operation still pending (best effort, never raises)."""
    if group is None:
        return
    for method in ("abort", "shutdown"):
        with contextlib.suppress(Exception):
            getattr(group, method)()
            return


def gather_runs(pool_bytes: torch.Tensor, runs: list[list[int]], block_bytes: int) -> torch.Tensor:
    """The bytes of ``runs`` ([[start_block, num_blocks], ...]) as one tensor (a view if only one run)."""
    slices = [pool_bytes[start * block_bytes : (start + count) * block_bytes] for start, count in runs]
    return slices[0] if len(slices) == 1 else torch.cat(slices)
