"""Part 4 of the device check: a NIXL VRAM -> VRAM READ between two processes on one GPU.

4,096 tokens of 8B-shaped KV (32 layers x 2 x 8 KV heads x 128 x 2 bytes = 128 KiB per token: 512 MiB)
sit in a holder process's GPU tensor, registered with its NIXL agent (UCX; within one node UCX picks
``cuda_ipc``). The reader process registers its own GPU tensor, loads the holder's agent metadata and
posts READs of 256 block-sized descriptors (16-token blocks merged in runs of 16, as the decode worker's
runs are), polling ``check_xfer_state``. Baseline: a device-to-device copy of the same bytes in the
reader's process. Target (issue 17): pull >= 70 % of the copy's rate. Uses the nixl API directly (the
transport's own class needs the cluster's config tree; the data path is the same calls).
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
import time

TOKENS = 4096
BYTES_PER_TOKEN = 32 * 2 * 8 * 128 * 2
NUM_DESCRIPTORS = 256
REPEATS = 10
DEVICE = "cuda"  # a module constant so a CPU dry run (DRAM -> DRAM) can set it


def _memory_type() -> str:
    return "VRAM" if DEVICE == "cuda" else "DRAM"


def _synchronize() -> None:
    import torch

    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _agent(name: str):
    from nixl._api import nixl_agent, nixl_agent_config

    return nixl_agent(name, nixl_agent_config(backends=["UCX"]))


def _holder(conn, device: str, nbytes: int) -> None:
    """Owns the source tensor: registers it, sends (metadata, address, bytes), waits for 'done'."""
    import torch

    global DEVICE
    DEVICE = device  # spawned: the module is imported afresh

    source = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=DEVICE)
    agent = _agent("holder")
    registration = agent.register_memory(source)
    conn.send((agent.get_agent_metadata(), source.data_ptr(), source.numel(), int(source.sum().item())))
    conn.recv()
    agent.deregister_memory(registration)


def _descriptors(base: int, nbytes: int, device: int):
    import numpy as np

    length = nbytes // NUM_DESCRIPTORS
    table = np.empty((NUM_DESCRIPTORS, 3), dtype=np.uint64)
    for index in range(NUM_DESCRIPTORS):
        table[index] = (base + index * length, length, device)
    return table


def _pull_once(agent, local, remote, peer: str) -> float:
    handle = agent.initialize_xfer("READ", local, remote, peer)
    start = time.perf_counter()
    state = agent.transfer(handle)
    while state not in ("DONE", "ERR"):
        state = agent.check_xfer_state(handle)
    elapsed = time.perf_counter() - start
    agent.release_xfer_handle(handle)
    if state == "ERR":
        raise RuntimeError("NIXL READ ended in ERR")
    return elapsed


def _copy_seconds(nbytes: int) -> float:
    import torch

    source = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=DEVICE)
    target = torch.empty_like(source)
    times = []
    for _ in range(REPEATS + 2):
        _synchronize()
        start = time.perf_counter()
        target.copy_(source)
        _synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:])


def _reader(conn, results, device: str) -> None:
    import torch

    global DEVICE
    DEVICE = device
    metadata, remote_base, nbytes, checksum = conn.recv()
    target = torch.zeros(nbytes, dtype=torch.uint8, device=DEVICE)
    agent = _agent("reader")
    registration = agent.register_memory(target)
    peer = agent.add_remote_agent(metadata)
    peer = peer.decode() if isinstance(peer, bytes) else peer
    local = agent.get_xfer_descs(_descriptors(target.data_ptr(), nbytes, 0), _memory_type())
    remote = agent.get_xfer_descs(_descriptors(remote_base, nbytes, 0), _memory_type())
    times = [_pull_once(agent, local, remote, peer) for _ in range(REPEATS + 2)][2:]
    _synchronize()
    results.put((statistics.median(times), int(target.sum().item()) == checksum, _copy_seconds(nbytes)))
    agent.remove_remote_agent(peer)
    agent.deregister_memory(registration)
    conn.send("done")


def _wait_for_result(results, reader, holder, timeout_s: float = 180.0):
    """The reader's result; fails fast (not at the timeout) when either process has died."""
    import queue

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            return results.get(timeout=2)
        except queue.Empty:
            for process in (reader, holder):
                if not process.is_alive():
                    raise RuntimeError(f"NIXL {process.name} exited with {process.exitcode}") from None
    raise TimeoutError(f"no NIXL result within {timeout_s} s")


def run_nixl() -> list[str]:
    context = mp.get_context("spawn")
    holder_end, reader_end = context.Pipe()
    results = context.Queue()
    holder = context.Process(
        target=_holder, args=(holder_end, DEVICE, TOKENS * BYTES_PER_TOKEN), name="holder"
    )
    reader = context.Process(target=_reader, args=(reader_end, results, DEVICE), name="reader")
    holder.start()
    reader.start()
    pull, is_intact, copy = _wait_for_result(results, reader, holder)
    reader.join(60)
    holder.join(60)
    nbytes = TOKENS * BYTES_PER_TOKEN
    ratio = copy / pull  # the pull's rate as a fraction of the copy's
    verdict = "MET" if ratio >= 0.7 and is_intact else "MISSED (target 70 %)"
    return [
        f"NIXL READ {nbytes / 2**20:.0f} MiB {_memory_type()}->{_memory_type()}, 2 processes, "
        f"{NUM_DESCRIPTORS} descriptors: "
        f"{pull * 1e3:.2f} ms ({nbytes / pull / 1e9:.0f} GB/s), data {'intact' if is_intact else 'WRONG'}",
        f"device copy of the same bytes: {copy * 1e3:.2f} ms ({nbytes / copy / 1e9:.0f} GB/s); "
        f"pull = {100 * ratio:.0f} % of the copy {verdict}",
    ]
