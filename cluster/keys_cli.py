"""``pdserve keys new --tenant T``: a fresh API key and the config line that admits it (cluster/auth.py).

The key is printed once, on stdout; only its SHA-256 goes into the config (or the keys file), so store
the key where the client reads it (e.g. ``OPENAI_API_KEY`` / ``PDSERVE_API_KEY``)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import click

from cluster.auth import MAX_TENANT_LENGTH, hash_key, new_key


@click.group()
def keys() -> None:
    """API keys: each names a tenant (docs/operations.md, "Tenants")."""


@keys.command("new")
@click.option("--tenant", required=True, help="The tenant the key names (rate limits, metering, cache).")
@click.option("--cache-group", default=None, help="Share prefix cache with the other tenants of this group.")
@click.option("--admin", is_flag=True, help="ClusterInfo shows this key every tenant's usage.")
def new(tenant: str, cache_group: str | None, admin: bool) -> None:
    """Print a new key, then its entry for auth.keys (or a keys file)."""
    for name, value in (("--tenant", tenant), ("--cache-group", cache_group)):
        if value is not None and not 1 <= len(value) <= MAX_TENANT_LENGTH:
            raise click.BadParameter(f"1 to {MAX_TENANT_LENGTH} characters", param_hint=name)
    key = new_key()
    entry: dict[str, object] = {"tenant": tenant, "sha256": hash_key(key)}
    if cache_group is not None:
        entry["cache_group"] = cache_group
    if admin:
        entry["admin"] = True
    click.echo(f"key: {key}")
    click.echo("config (auth.keys entry, or a line of the keys file):")
    click.echo(f"  - {json.dumps(entry)}")


def api_key_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """``--api-key`` (or ``PDSERVE_API_KEY``) and ``--tls-ca`` for a client command."""
    command = click.option(
        "--tls-ca",
        type=click.Path(dir_okay=False, exists=True),
        default=None,
        help="Connect over TLS, trusting this CA certificate (PEM).",
    )(command)
    return click.option(
        "--api-key",
        envvar="PDSERVE_API_KEY",
        default=None,
        help="API key when keys are on (or PDSERVE_API_KEY).",
    )(command)
