"""Micro-benchmark: router decisions per second on 4k-token prompts, hashing included.

Each decision is ``Router.choose_prefill`` on a fresh 4,096-token list (block size 16): the prefix key
(chain hash of the leading ``prefix_depth_blocks`` blocks), the ring lookup and the watermark check.
Every worker sends a load report every ``report_every`` decisions, inside the timed loop (ingesting
reports is router work too). One process, one core; timed in CPU time of the deciding thread
(``time.thread_time``), so that other jobs on a shared machine do not count against the router.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

from router.config import RouterConfig
from router.load import LoadReport
from router.router import Router
from router.summary import PrefixSummary, probe_keys


@dataclass(frozen=True)
class DecisionBenchResult:
    """Decisions per second at one prefix depth."""

    prefix_depth_blocks: int
    prompt_tokens: int
    block_size: int
    num_workers: int
    decisions_per_s: float
    route_per_s: float  # prefill + decode choice


def _prompts(num_prompts: int, prompt_tokens: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    vocab = range(128_000)
    return [rng.choices(vocab, k=prompt_tokens) for _ in range(num_prompts)]


def _run(
    router: Router, prompts: list[list[int]], num_workers: int, report_every: int, with_decode: bool
) -> float:
    prefill_ids = router.prefill_ids
    decode_ids = router.decode_ids
    start = time.thread_time()
    for i, tokens in enumerate(prompts):
        if i % report_every == 0:
            for j, worker_id in enumerate(prefill_ids):
                router.update_load(LoadReport(worker_id, (j * 997) % 6000, j % 4, 1000, 1000, float(i)))
            for j, worker_id in enumerate(decode_ids):
                router.update_load(LoadReport(worker_id, 0, j, 500 + j, 1000, float(i)))
        if with_decode:
            router.route(tokens, expected_num_blocks=300)
        else:
            router.choose_prefill(tokens)
    return len(prompts) / (time.thread_time() - start)


def run_decision_bench(
    config: RouterConfig | None = None,
    depths: tuple[int, ...] = (1, 2, 4, 8, 16, 64),
    num_prompts: int = 1000,
    prompt_tokens: int = 4096,
    num_workers: int = 8,
    report_every: int = 64,
    repeats: int = 5,
    seed: int = 0,
) -> list[DecisionBenchResult]:
    """Decisions per second for each prefix depth (block size from ``config``, default 16).

    Each figure is the best of ``repeats`` runs over ``num_prompts`` distinct prompts (as ``timeit``
    advises: slower runs measure interference from other processes, not the code).
    """
    base = config if config is not None else RouterConfig()
    prompts = _prompts(num_prompts, prompt_tokens, seed)
    results = []
    for depth in depths:
        router_config = base.model_copy(update={"policy": "prefix_hash", "prefix_depth_blocks": depth})
        rates = []
        for with_decode in (False, True):
            best = 0.0
            for _ in range(repeats):
                router = Router(router_config)
                router.set_workers(
                    [f"prefill-{i}" for i in range(num_workers)], [f"decode-{i}" for i in range(4)]
                )
                best = max(best, _run(router, prompts, num_workers, report_every, with_decode))
            rates.append(best)
        results.append(
            DecisionBenchResult(
                depth, prompt_tokens, router_config.block_size, num_workers, rates[0], rates[1]
            )
        )
    return results


@dataclass(frozen=True)
class CacheAwareBenchResult:
    """cache_aware decisions per second with prefix summaries in the reports."""

    prompt_tokens: int
    block_size: int
    num_workers: int
    summary_keys: int  # keys in each worker's summary
    decisions_per_s: float
    route_per_s: float


def _cache_aware_prompts(num_prompts: int, prompt_tokens: int, seed: int) -> list[tuple[int, ...]]:
    """Half fresh prompts, half "later turns": an earlier prompt's first 3/4 plus new tokens."""
    rng = random.Random(seed)
    vocab = range(128_000)
    prompts: list[tuple[int, ...]] = []
    for i in range(num_prompts):
        if i % 2 and prompts:
            base = prompts[rng.randrange(len(prompts))][: prompt_tokens * 3 // 4]
            prompts.append(base + tuple(rng.choices(vocab, k=prompt_tokens - len(base))))
        else:
            prompts.append(tuple(rng.choices(vocab, k=prompt_tokens)))
    return prompts


def _send_reports(
    router: Router, step: int, summaries: dict[str, tuple[int, ...]], generations: dict[str, int]
) -> None:
    """Every worker's report; a prefill worker's summary changes (rotated keys) every 4th report."""
    for j, worker_id in enumerate(summaries):
        keys = summaries[worker_id]
        if (step + j) % 4 == 0:
            keys = summaries[worker_id] = keys[1:] + keys[:1]
            generations[worker_id] += 1
        summary = PrefixSummary(generations[worker_id], keys)
        router.update_load(LoadReport(worker_id, (j * 997) % 6000, j % 4, 1000, 1000, float(step), summary))
    for j, worker_id in enumerate(router.decode_ids):
        router.update_load(LoadReport(worker_id, 0, j, 500 + j, 1000, float(step)))


def _warm_summaries(
    config: RouterConfig, prompts: list[tuple[int, ...]], prefill_ids: list[str], summary_keys: int
) -> dict[str, tuple[int, ...]]:
    """Each worker's summary: the probe keys of the prompts a first pass sent it, padded with others."""
    warm = Router(config)
    warm.set_workers(prefill_ids, [])
    held: dict[str, list[int]] = {w: [] for w in prefill_ids}
    for tokens in prompts:
        held[warm.choose_prefill(tokens).worker_id].extend(probe_keys(tokens, config.block_size))
    padding = list(range(10**12, 10**12 + summary_keys))
    return {w: tuple((keys + padding)[:summary_keys]) for w, keys in held.items()}


def run_cache_aware_bench(
    num_prompts: int = 1000,
    prompt_tokens: int = 4096,
    num_workers: int = 8,
    report_every: int = 64,
    summary_keys: int = 4096,
    repeats: int = 5,
    seed: int = 0,
) -> CacheAwareBenchResult:
    """``Router.choose_prefill`` / ``route`` (policy cache_aware, block size 16) on 4k-token prompts.

    Each worker's summary holds ``summary_keys`` probe keys: those of the prompts a warm-up pass sent
    it, padded with unrelated keys. In the timed loop every worker sends a fresh ``LoadReport`` every
    ``report_every`` decisions, and every 4th report of a worker carries a changed summary (a new
    generation), which the router re-reads whole. Best of ``repeats`` runs, thread CPU time, one core.
    """
    prompts = _cache_aware_prompts(num_prompts, prompt_tokens, seed)
    config = RouterConfig(policy="cache_aware")
    prefill_ids = [f"prefill-{i}" for i in range(num_workers)]
    initial = _warm_summaries(config, prompts, prefill_ids, summary_keys)
    rates = []
    for with_decode in (False, True):
        best = 0.0
        for _ in range(repeats):
            router = Router(config)
            router.set_workers(prefill_ids, [f"decode-{i}" for i in range(4)])
            summaries, generations = dict(initial), dict.fromkeys(prefill_ids, 0)
            start = time.thread_time()
            for i, tokens in enumerate(prompts):
                if i % report_every == 0:
                    _send_reports(router, i // report_every, summaries, generations)
                if with_decode:
                    router.route(tokens, expected_num_blocks=300)
                else:
                    router.choose_prefill(tokens)
            best = max(best, len(prompts) / (time.thread_time() - start))
        rates.append(best)
    return CacheAwareBenchResult(
        prompt_tokens, config.block_size, num_workers, summary_keys, rates[0], rates[1]
    )
