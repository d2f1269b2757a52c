"""``python -m router.replay TRACE``: replay a trace through routing policies on a simulated pool.

Prints one table (or ``--json``) with, per policy: block hit rate, the ideal hit rate of one cache
holding all workers' capacity together, max/mean load, queueing delay, and decisions per second;
then decisions per second of the router on 4k-token prompts (``--skip-decision-bench`` to omit).
See docs/router.md for the cost model and the choice of defaults.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import asdict, dataclass

import click

from router.config import RouterConfig
from router.replay.decision_bench import CacheAwareBenchResult, run_cache_aware_bench, run_decision_bench
from router.replay.policies import POLICY_NAMES, make_replay_policy
from router.replay.simulator import CostModel, PolicyResult, ideal_hit_rate, simulate, to_sim_requests
from router.traces import load_trace, trace_block_tokens


@dataclass(frozen=True)
class ReplaySettings:
    """One replay's options: the command line's, by the same names (defaults live on the options)."""

    trace: str
    workers: int
    capacity_blocks: int
    policy: tuple[str, ...]
    json: bool
    limit: int | None
    block_tokens: int | None
    utilization: float
    prefill_tokens_per_s: float | None
    overhead_ms: float
    prefix_depth: int
    high_watermark_tokens: int
    low_watermark_tokens: int
    high_load_factor: float
    low_load_factor: float
    replicate_margin_tokens: int
    split_margin_tokens: int
    new_prefix_slack_tokens: int
    new_prefix_work_factor: float
    summary_period_s: float
    summary_max_keys: int
    skip_decision_bench: bool
    bench_prompts: int


def _positive(ctx: click.Context, param: click.Parameter, value: int) -> int:
    if value <= 0:
        raise click.BadParameter("must be positive")
    return value


@click.command(help="Replay a trace through routing policies on a simulated pool.")
@click.argument("trace")
@click.option(
    "--workers",
    type=int,
    default=8,
    callback=_positive,
    help="prefill workers in the pool (default 8)",
)
@click.option(
    "--capacity-blocks",
    type=int,
    default=2048,
    callback=_positive,
    help="prefix-cache blocks per worker (default 2048 = 1M tokens of 512-token blocks)",
)
@click.option(
    "--policy",
    multiple=True,
    type=click.Choice(POLICY_NAMES),
    help="policy to replay; repeatable (default: all)",
)
@click.option("--json", is_flag=True, help="print JSON instead of a table")
@click.option("--limit", type=int, default=None, help="replay only the first N requests")
@click.option(
    "--block-tokens",
    type=int,
    default=None,
    help="tokens per block id (default: the trace's own: Mooncake 512, AIBrix 16, Azure 512)",
)
# cost model
@click.option(
    "--utilization",
    type=float,
    default=0.7,
    help="cost model: prefill rate so that the pool would be this busy if nothing were cached (default 0.7)",
)
@click.option(
    "--prefill-tokens-per-s",
    type=float,
    default=None,
    help="cost model: fixed prefill rate per worker",
)
@click.option(
    "--overhead-ms",
    type=float,
    default=20.0,
    help="cost model: fixed cost per request (default 20 ms)",
)
# pdserve policy
@click.option(
    "--prefix-depth",
    type=int,
    default=2,
    help="pdserve policy: prefix key depth in blocks (default 2)",
)
@click.option(
    "--high-watermark-tokens",
    type=int,
    default=98_304,
    help="pdserve policy: absolute high watermark in queued prefill tokens (default 96k: ~ one p99 prompt)",
)
@click.option(
    "--low-watermark-tokens",
    type=int,
    default=49_152,
    help="pdserve policy: absolute low watermark (default 48k)",
)
@click.option(
    "--high-load-factor",
    type=float,
    default=1.5,
    help="pdserve policy: relative high watermark x pool mean",
)
@click.option(
    "--low-load-factor",
    type=float,
    default=1.2,
    help="pdserve policy: relative low watermark x pool mean",
)
@click.option(
    "--replicate-margin-tokens",
    type=int,
    default=RouterConfig().replicate_margin_tokens,
    help="pdserve (cache_aware): leave a prefix's holders only when this much cheaper elsewhere",
)
@click.option(
    "--split-margin-tokens",
    type=int,
    default=RouterConfig().split_margin_tokens,
    help="pdserve (cache_aware): another holder takes a prompt from the primary when this much cheaper",
)
@click.option(
    "--new-prefix-slack-tokens",
    type=int,
    default=RouterConfig().new_prefix_slack_tokens,
    help="pdserve (cache_aware): a new prefix takes the first ring worker within this of the cheapest",
)
@click.option(
    "--new-prefix-work-factor",
    type=float,
    default=RouterConfig().new_prefix_work_factor,
    help="pdserve (cache_aware): a new prefix skips ring workers with more work than this x mean (0: off)",
)
@click.option(
    "--summary-period-s",
    type=float,
    default=RouterConfig().summary_period_s,
    help="pdserve (cache_aware): simulated seconds between two summary rebuilds of a worker",
)
@click.option(
    "--summary-max-keys",
    type=int,
    default=RouterConfig().summary_max_keys,
    help="pdserve (cache_aware): cap on the probe keys in one worker's summary",
)
# decision micro-benchmark
@click.option("--skip-decision-bench", is_flag=True, help="do not run the decision micro-benchmark")
@click.option(
    "--bench-prompts",
    type=int,
    default=1000,
    help="decision micro-benchmark: 4k-token prompts per run (default 1000; best of 5 runs)",
)
def cli(**options: object) -> int:
    return run(ReplaySettings(**options))  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: sys.argv) and replay; the exit status (errors raise click's exceptions)."""
    return int(cli.main(args=argv, prog_name="python -m router.replay", standalone_mode=False))


def pdserve_config(args: ReplaySettings) -> RouterConfig:
    """The pdserve policy's RouterConfig for this replay."""
    return RouterConfig(
        policy="prefix_hash",
        block_size=args.block_tokens,
        prefix_depth_blocks=args.prefix_depth,
        high_watermark_tokens=args.high_watermark_tokens,
        low_watermark_tokens=args.low_watermark_tokens,
        high_load_factor=args.high_load_factor,
        low_load_factor=args.low_load_factor,
        replicate_margin_tokens=args.replicate_margin_tokens,
        split_margin_tokens=args.split_margin_tokens,
        new_prefix_slack_tokens=args.new_prefix_slack_tokens,
        new_prefix_work_factor=args.new_prefix_work_factor,
        summary_max_keys=args.summary_max_keys,
    )




def vs_ideal(result: PolicyResult) -> str:
    return f"{result.hit_rate_vs_ideal:.1%}" if result.ideal_hit_rate > 0 else "n/a"


def format_table(results: list[PolicyResult]) -> str:
    header = (
        f"{'policy':<20} {'hit rate':>8} {'ideal':>6} {'vs ideal':>8} {'load max/mean':>13} "
        f"{'req max/mean':>12} {'queue p50 s':>11} {'queue p99 s':>11} {'ttft p99 s':>10} {'decisions/s':>11}"
    )
    lines = [header, "-" * len(header)]
    for r in results:
        lines.append(
            f"{r.policy:<20} {r.block_hit_rate:>8.3f} {r.ideal_hit_rate:>6.3f} {vs_ideal(r):>8} "
            f"{r.load_max_over_mean:>13.2f} {r.requests_max_over_mean:>12.2f} {r.queue_delay_p50_s:>11.2f} "
            f"{r.queue_delay_p99_s:>11.2f} {r.ttft_p99_s:>10.3f} {r.decisions_per_s:>11,.0f}"
        )
    return "\n".join(lines)


def run(args: ReplaySettings) -> int:
    """Replay ``args.trace`` through the policies; print the table (or JSON); 0."""
    started = time.perf_counter()
    if args.block_tokens is None:
        args = dataclasses.replace(args, block_tokens=trace_block_tokens(args.trace))
    records = load_trace(args.trace)
    if args.limit is not None:
        records = records[: args.limit]
    requests = to_sim_requests(records, args.block_tokens)
    if args.prefill_tokens_per_s is not None:
        cost = CostModel(args.prefill_tokens_per_s, args.overhead_ms / 1000, args.block_tokens)
    else:
        cost = CostModel.for_utilization(
            requests, args.workers, args.utilization, args.overhead_ms / 1000, args.block_tokens
        )
    config = pdserve_config(args)
    ideal = ideal_hit_rate(requests, args.workers * args.capacity_blocks)
    results = []
    for name in args.policy or POLICY_NAMES:
        policy = make_replay_policy(name, config, args.summary_period_s)
        results.append(simulate(requests, policy, args.workers, args.capacity_blocks, cost, ideal))
    bench = [] if args.skip_decision_bench else run_decision_bench(num_prompts=args.bench_prompts)
    cache_bench = None if args.skip_decision_bench else run_cache_aware_bench(num_prompts=args.bench_prompts)
    elapsed = time.perf_counter() - started
    setup = {
        "trace": args.trace,
        "requests": len(requests),
        "workers": args.workers,
        "capacity_blocks_per_worker": args.capacity_blocks,
        "block_tokens": args.block_tokens,
        "prefill_tokens_per_s": round(cost.prefill_tokens_per_s, 1),
        "overhead_s": cost.overhead_s,
        "pdserve_config": config.model_dump(),
        "elapsed_s": round(elapsed, 2),
    }
    if args.json:
        payload = {
            "setup": setup,
            "policies": [asdict(r) for r in results],
            "decision_bench": [asdict(b) for b in bench],
            "cache_aware_bench": asdict(cache_bench) if cache_bench else None,
        }
        json.dump(payload, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    print(
        f"{setup['trace']}: {len(requests)} requests, {args.workers} workers x {args.capacity_blocks} blocks "
        f"of {args.block_tokens} tokens, prefill {cost.prefill_tokens_per_s:,.0f} tokens/s/worker "
        f"+ {cost.overhead_s * 1000:.0f} ms/request"
    )
    print_report(results, bench, cache_bench)
    print(f"\nelapsed {elapsed:.1f} s")
    return 0


def print_report(results: list[PolicyResult], bench: list, cache_bench: object | None) -> None:
    """The table, each policy's reasons, and the decision micro-benchmarks."""
    print(format_table(results))
    for r in results:
        if r.reasons:
            print(f"  {r.policy}: " + ", ".join(f"{k} {v}" for k, v in r.reasons.items()))
    if bench:
        print("\nrouter decisions per CPU-second, 4096-token prompts, block size 16, 8 prefill workers:")
        print(f"{'prefix depth (blocks)':>22} {'choose_prefill/s':>16} {'route/s':>10}")
        for b in bench:
            print(f"{b.prefix_depth_blocks:>22} {b.decisions_per_s:>16,.0f} {b.route_per_s:>10,.0f}")
    if cache_bench is not None:
        assert isinstance(cache_bench, CacheAwareBenchResult)
        print(
            f"cache_aware (pdserve), same prompts' shape (half later turns), {cache_bench.summary_keys} keys "
            f"per summary, reports every 64 decisions: choose_prefill {cache_bench.decisions_per_s:,.0f}/s, "
            f"route {cache_bench.route_per_s:,.0f}/s per CPU-second "
            f"({cache_bench.decisions_per_wall_s:,.0f}/s, {cache_bench.route_per_wall_s:,.0f}/s wall clock; "
            f"load average {cache_bench.load_average[0]:.1f} -> {cache_bench.load_average[1]:.1f})"
        )


if __name__ == "__main__":
    cli(prog_name="python -m router.replay")
