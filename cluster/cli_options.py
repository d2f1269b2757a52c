"""Options shared by the ``pdserve`` commands (cluster/cli.py and cluster/bench/cli.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

DEFAULT_SERVER = "127.0.0.1:50051"


def renamed_option(old: str, new: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A hidden ``old`` option that stops the command with a message naming ``new``.

    ``--address`` named the Ray cluster for ``serve`` and the gRPC API for the clients; each now has its
    own name (``--ray-address``, ``--server``), and the old one says which instead of meaning either.
    """

    def refuse(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
        if value is not None:
            raise click.UsageError(f"{old} was removed: use {new} {value}", ctx=ctx)

    return click.option(old, hidden=True, expose_value=False, callback=refuse, is_eager=True)


def server_option() -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``--server HOST:PORT`` (the gRPC API a client command calls), and the old ``--address`` refused."""

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        command = renamed_option("--address", "--server")(command)
        return click.option(
            "--server",
            default=DEFAULT_SERVER,
            show_default=True,
            metavar="HOST:PORT",
            help="gRPC API address.",
        )(command)

    return decorate
