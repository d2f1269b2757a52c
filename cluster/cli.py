"""The ``pdserve`` command: ``serve`` (run the cluster), ``generate`` and ``info`` (clients), ``bench``.

``pdserve serve`` with no arguments starts an embedded local Ray, SmolLM2-135M-Instruct (bfloat16), one
prefill and one decode replica on fractional CPUs, and the gRPC API on 127.0.0.1:50051. ``pdserve chat``
talks with it (cluster/chat_cli.py); ``pdserve generate --chat TEXT`` sends one user message. Ctrl-C or
SIGTERM deletes the application and shuts Serve and Ray down.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from typing import Any

import click
import grpc

from cluster.auth import check_exposure
from cluster.cli_options import DEFAULT_SERVER, renamed_option
from cluster.config import MODES, ConfigError, load_config
from cluster.keys_cli import api_key_options


@click.group()
def main() -> None:
    """pdserve: disaggregated prefill/decode LLM serving on Ray Serve."""


def _raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


@main.command()
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Cluster YAML file (see docs/operations.md). Unknown fields are refused.",
)
@click.option(
    "--model",
    default=None,
    help="Model id (smollm2-135m-instruct, the default; pdserve-builtin-tiny: random test weights), a .gguf "
    "file, or a local Hugging Face checkpoint directory.",
)
@click.option(
    "--ray-address",
    default=None,
    metavar="ADDR",
    help="Join this running Ray cluster (e.g. auto, 10.0.0.1:6379, ray://head:10001) instead of "
    "starting a local one.",
)
@click.option(
    "--dtype",
    type=click.Choice(["float32", "bfloat16"]),
    default=None,
    help="Serving and KV dtype (default bfloat16: faster on CPUs with AVX512-BF16).",
)
@renamed_option("--address", "--ray-address")
@click.option("--host", default=None, help="Bind the gRPC API to this host (default 127.0.0.1).")
@click.option("--port", type=int, default=None, help="gRPC API port (default 50051; 0 picks a free one).")
@click.option(
    "--http-port", type=int, default=None, help="OpenAI HTTP API port (default 8000; 0 picks a free one)."
)
@click.option(
    "--mode",
    type=click.Choice(MODES),
    default=None,
    help="Override the config's mode.",
)
def serve(
    config_path: str | None,
    model: str | None,
    dtype: str | None,
    ray_address: str | None,
    host: str | None,
    port: int | None,
    http_port: int | None,
    mode: str | None,
) -> None:
    """Start the cluster and serve the gRPC API until Ctrl-C / SIGTERM."""
    try:
        flags = {"engine.model": model, "engine.dtype": dtype, "mode": mode}
        flags |= {"grpc.host": host, "grpc.port": port, "http.port": http_port}
        config = load_config(config_path).override({k: v for k, v in flags.items() if v is not None})
        check_exposure(config.auth, {"grpc.host": config.grpc.host, "http.host": config.http.host})
    except (ConfigError, ValueError, OSError) as error:
        click.echo(f"pdserve: invalid configuration: {error}", err=True)
        sys.exit(2)
    from cluster.embedded import EmbeddedCluster

    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    # a shell starts a background job with SIGINT ignored, and Python then installs no Ctrl-C handler:
    # `pdserve serve &` followed by `kill -INT` must still shut down cleanly
    signal.signal(signal.SIGINT, _raise_keyboard_interrupt)
    cluster = EmbeddedCluster(config, address=ray_address)
    try:
        cluster.start()
        # ray.init installs its own SIGTERM handler (it dumps a stack and aborts mid-shutdown): take it back
        signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
        http = f", OpenAI HTTP on http://{cluster.http_address}" if cluster.http_address else ""
        click.echo(
            f"pdserve: serving {config.engine.model} ({config.mode}) gRPC on {cluster.grpc_address}{http}",
            err=True,
        )
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        click.echo("pdserve: shutting down", err=True)
    except ConfigError as error:  # found at start, not while parsing (e.g. cuda asked, no GPU seen)
        click.echo(f"pdserve: invalid configuration: {error}", err=True)
        sys.exit(2)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        cluster.stop()


@main.command()
@click.argument("text")
@click.option(
    "--server", default=DEFAULT_SERVER, show_default=True, metavar="HOST:PORT", help="gRPC API address."
)
@renamed_option("--address", "--server")
@click.option("--max-tokens", type=int, default=64, show_default=True)
@click.option("--temperature", type=float, default=None, help="0 = greedy (default).")
@click.option("--top-p", type=float, default=None)
@click.option("--top-k", type=int, default=None)
@click.option("--seed", type=int, default=None)
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@click.option("--tenant", default="", help="Tenant id (prefix-cache isolation).")
@click.option("--ignore-eos", is_flag=True)
@click.option("--chat", "as_chat", is_flag=True, help="Send TEXT as one user message (the chat template).")
@click.option("--timeout", type=float, default=300.0, show_default=True, help="Seconds for the whole call.")
@click.option(
    "--json", "as_json", is_flag=True, help="Print token ids, text, usage, timings and route as JSON."
)
@api_key_options
def generate(
    text: str,
    server: str,
    max_tokens: int,
    temperature: float | None,
    top_p: float | None,
    top_k: int | None,
    seed: int | None,
    stop: tuple[str, ...],
    tenant: str,
    ignore_eos: bool,
    as_chat: bool,
    timeout: float,
    as_json: bool,
    api_key: str | None,
    tls_ca: str | None,
) -> None:
    """Generate from TEXT; prints the text as it streams (or JSON with --json)."""
    from cluster.client import collect, connect
    from protos import pdserve_pb2 as pb

    request = pb.GenerateRequest(
        max_tokens=max(0, max_tokens), stop=list(stop), tenant_id=tenant, ignore_eos=ignore_eos
    )
    if as_chat:
        request.messages.messages.add(role="user", content=text)
    else:
        request.text = text
    for name, value in (("temperature", temperature), ("top_p", top_p), ("top_k", top_k), ("seed", seed)):
        if value is not None:
            setattr(request, name, value)
    channel, stub = connect(server, api_key, tls_ca)
    try:
        responses = stub.Generate(request, timeout=timeout)
        if as_json:
            click.echo(json.dumps(collect(responses).to_dict(), indent=2))
        else:
            for response in responses:
                click.echo(response.text, nl=False)
            click.echo()
    except grpc.RpcError as error:
        click.echo(f"pdserve: {error.code().name}: {error.details()}", err=True)
        sys.exit(1)
    finally:
        channel.close()


@main.command()
@click.option(
    "--server", default=DEFAULT_SERVER, show_default=True, metavar="HOST:PORT", help="gRPC API address."
)
@renamed_option("--address", "--server")
@api_key_options
def info(server: str, api_key: str | None, tls_ca: str | None) -> None:
    """Print ClusterInfo (pools, replicas, load, KV blocks, prefix hit rate) as JSON."""
    from google.protobuf.json_format import MessageToDict

    from cluster.client import connect
    from protos import pdserve_pb2 as pb

    channel, stub = connect(server, api_key, tls_ca)
    try:
        response = stub.ClusterInfo(pb.ClusterInfoRequest(), timeout=30)
        click.echo(json.dumps(MessageToDict(response, always_print_fields_with_no_presence=True), indent=2))
    except grpc.RpcError as error:
        click.echo(f"pdserve: {error.code().name}: {error.details()}", err=True)
        sys.exit(1)
    finally:
        channel.close()


def _register_bench() -> None:
    from cluster.bench.cli import bench
    from cluster.chat_cli import chat
    from cluster.keys_cli import keys

    main.add_command(bench)
    main.add_command(chat)
    main.add_command(keys)
    from cluster.top import top

    main.add_command(top)  # pdserve top: the per-tenant KV review, live (docs/observability.md)
    from capacity.cli import plan_command
    from capacity.simulate_cli import simulate

    main.add_command(plan_command)  # pdserve plan (capacity/, docs/capacity.md)
    main.add_command(simulate)


_register_bench()
