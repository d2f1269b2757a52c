"""``python -m router.replay TRACE``: replay a trace through routing policies on a simulated pool.

Prints one table (or ``--json``) with, per policy: block hit rate, the ideal hit rate of one cache
holding all workers' capacity together, max/mean load, queueing delay, and decisions per second;
then decisions per second of the router on 4k-token prompts (``--skip-decision-bench`` to omit).
See docs/router.md for the cost model and the choice of defaults.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict

from router.config import RouterConfig
from router.replay.decision_bench import run_decision_bench
from router.replay.policies import POLICY_NAMES, make_replay_policy
from router.replay.simulator import CostModel, PolicyResult, ideal_hit_rate, simulate, to_sim_requests
from router.traces import MOONCAKE_BLOCK_TOKENS, load_trace


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m router.replay", description=__doc__.splitlines()[0])
    parser.add_argument("trace", help="Mooncake JSONL (with hash_ids) or Azure CSV trace")
    parser.add_argument("--workers", type=int, default=8, help="prefill workers in the pool (default 8)")
    parser.add_argument(
        "--capacity-blocks",
        type=int,
        default=2048,
        help="prefix-cache blocks per worker (default 2048 = 1M tokens of 512-token blocks)",
    )
    parser.add_argument(
        "--policy",
        action="append",
        choices=POLICY_NAMES,
        help="policy to replay; repeatable (default: all)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--limit", type=int, default=None, help="replay only the first N requests")
    parser.add_argument("--block-tokens", type=int, default=MOONCAKE_BLOCK_TOKENS, help="tokens per block id")
    cost = parser.add_argument_group("cost model")
    cost.add_argument(
        "--utilization",
        type=float,
        default=0.7,
        help="set the prefill rate so the pool would be this busy if nothing were cached (default 0.7)",
    )
    cost.add_argument(
        "--prefill-tokens-per-s", type=float, default=None, help="fixed prefill rate per worker"
    )
    cost.add_argument(
        "--overhead-ms", type=float, default=20.0, help="fixed cost per request (default 20 ms)"
    )
    pdserve = parser.add_argument_group("pdserve policy")
    pdserve.add_argument("--prefix-depth", type=int, default=2, help="prefix key depth in blocks (default 2)")
    pdserve.add_argument(
        "--high-watermark-tokens",
        type=int,
        default=98_304,
        help="absolute high watermark in queued prefill tokens (default 96k: about one p99-length prompt)",
    )
    pdserve.add_argument(
        "--low-watermark-tokens", type=int, default=49_152, help="absolute low watermark (default 48k)"
    )
    pdserve.add_argument(
        "--high-load-factor", type=float, default=1.5, help="relative high watermark x pool mean"
    )
    pdserve.add_argument(
        "--low-load-factor", type=float, default=1.2, help="relative low watermark x pool mean"
    )
    bench = parser.add_argument_group("decision micro-benchmark")
    bench.add_argument("--skip-decision-bench", action="store_true", help="do not run the micro-benchmark")
    bench.add_argument(
        "--bench-prompts",
        type=int,
        default=1000,
        help="4k-token prompts per run (default 1000; best of 5 runs)",
    )
    args = parser.parse_args(argv)
    if args.workers <= 0 or args.capacity_blocks <= 0:
        parser.error("--workers and --capacity-blocks must be positive")
    return args


def pdserve_config(args: argparse.Namespace) -> RouterConfig:
    """The pdserve policy's RouterConfig for this replay."""
    return RouterConfig(
        policy="prefix_hash",
        block_size=args.block_tokens,
        prefix_depth_blocks=args.prefix_depth,
        high_watermark_tokens=args.high_watermark_tokens,
        low_watermark_tokens=args.low_watermark_tokens,
        high_load_factor=args.high_load_factor,
        low_load_factor=args.low_load_factor,
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
            f"{r.queue_delay_p99_s:>11.2f} {r.ttft_p99_s:>10.2f} {r.decisions_per_s:>11,.0f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
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
        policy = make_replay_policy(name, config)
        results.append(simulate(requests, policy, args.workers, args.capacity_blocks, cost, ideal))
    bench = [] if args.skip_decision_bench else run_decision_bench(num_prompts=args.bench_prompts)
    elapsed = time.perf_counter() - started
    setup = {
        "trace": args.trace,
        "requests": len(requests),
        "workers": args.workers,
        "capacity_blocks_per_worker": args.capacity_blocks,
        "block_tokens": args.block_tokens,
        "prefill_tokens_per_s": round(cost.prefill_tokens_per_s, 1),
        "overhead_s": cost.overhead_s,
        "pdserve_config": asdict(config),
        "elapsed_s": round(elapsed, 2),
    }
    if args.json:
        payload = {
            "setup": setup,
            "policies": [asdict(r) for r in results],
            "decision_bench": [asdict(b) for b in bench],
        }
        json.dump(payload, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    print(
        f"{setup['trace']}: {len(requests)} requests, {args.workers} workers x {args.capacity_blocks} blocks "
        f"of {args.block_tokens} tokens, prefill {cost.prefill_tokens_per_s:,.0f} tokens/s/worker "
        f"+ {cost.overhead_s * 1000:.0f} ms/request"
    )
    print(format_table(results))
    for r in results:
        if r.reasons:
            print(f"  {r.policy}: " + ", ".join(f"{k} {v}" for k, v in r.reasons.items()))
    if bench:
        print("\nrouter decisions/s, 4096-token prompts, block size 16, 8 prefill workers, one core:")
        print(f"{'prefix depth (blocks)':>22} {'choose_prefill/s':>16} {'route/s':>10}")
        for b in bench:
            print(f"{b.prefix_depth_blocks:>22} {b.decisions_per_s:>16,.0f} {b.route_per_s:>10,.0f}")
    print(f"\nelapsed {elapsed:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
