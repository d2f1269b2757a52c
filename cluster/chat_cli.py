"""``pdserve chat``: an interactive conversation with the served model, one line of stdin per turn.

The whole conversation goes out as ``messages`` on every turn (the server renders it with the model's
chat template), so turn N+1's prompt starts with turn N's: the prefill replica serves that part from its
prefix cache, and each turn's line on stderr shows it (``cached`` prompt tokens and TTFT). Reads stdin
line by line, so a pipe can drive it; ``/exit`` or end of input ends it, ``/reset`` starts over.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence

import click
import grpc

from cluster.cli_options import server_option
from protos import pdserve_pb2 as pb

EXIT_COMMANDS = ("/exit", "/quit")


def chat_request(
    messages: Sequence[tuple[str, str]], max_tokens: int, **fields: object
) -> pb.GenerateRequest:
    """A Generate request whose prompt is the conversation ``[(role, content), ...]``."""
    conversation = pb.ChatMessages(messages=[pb.ChatMessage(role=r, content=c) for r, c in messages])
    request = pb.GenerateRequest(messages=conversation, max_tokens=max_tokens)
    for name, value in fields.items():
        if value is not None:
            setattr(request, name, value)
    return request


def _turns(lines: Iterator[str], interactive: bool) -> Iterator[str]:
    while True:
        if interactive:
            click.echo(">>> ", nl=False, err=True)
        line = next(lines, None)
        if line is None:
            return
        text = line.rstrip("\n")
        if text.strip() in EXIT_COMMANDS:
            return
        if text.strip():
            yield text


def _answer(stub: object, request: pb.GenerateRequest, timeout: float) -> tuple[str, pb.GenerateResponse]:
    """Stream one answer to stdout; its text and the last message (usage, timings)."""
    text, last = "", pb.GenerateResponse()
    for response in stub.Generate(request, timeout=timeout):  # type: ignore[attr-defined]
        click.echo(response.text, nl=False)
        text += response.text
        last = response
    click.echo()
    return text, last


@click.command()
@server_option()
@click.option("--system", default=None, help="A system message to open the conversation with.")
@click.option("--max-tokens", type=int, default=256, show_default=True, help="Per answer.")
@click.option("--temperature", type=float, default=None, help="0 = greedy (default).")
@click.option("--seed", type=int, default=None)
@click.option("--tenant", default="", help="Tenant id (prefix-cache isolation).")
@click.option("--timeout", type=float, default=300.0, show_default=True, help="Seconds per answer.")
def chat(
    server: str,
    system: str | None,
    max_tokens: int,
    temperature: float | None,
    seed: int | None,
    tenant: str,
    timeout: float,
) -> None:
    """Talk with the served model: one user message per line of input; /exit or end of input ends."""
    from cluster.client import connect

    opening = [("system", system)] if system else []
    messages = list(opening)
    channel, stub = connect(server)
    try:
        for user_text in _turns(iter(sys.stdin.readline, ""), sys.stdin.isatty()):
            if user_text.strip() == "/reset":
                messages = list(opening)
                continue
            messages.append(("user", user_text))
            request = chat_request(
                messages, max(0, max_tokens), temperature=temperature, seed=seed, tenant_id=tenant
            )
            answer, last = _answer(stub, request, timeout)
            messages.append(("assistant", answer))
            usage = last.usage
            click.echo(
                f"[turn {sum(role == 'user' for role, _ in messages)}: prompt {usage.prompt_tokens} tokens, "
                f"cached {usage.cached_tokens}, answer {usage.completion_tokens}, "
                f"TTFT {last.timings.ttft_ms:.0f} ms]",
                err=True,
            )
    except grpc.RpcError as error:
        click.echo(f"pdserve: {error.code().name}: {error.details()}", err=True)
        sys.exit(1)
    finally:
        channel.close()
