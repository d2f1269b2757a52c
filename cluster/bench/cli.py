"""`pdserve bench`: replay a trace (or a Poisson / closed-loop workload) against the gRPC API, or
the OpenAI HTTP API with `--api openai` (same workloads, same records and reports).

Registered on the `pdserve` click group by cluster/cli.py; also runnable as
`python -m cluster.bench`. See docs/bench.md for options, metric definitions and outputs.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import click

from cluster.bench.config import SLO, BenchConfig, parse_length_mix
from cluster.bench.suite import Target, embedded_target, external_target, run_suite
from cluster.bench.workload import Workload
from cluster.cli_options import DEFAULT_SERVER, renamed_option
from cluster.config import MODES


def _arrival(trace: str | None, rate: float | None, concurrency: int | None) -> str:
    """Closed loop with --concurrency, Poisson with --rate, else the trace's own timestamps."""
    if rate is not None and concurrency is not None:
        raise click.UsageError("give --rate (open loop) or --concurrency (closed loop), not both")
    if concurrency is not None:
        return "closed"
    if rate is not None or trace is None:
        return "poisson"
    return "trace"


@click.command("bench")
@click.option("--server", default=DEFAULT_SERVER, show_default=True, metavar="HOST:PORT",
              help="gRPC address of a running cluster (ignored with --embedded / --compare).")
@renamed_option("--address", "--server")
@click.option("--api", type=click.Choice(["grpc", "openai"]), default="grpc", show_default=True,
              help="Send the requests through the gRPC API or the OpenAI HTTP API (/v1/completions, SSE); "
                   "ClusterInfo samples come over gRPC either way.")
@click.option("--http-server", default="127.0.0.1:8000", show_default=True, metavar="HOST:PORT",
              help="OpenAI HTTP API of a running cluster, for --api openai (ignored with --embedded).")
@click.option("--embedded", is_flag=True, help="Start an embedded local cluster for the run.")
@click.option("--mode", type=click.Choice(MODES), default="disaggregated", show_default=True,
              help="Embedded cluster mode.")
@click.option("--compare", is_flag=True,
              help="Run the workload on an embedded disaggregated and then colocated cluster; side by side.")
@click.option("--colocated-replicas", type=int, default=None,
              help="Replicas of a colocated embedded cluster [default: prefill + decode replicas].")
@click.option("--cluster-config", type=click.Path(exists=True, dir_okay=False), default=None,
              help="YAML cluster config for --embedded / --compare (mode is overridden).")
@click.option("--trace", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Mooncake .jsonl or Azure .csv trace: lengths (and arrivals unless --rate/--concurrency).")
@click.option("--rate", type=float, default=None,
              help="Poisson arrivals at this many req/s ('inf': all at once).")
@click.option("--concurrency", default=None, metavar="N[,N,...]",
              help="Closed loop with this many requests in flight; a list (1,2,4,...) sweeps the levels "
                   "on one cluster and finds the knee (cluster/bench/sweep.py).")
@click.option("--time-scale", type=float, default=1.0, show_default=True,
              help="Trace replay: trace seconds x this = replay seconds (2 = half the trace's rate).")
@click.option("--length-scale", type=float, default=1.0, show_default=True,
              help="Trace prompt and output lengths x this (then clipped to --max-context).")
@click.option("--lengths", default="256x64", show_default=True,
              help="Without --trace: INPUTxOUTPUT[:WEIGHT],... length classes, e.g. 32x64:0.9,1536x2:0.1.")
@click.option("--duration", type=float, default=None, help="Stop issuing requests after this many seconds.")
@click.option("--num-requests", type=int, default=None, help="Stop after this many requests.")
@click.option("--trace-start", type=float, default=0.0, show_default=True,
              help="Skip the trace's first seconds (trace time).")
@click.option("--goodput", "goodput", multiple=True, metavar="ttft:MS tpot:MS",
              help="SLOs for goodput, e.g. --goodput ttft:500 --goodput tpot:50 (or 'ttft:500 tpot:50').")
@click.option("--max-context", type=int, default=4096, show_default=True, help="Model context length.")
@click.option("--vocab-size", type=int, default=256, show_default=True,
              help="Synthesized token ids lie in [0, this) (the built-in model's byte tokens: 256).")
@click.option("--block-tokens", type=int, default=512, show_default=True,
              help="Tokens per trace hash id before --length-scale (Mooncake: 512).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--tenant", default="", help="tenant_id sent with every request.")
@click.option("--warmup", type=int, default=1, show_default=True, help="Unrecorded warm-up requests.")
@click.option("--poll-interval", type=float, default=0.5, show_default=True,
              help="Seconds between ClusterInfo samples (per-pool utilization).")
@click.option("--timeout", type=float, default=600.0, show_default=True, help="Per-request timeout (s).")
@click.option("--output-dir", type=click.Path(file_okay=False), default=None,
              help="Results folder [default: bench-out/<UTC time>].")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.argument("more_slo", nargs=-1, metavar="[ttft:MS|tpot:MS|e2e:MS]...")
def bench(server: str, api: str, http_server: str, embedded: bool, mode: str, compare: bool,
          colocated_replicas: int | None, cluster_config: str | None,
          trace: str | None, rate: float | None, concurrency: str | None, time_scale: float,
          length_scale: float, lengths: str, duration: float | None, num_requests: int | None,
          trace_start: float, goodput: tuple[str, ...], max_context: int, vocab_size: int,
          block_tokens: int, seed: int, tenant: str, warmup: int, poll_interval: float, timeout: float,
          output_dir: str | None, no_progress: bool, more_slo: tuple[str, ...]) -> None:
    """Benchmark a pdserve cluster: TTFT, TPOT, ITL, E2E, goodput, cache hits, KV transfer, pool load.

    Trailing SLO items continue --goodput, so vLLM's `--goodput ttft:500 tpot:50` works as is.
    """
    from cluster.bench.sweep import embedded_kv_budget, parse_levels, run_sweep

    try:
        levels = parse_levels(concurrency) if concurrency is not None else []
    except ValueError as error:
        raise click.BadParameter(str(error)) from None
    arrival = _arrival(trace, rate, levels[0] if levels else None)
    try:
        config = BenchConfig(
            arrival=arrival, trace=trace, rate=rate if rate is not None else 1.0,
            concurrency=levels[0] if levels else 1, time_scale=time_scale, length_scale=length_scale,
            lengths=parse_length_mix(lengths), duration_s=duration,
            num_requests=num_requests or (8 if len(levels) > 1 else None),  # a sweep sizes each level itself
            trace_start_s=trace_start, max_context=max_context, vocab_size=vocab_size,
            block_tokens=block_tokens, slo=SLO.parse(goodput + more_slo), seed=seed, tenant_id=tenant,
            poll_interval_s=poll_interval, request_timeout_s=timeout, warmup_requests=warmup)
    except ValueError as error:
        raise click.BadParameter(str(error)) from None
    if math.isinf(config.rate) and config.arrival == "poisson" and config.num_requests is None:
        raise click.BadParameter("--rate inf needs --num-requests")
    out_dir = Path(output_dir or f"bench-out/{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}")
    targets = _targets(server, http_server, embedded, mode, compare, cluster_config, colocated_replicas)
    if len(levels) > 1:  # a concurrency sweep: one cluster, every level in turn
        budget = embedded_kv_budget(cluster_config) if embedded else None
        run_sweep(config, levels, targets[0], out_dir, kv_budget_bytes=budget, show_progress=not no_progress,
                  echo=click.echo, requests_per_level=num_requests)
        return
    try:
        run_suite(config, Workload(config), targets, out_dir, show_progress=not no_progress, echo=click.echo,
                  api=api)
    except (RuntimeError, TimeoutError) as error:   # unreachable server, failed warm-up
        raise click.ClickException(f"{type(error).__name__}: {error}") from error


def _targets(server: str, http_server: str, embedded: bool, mode: str, compare: bool,
             cluster_config: str | None, colocated_replicas: int | None) -> list[Target]:
    if not (embedded or compare):
        return [external_target(server, http_address=http_server)]
    base = None
    if cluster_config is not None:
        from cluster.config import load_config

        base = load_config(cluster_config)
    modes = MODES if compare else (mode,)
    return [embedded_target(m, base, colocated_replicas) for m in modes]
