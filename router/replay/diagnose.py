"""``python -m router.replay.diagnose TRACE``: where one replay of the ``pdserve`` policy loses hits and
balance (issue 18: which requests miss, which worker is the busiest and why).

Lost hits (against the run's ideal, one LRU cache of the whole pool's blocks serving every request):

- *placement*: a request went to a worker holding fewer of its leading blocks than the best worker
  did at that moment, counted per route reason (``replicate``: a copy of a prefix whose holders were
  too busy; ``ring_walk`` / ``ring_owner``: a new prefix; ``cache_split``: another holder);
- *partition*: no worker held what the global LRU held (per-worker LRUs evicted it), less the
  *gains* (a worker held what the global LRU had evicted).

For every ``replicate`` it also sums what the holder (the worker that served the conversation's
previous request) had in its FIFO at that moment, by the route reason of the requests queued there:
a long new prompt in front of a conversation's later turn, or the conversation's own turns.
Balance: the busiest workers' busy time against the mean, and their route reasons.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass

import click

from router.config import RouterConfig
from router.replay.cache import LRUPrefixCache
from router.replay.policies import make_replay_policy
from router.replay.simulator import CostModel, ideal_hit_rate, percentile, simulate, to_sim_requests
from router.traces import load_trace, trace_block_tokens


@dataclass
class Placed:
    """One placed request, as the diagnosis reads it."""

    worker: int
    reason: str
    hit: int
    best: int
    ideal: int
    arrival_s: float
    finish_s: float
    tokens: int
    conversation: int  # the block id after the shared first one (Mooncake: a conversation's own)


def replay_placements(requests, config: RouterConfig, workers: int, capacity_blocks: int, cost: CostModel):
    """(the run's PolicyResult, busy seconds per worker, the placements in arrival order)."""
    policy = make_replay_policy("pdserve", config, config.summary_period_s)
    ideal_cache = LRUPrefixCache(workers * capacity_blocks)
    placed: list[Placed] = []
    seen: Counter[str] = Counter()

    def note(request, index, hit, best, start_s, finish_s) -> None:
        reason = next(k for k, v in policy.reasons.items() if v != seen[k])
        seen[reason] += 1
        ideal = ideal_cache.match(request.block_ids)
        ideal_cache.insert(request.block_ids)
        conversation = request.block_ids[1] if len(request.block_ids) > 1 else -1
        placed.append(
            Placed(
                index, reason, hit, best, ideal, request.arrival_s, finish_s, request.num_tokens, conversation
            )
        )

    ideal = ideal_hit_rate(requests, workers * capacity_blocks)
    result = simulate(requests, policy, workers, capacity_blocks, cost, ideal, on_request=note)
    busy = [0.0] * workers
    for p in placed:
        busy[p.worker] += cost.service_s(max(0, p.tokens - p.hit * cost.block_tokens))
    return result, busy, placed


def replicate_causes(placed: list[Placed], cost: CostModel) -> tuple[int, Counter[str]]:
    """(replicates whose conversation was seen before, queued tokens in the holder's FIFO by reason)."""
    by_worker: dict[int, list[Placed]] = defaultdict(list)
    for p in placed:
        by_worker[p.worker].append(p)
    last_worker: dict[int, int] = {}
    queued: Counter[str] = Counter()
    count = 0
    for p in placed:
        holder = last_worker.get(p.conversation)
        if p.reason == "replicate" and holder is not None:
            count += 1
            for q in by_worker[holder]:
                if q.arrival_s < p.arrival_s < q.finish_s:
                    queued[q.reason] += max(0, q.tokens - q.hit * cost.block_tokens)
        last_worker[p.conversation] = p.worker
    return count, queued


def report(result, busy: list[float], placed: list[Placed], cost: CostModel) -> list[str]:
    """The diagnosis as lines of text."""
    ideal = sum(p.ideal for p in placed)
    lost = ideal - sum(p.hit for p in placed)
    placement: Counter[str] = Counter()
    partition = gains = 0
    for p in placed:
        placement[p.reason] += p.best - p.hit
        partition += max(0, p.ideal - p.best)
        gains += max(0, p.best - p.ideal)
    mean = sum(busy) / len(busy)
    lines = [
        f"vs ideal {result.hit_rate_vs_ideal:.2%}, load max/mean {result.load_max_over_mean:.3f}, "
        f"TTFT p99 {result.ttft_p99_s:.3f} s, queue p99 {result.queue_delay_p99_s:.2f} s",
        f"ideal hits {ideal} blocks, lost {lost}: placement {dict(placement.most_common())}; "
        f"partition {partition}, gains over the global LRU {gains}",
        f"reasons {result.reasons}",
    ]
    count, queued = replicate_causes(placed, cost)
    total = sum(queued.values())
    lines.append(
        f"{count} replicates of a seen conversation; the holder's FIFO held {total} uncached tokens: "
        + ", ".join(f"{k} {v} ({v / total:.0%})" for k, v in queued.most_common())
        if total
        else f"{count} replicates of a seen conversation"
    )
    for index in sorted(range(len(busy)), key=lambda i: -busy[i])[:3]:
        mine = Counter(p.reason for p in placed if p.worker == index)
        lines.append(
            f"worker {index}: busy {busy[index]:.0f} s ({busy[index] / mean:.3f} x mean), {dict(mine)}"
        )
    threshold = percentile([p.finish_s - p.arrival_s for p in placed], 0.99)
    top = [p for p in placed if p.finish_s - p.arrival_s >= threshold]
    lines.append(f"TTFT >= p99 ({len(top)} requests): {dict(Counter(p.reason for p in top))}")
    return lines


@click.command(help="Diagnose one pdserve replay: lost hits by cause, busiest workers.")
@click.argument("trace")
@click.option("--workers", type=int, default=8)
@click.option("--capacity-blocks", type=int, default=2048)
@click.option("--utilization", type=float, default=0.7)
@click.option("--hash-seed", default=RouterConfig().hash_seed, help="ring seed (spread across rings)")
@click.option("--new-prefix-work-factor", type=float, default=RouterConfig().new_prefix_work_factor)
def cli(
    trace: str,
    workers: int,
    capacity_blocks: int,
    utilization: float,
    hash_seed: str,
    new_prefix_work_factor: float,
) -> None:
    block_tokens = trace_block_tokens(trace)
    requests = to_sim_requests(load_trace(trace), block_tokens)
    cost = CostModel.for_utilization(requests, workers, utilization, 0.02, block_tokens)
    config = RouterConfig(
        policy="cache_aware",
        block_size=block_tokens,
        hash_seed=hash_seed,
        new_prefix_work_factor=new_prefix_work_factor,
    )
    result, busy, placed = replay_placements(requests, config, workers, capacity_blocks, cost)
    click.echo("\n".join(report(result, busy, placed, cost)))


if __name__ == "__main__":
    cli(prog_name="python -m router.replay.diagnose")
