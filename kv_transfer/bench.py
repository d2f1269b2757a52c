"""``python -m kv_transfer.bench [--json]``: KV pull bandwidth and latency per backend vs the copy ceiling.

For each backend a serving peer runs in its own (spawned) process; this process is the decode side and
pulls the same blocks again and again (read_blocks -> wait). Next to every figure is the ceiling: the
same run's single-process ``torch`` copy of the same number of bytes between two prefaulted buffers.

Cases: 1, 16 and 256 blocks of the built-in model's layout (assumed here, as a constant: 4 layers,
4 kv heads, head dim 32, float32, block size 16 = 64 KiB per block), 256 *scattered* blocks of it (every
other block, so nothing merges: the cost of one descriptor per block), and a 4k-token prompt of an
8B-shaped layout (32 layers, 8 kv heads, head dim 128, bfloat16, block 16 = 2 MiB per block, 512 MiB).
Block ids are contiguous on both sides unless the case says scattered.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection

import click
import torch

from kv_transfer.base import KVHandle, LayoutSignature, TransferEndpoint, TransferStatus
from kv_transfer.blocks import block_digests, merge_block_runs, pool_shape, torch_dtype
from kv_transfer.config import BACKENDS, TransportConfig, transport_config
from kv_transfer.factory import make_transport

BUILTIN_LAYOUT = LayoutSignature(
    "builtin-tiny (assumed)", "float32", 16, num_layers=4, num_kv_heads=4, head_dim=32
)
LLAMA_8B_LAYOUT = LayoutSignature("8b-shaped", "bfloat16", 16, num_layers=32, num_kv_heads=8, head_dim=128)


@dataclass(frozen=True)
class Case:
    name: str
    layout: LayoutSignature
    remote_ids: tuple[int, ...]
    local_ids: tuple[int, ...]
    repeats: int


def cases(include_8b: bool) -> list[tuple[LayoutSignature, int, list[Case]]]:
    """(layout, pool blocks on each side, cases on that pool)."""
    builtin = [
        Case("builtin 1 block", BUILTIN_LAYOUT, (5,), (9,), 200),
        Case("builtin 16 blocks", BUILTIN_LAYOUT, tuple(range(16)), tuple(range(16)), 100),
        Case("builtin 256 blocks", BUILTIN_LAYOUT, tuple(range(256)), tuple(range(256)), 30),
        Case("builtin 256 scattered", BUILTIN_LAYOUT, tuple(range(0, 512, 2)), tuple(range(1, 512, 2)), 30),
    ]
    groups = [(BUILTIN_LAYOUT, 512, builtin)]
    if include_8b:
        blocks = 4096 // LLAMA_8B_LAYOUT.block_size
        case = Case("8B-shaped 4k tokens", LLAMA_8B_LAYOUT, tuple(range(blocks)), tuple(range(blocks)), 8)
        groups.append((LLAMA_8B_LAYOUT, blocks, [case]))
    return groups


@dataclass
class Row:
    backend: str
    case: str
    num_blocks: int
    num_bytes: int
    num_runs: int
    latency_ms_median: float
    latency_ms_p90: float
    gb_per_s: float  # from the median pull
    ceiling_gb_per_s: float  # from the median copy
    ratio_to_ceiling: float  # median copy time / median pull time
    best_gb_per_s: float  # from the fastest pull
    best_ceiling_gb_per_s: float  # from the fastest copy
    best_ratio_to_ceiling: float  # fastest copy / fastest pull: the least load-sensitive comparison
    verified: bool  # the last pull's blocks match the peer's (SHA-256 per block, both sides)


def quiet_nixl_logs(config: TransportConfig) -> None:
    """NIXL logs INFO lines to stdout, which would corrupt ``--json``: raise its logger to WARNING."""
    if config.backend == "nixl":
        import nixl._api  # noqa: F401  (configures the "nixl" logger on import)

        logging.getLogger("nixl").setLevel(logging.WARNING)


def _serve(conn: Connection, config: TransportConfig, layout: LayoutSignature, num_blocks: int) -> None:
    quiet_nixl_logs(config)
    transport = make_transport(config, f"bench-prefill-{config.backend}")
    pool = transport.allocate_pool(pool_shape(layout, num_blocks), torch_dtype(layout.dtype))
    flat = pool.view(-1).view(torch.uint8)
    flat.copy_(torch.arange(flat.numel(), dtype=torch.int64).remainder_(251).to(torch.uint8))
    conn.send(transport.register(pool, layout))
    while (message := conn.recv()) != "exit":
        conn.send(block_digests(pool, message))
    transport.close()


def measure(
    config: TransportConfig, layout: LayoutSignature, pool_blocks: int, group: list[Case]
) -> list[Row]:
    """Spawn a serving peer for ``layout``, pull every case of ``group`` from it, return the rows."""
    backend = config.backend
    quiet_nixl_logs(config)
    context = mp.get_context("spawn")
    parent, child = context.Pipe()
    peer = context.Process(target=_serve, args=(child, config, layout, pool_blocks), daemon=True)
    peer.start()
    endpoint: TransferEndpoint = parent.recv()
    transport = make_transport(config, f"bench-decode-{backend}")
    rows = []
    try:
        local_pool = transport.allocate_pool(pool_shape(layout, pool_blocks), torch_dtype(layout.dtype))
        transport.register(local_pool, layout)
        for case in group:
            rows.append(_measure_case(transport, local_pool, endpoint, parent, case, backend))
    finally:
        transport.close()
        parent.send("exit")
        peer.join(30)
    return rows


def _measure_case(transport, local_pool, endpoint, conn, case: Case, backend: str) -> Row:
    """Interleave one ceiling copy and one pull per repeat, so both see the same machine load."""
    num_bytes = len(case.remote_ids) * case.layout.block_bytes
    lease = time.time() + 3600.0
    handle = KVHandle(
        "bench", endpoint, case.remote_ids, len(case.remote_ids) * case.layout.block_size, lease
    )
    local_pool.view(-1).view(torch.uint8).zero_()
    src = torch.ones(num_bytes, dtype=torch.uint8)  # the ceiling's buffers, prefaulted
    dst = torch.zeros(num_bytes, dtype=torch.uint8)
    pulls, copies = [], []
    for i in range(case.repeats + 2):  # two warm-up rounds (the first pull handshakes)
        started = time.perf_counter()
        dst.copy_(src)
        copied = time.perf_counter()
        transfer = transport.read_blocks(handle, list(case.local_ids))
        status = transfer.wait()
        pulled = time.perf_counter()
        if status is not TransferStatus.DONE:
            raise RuntimeError(f"{backend} {case.name}: transfer {status.value}: {transfer.error}")
        if i >= 2:
            copies.append(copied - started)
            pulls.append(pulled - copied)
    conn.send(list(case.remote_ids))
    verified = conn.recv() == block_digests(local_pool, list(case.local_ids))
    pull, copy = statistics.median(pulls), statistics.median(copies)
    return Row(
        backend=backend,
        case=case.name,
        num_blocks=len(case.remote_ids),
        num_bytes=num_bytes,
        num_runs=len(merge_block_runs(case.remote_ids, case.local_ids)),
        latency_ms_median=pull * 1e3,
        latency_ms_p90=sorted(pulls)[int(0.9 * (len(pulls) - 1))] * 1e3,
        gb_per_s=num_bytes / pull / 1e9,
        ceiling_gb_per_s=num_bytes / copy / 1e9,
        ratio_to_ceiling=copy / pull,
        best_gb_per_s=num_bytes / min(pulls) / 1e9,
        best_ceiling_gb_per_s=num_bytes / min(copies) / 1e9,
        best_ratio_to_ceiling=min(copies) / min(pulls),
        verified=verified,
    )


def print_table(rows: list[Row]) -> None:
    header = f"{'backend':<11}{'case':<23}{'MiB':>8}{'runs':>5}{'p50 ms':>9}{'p90 ms':>9}"
    header += f"{'GB/s':>7}{'ceil':>7}{'ratio':>6} |{'best GB/s':>10}{'ceil':>7}{'ratio':>6}  ok"
    print(header)
    for r in rows:
        print(
            f"{r.backend:<11}{r.case:<23}{r.num_bytes / 2**20:>8.2f}{r.num_runs:>5}"
            f"{r.latency_ms_median:>9.3f}{r.latency_ms_p90:>9.3f}"
            f"{r.gb_per_s:>7.2f}{r.ceiling_gb_per_s:>7.2f}{r.ratio_to_ceiling:>6.2f} |"
            f"{r.best_gb_per_s:>10.2f}{r.best_ceiling_gb_per_s:>7.2f}{r.best_ratio_to_ceiling:>6.2f}"
            f"  {'yes' if r.verified else 'NO'}"
        )


def _backend_list(ctx: click.Context, param: click.Parameter, value: str) -> list[str]:
    backends = value.split(",")
    for backend in backends:
        if backend not in BACKENDS:
            raise click.BadParameter(f"unknown backend {backend!r}")
    return backends


@click.command(help="KV pull bandwidth and latency per backend vs the copy ceiling.")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object instead of the table")
@click.option(
    "--backends",
    default=",".join(BACKENDS),
    show_default=True,
    callback=_backend_list,
    help="comma-separated subset of " + ",".join(BACKENDS),
)
@click.option("--no-8b", "no_8b", is_flag=True, help="skip the 512 MiB 8B-shaped case")
@click.option("--timeout-s", type=float, default=60.0, show_default=True, help="per-transfer timeout")
def main(as_json: bool, backends: list[str], no_8b: bool, timeout_s: float) -> None:
    rows: list[Row] = []
    for backend in backends:
        for layout, pool_blocks, group in cases(include_8b=not no_8b):
            config = transport_config({"backend": backend, "timeout_s": timeout_s})
            rows.extend(measure(config, layout, pool_blocks, group))
    machine = f"{platform.machine()} {torch.get_num_threads()} torch threads, torch {torch.__version__}"
    if as_json:
        print(json.dumps({"machine": machine, "rows": [asdict(r) for r in rows]}, indent=1))
    else:
        print(
            f"# KV transfer, decode-side pulls from a peer process; ceiling = same-run torch copy ({machine})"
        )
        print_table(rows)


if __name__ == "__main__":
    main(prog_name="python -m kv_transfer.bench")
