"""``pdserve top``: a live terminal view of the per-tenant KV review, refreshed from ``ClusterInfo``.

One row per (pool, tenant): active requests, mean and max active tokens, KV memory used and cached,
allocation failures, evicted blocks, and orphaned requests (client gone, blocks still held). A ``rich``
Live table; ``--once`` prints one table and exits, ``--json`` prints the rows as JSON (both for scripts and
tests). The numbers are ``ClusterInfoResponse.pools[].tenants`` as they are (docs/observability.md).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import click
import grpc

from cluster.cli_options import server_option
from protos import pdserve_pb2 as pb

COLUMNS: tuple[tuple[str, str], ...] = (  # (TenantKVInfo field, header)
    ("active_requests", "active"),
    ("mean_active_tokens", "mean tok"),
    ("max_active_tokens", "max tok"),
    ("kv_bytes_used", "KV used"),
    ("kv_bytes_cached", "KV cached"),
    ("kv_blocks_used", "blk used"),
    ("kv_blocks_cached", "blk cached"),
    ("kv_share_blocks", "share blk"),
    ("allocation_failures", "alloc fail"),
    ("evicted_blocks", "evicted"),
    ("orphaned_requests", "orphaned"),
)
_BYTES = {"kv_bytes_used", "kv_bytes_cached"}


def fetch(server: str, api_key: str | None = None, timeout_s: float = 10.0) -> pb.ClusterInfoResponse:
    """One ``ClusterInfo`` call (with ``authorization: Bearer`` when ``api_key`` is given)."""
    from cluster.client import connect

    channel, stub = connect(server)
    metadata = (("authorization", f"Bearer {api_key}"),) if api_key else None
    try:
        return stub.ClusterInfo(pb.ClusterInfoRequest(), timeout=timeout_s, metadata=metadata)
    finally:
        channel.close()


def rows(info: pb.ClusterInfoResponse) -> list[dict[str, Any]]:
    """The table's rows: one per (pool, tenant), in ClusterInfo's order (pools, then tenants sorted)."""
    return [
        {"pool": pool.name, "tenant": t.tenant, **{field: getattr(t, field) for field, _ in COLUMNS}}
        for pool in info.pools
        for t in pool.tenants
    ]


def _human_bytes(num_bytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if num_bytes < 1024 or unit == "GiB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    raise AssertionError("unreachable")


def _cell(field: str, value: Any) -> str:
    if field in _BYTES:
        return _human_bytes(float(value))
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def table(info: pb.ClusterInfoResponse) -> Any:
    """The rich ``Table`` of ``info``'s per-tenant review, titled with the model and the pools' replicas."""
    from rich.table import Table

    pools = ", ".join(f"{pool.name} x{len(pool.replicas)}" for pool in info.pools)
    view = Table(title=f"pdserve top: {info.model} ({pools}; {time.strftime('%H:%M:%S')})")
    view.add_column("pool")
    view.add_column("tenant")
    for _, header in COLUMNS:
        view.add_column(header, justify="right")
    for row in rows(info):
        tenant = row["tenant"] or "(none)"
        view.add_row(row["pool"], tenant, *(_cell(field, row[field]) for field, _ in COLUMNS))
    return view


@click.command("top")
@server_option()
@click.option("--interval", type=float, default=1.0, show_default=True, help="Seconds between refreshes.")
@click.option("--once", is_flag=True, help="Print one table and exit.")
@click.option("--json", "as_json", is_flag=True, help="Print the rows once as JSON and exit.")
@click.option("--api-key", envvar="PDSERVE_API_KEY", default=None, help="API key (or $PDSERVE_API_KEY).")
def top(server: str, interval: float, once: bool, as_json: bool, api_key: str | None) -> None:
    """Live per-tenant KV review of a running cluster (active requests, tokens, KV memory, failures)."""
    from rich.console import Console
    from rich.live import Live

    try:
        info = fetch(server, api_key)
        if as_json:
            click.echo(json.dumps({"model": info.model, "rows": rows(info)}, indent=2))
            return
        console = Console()
        if not console.is_terminal:  # piped or captured: wide enough for every column, no wrapping
            console = Console(width=200)
        if once:
            console.print(table(info))
            return
        with Live(table(info), console=console, refresh_per_second=4) as live:
            while True:
                time.sleep(interval)
                live.update(table(fetch(server, api_key)))
    except grpc.RpcError as error:
        click.echo(f"pdserve: {error.code().name}: {error.details()}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        return
