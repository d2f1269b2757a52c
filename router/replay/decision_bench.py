"""Micro-benchmarks: router decisions per second on 4k-token prompts, hashing and reports included.

``run_decision_bench`` (the prefix_hash rule): each decision is ``Router.choose_prefill`` on a fresh
4,096-token list (block size 16): the prefix key (chain hash of the leading ``prefix_depth_blocks``
blocks), the ring lookup and the watermark check. ``run_cache_aware_bench`` (the default policy): the
probe keys, the match against every worker's prefix summary, the cost comparison and the ring walk.
Every worker sends a load report every ``report_every`` decisions, inside the timed loop (ingesting
reports is router work too).

One process, one thread, so "per core" is decisions per CPU-second of the process
(``time.process_time``): on a shared machine other jobs do not count against the router, though
they still slow it (shared caches and cores). Wall-clock rates (``time.perf_counter``) and the load
average at the start and end come with every result; state them next to any figure.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from engine.prefix_summary import PrefixSummary, probe_keys
from router.config import RouterConfig
from router.load import LoadReport
from router.router import Router


@dataclass(frozen=True)
class Rates:
    """One configuration's rate: best of the repeats, on each clock."""

    per_cpu_s: float  # decisions per CPU-second of the process: the "per core" figure
    per_wall_s: float  # decisions per wall-clock second (the same runs; lower when the machine is busy)


def _best_of(
    repeats: int, num_decisions: int, make_router: Callable[[], Router], run: Callable[[Router], None]
) -> Rates:
    """Best rate of ``repeats`` timed calls ``run(make_router())`` on each clock (building the
    router and its ring is not timed; as ``timeit`` advises, slower runs measure interference from
    other processes, not the code)."""
    cpu = wall = float("inf")
    for _ in range(repeats):
        router = make_router()
        cpu_start, wall_start = time.process_time(), time.perf_counter()
        run(router)
        wall = min(wall, time.perf_counter() - wall_start)
        cpu = min(cpu, time.process_time() - cpu_start)
    return Rates(num_decisions / cpu, num_decisions / wall)


@dataclass(frozen=True)
class DecisionBenchResult:
    """prefix_hash decisions per second at one prefix depth (``*_per_s``: per CPU-second)."""

    prefix_depth_blocks: int
    prompt_tokens: int
    block_size: int
    num_workers: int
    decisions_per_s: float  # choose_prefill per CPU-second
    route_per_s: float  # prefill + decode choice per CPU-second
    decisions_per_wall_s: float
    route_per_wall_s: float
    load_average: tuple[float, float]  # 1-minute load average at the start and the end


def _prompts(num_prompts: int, prompt_tokens: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    vocab = range(128_000)
    return [rng.choices(vocab, k=prompt_tokens) for _ in range(num_prompts)]


def _new_router(config: RouterConfig, prefill_ids: list[str]) -> Router:
    router = Router(config)
    router.set_workers(prefill_ids, [f"decode-{i}" for i in range(4)])
    return router


def _run(router: Router, prompts: list[list[int]], report_every: int, with_decode: bool) -> None:
    """One timed pass of the prefix_hash bench (see ``run_decision_bench``)."""
    prefill_ids = router.prefill_ids
    decode_ids = router.decode_ids
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
    """prefix_hash decisions per second for each prefix depth (block size from ``config``, default
    16): best of ``repeats`` runs over ``num_prompts`` distinct prompts, each on a fresh router."""
    base = config if config is not None else RouterConfig()
    prompts = _prompts(num_prompts, prompt_tokens, seed)
    prefill_ids = [f"prefill-{i}" for i in range(num_workers)]
    results = []
    for depth in depths:
        router_config = base.model_copy(update={"policy": "prefix_hash", "prefix_depth_blocks": depth})
        load_start = os.getloadavg()[0]
        prefill, route = (
            _best_of(
                repeats,
                len(prompts),
                lambda c=router_config: _new_router(c, prefill_ids),
                lambda router, d=with_decode: _run(router, prompts, report_every, d),
            )
            for with_decode in (False, True)
        )
        results.append(
            DecisionBenchResult(
                prefix_depth_blocks=depth,
                prompt_tokens=prompt_tokens,
                block_size=router_config.block_size,
                num_workers=num_workers,
                decisions_per_s=prefill.per_cpu_s,
                route_per_s=route.per_cpu_s,
                decisions_per_wall_s=prefill.per_wall_s,
                route_per_wall_s=route.per_wall_s,
                load_average=(load_start, os.getloadavg()[0]),
            )
        )
    return results


@dataclass(frozen=True)
class CacheAwareBenchResult:
    """cache_aware decisions per second with prefix summaries in the reports (``*_per_s``: per
    CPU-second of the process, i.e. per core; ``*_per_wall_s``: per wall-clock second)."""

    prompt_tokens: int
    block_size: int
    num_workers: int
    summary_keys: int  # keys in each worker's summary
    summary_deltas: bool  # changed summaries carry their delta (else the router re-reads them whole)
    decisions_per_s: float  # choose_prefill per CPU-second
    route_per_s: float  # prefill + decode choice per CPU-second
    decisions_per_wall_s: float
    route_per_wall_s: float
    load_average: tuple[float, float]  # 1-minute load average at the start and the end


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


# One report round: each prefill worker's (id, summary).
ReportRound = list[tuple[str, PrefixSummary]]

SUMMARY_CHURN_KEYS = 64  # keys a changed summary adds (and drops): ~7 prompts' probe keys


def _report_rounds(
    initial: dict[str, tuple[int, ...]], num_rounds: int, deltas: bool = True, report_every: int = 64
) -> list[ReportRound]:
    """What the workers send, round by round: a worker's summary changes (``SUMMARY_CHURN_KEYS``
    fresh keys in front, as many of its oldest dropped, a new generation) every 4th report, with the
    delta from the previous generation (``engine.prefix_summary.SummaryBuilder`` sends one) unless
    ``deltas`` is false (then the router re-reads every changed summary whole: the worst case, an
    ingress that missed the previous generation). A changed summary counts done the requests of the
    rounds before its own (``requests_done``: the router keeps the sent keys of the last round's, as in
    the live cluster). Built before the timed loop: the keys arrive from the wire; making them is the
    worker's work, not the router's."""
    summaries = {worker_id: PrefixSummary(0, keys) for worker_id, keys in initial.items()}
    fresh = 2 * 10**12
    rounds = []
    for step in range(num_rounds):
        this_round = []
        for j, worker_id in enumerate(summaries):
            if (step + j) % 4 == 0:
                previous = summaries[worker_id]
                added = tuple(range(fresh, fresh + SUMMARY_CHURN_KEYS))
                fresh += SUMMARY_CHURN_KEYS
                keys = added + previous.keys[: len(previous.keys) - SUMMARY_CHURN_KEYS]
                removed = previous.keys[len(previous.keys) - SUMMARY_CHURN_KEYS :]
                done = step * report_every  # _send_reports' count of the round before
                summaries[worker_id] = (
                    PrefixSummary(previous.generation + 1, keys, previous.generation, added, removed, done)
                    if deltas
                    else PrefixSummary(previous.generation + 1, keys, requests_done=done)
                )
            this_round.append((worker_id, summaries[worker_id]))
        rounds.append(this_round)
    return rounds


def _send_reports(router: Router, step: int, report_round: ReportRound, report_every: int = 64) -> None:
    """Every worker's report (built here, as the ingress builds a ``LoadReport`` from a replica's
    ``ReplicaLoad``); the router re-reads a summary whole when its generation is new. Each counts
    ``report_every`` more requests received than the round before (at least every request sent since),
    so the router drops its charges one by one, as in the live cluster."""
    received = (step + 1) * report_every  # the warm-up round is step -1
    for j, (worker_id, summary) in enumerate(report_round):
        router.update_load(LoadReport(
            worker_id, (j * 997) % 6000, j % 4, 1000, 1000, float(step), summary, requests_received=received
        ))
    for j, worker_id in enumerate(router.decode_ids):
        router.update_load(
            LoadReport(worker_id, 0, j, 500 + j, 1000, float(step), requests_received=received)
        )


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


def _run_cache_aware(
    router: Router,
    prompts: list[tuple[int, ...]],
    rounds: list[ReportRound],
    report_every: int,
    with_decode: bool,
) -> None:
    """One timed pass of the cache_aware bench (see ``run_cache_aware_bench``)."""
    for i, tokens in enumerate(prompts):
        if i % report_every == 0:
            _send_reports(router, i // report_every, rounds[i // report_every], report_every)
        if with_decode:
            router.route(tokens, expected_num_blocks=300)
        else:
            router.choose_prefill(tokens)


def run_cache_aware_bench(
    num_prompts: int = 1000,
    prompt_tokens: int = 4096,
    num_workers: int = 8,
    report_every: int = 64,
    summary_keys: int = 4096,
    repeats: int = 5,
    seed: int = 0,
    summary_deltas: bool = True,
) -> CacheAwareBenchResult:
    """``Router.choose_prefill`` / ``route`` (policy cache_aware, block size 16) on 4k-token prompts.

    Each worker's summary holds ``summary_keys`` probe keys: those of the prompts a warm-up pass sent
    it, padded with unrelated keys; each run's router has read them before the timer starts (the
    steady state of an ingress). In the timed loop every worker sends a fresh ``LoadReport`` every
    ``report_every`` decisions, and every 4th report of a worker carries a changed summary (a new
    generation, 64 keys in and 64 out) carried as a delta, or with ``summary_deltas=False`` as keys
    only, which the router re-reads whole: with the defaults a changed 4,096-key summary every 32
    decisions (the cluster rebuilds a worker's summary at most once a second, ``summary_period_s``:
    this is far more churn than a real pool sends). Best of ``repeats`` runs.
    """
    prompts = _cache_aware_prompts(num_prompts, prompt_tokens, seed)
    config = RouterConfig(policy="cache_aware")
    prefill_ids = [f"prefill-{i}" for i in range(num_workers)]
    initial = _warm_summaries(config, prompts, prefill_ids, summary_keys)
    rounds = _report_rounds(initial, -(-num_prompts // report_every), summary_deltas, report_every)
    steady = [(worker_id, PrefixSummary(0, keys)) for worker_id, keys in initial.items()]

    def make_router() -> Router:  # an ingress that has read every worker's summary once already
        router = _new_router(config, prefill_ids)
        _send_reports(router, -1, steady)
        return router

    load_start = os.getloadavg()[0]
    prefill, route = (
        _best_of(
            repeats,
            len(prompts),
            make_router,
            lambda router, d=with_decode: _run_cache_aware(router, prompts, rounds, report_every, d),
        )
        for with_decode in (False, True)
    )
    return CacheAwareBenchResult(
        prompt_tokens=prompt_tokens,
        block_size=config.block_size,
        num_workers=num_workers,
        summary_keys=summary_keys,
        summary_deltas=summary_deltas,
        decisions_per_s=prefill.per_cpu_s,
        route_per_s=route.per_cpu_s,
        decisions_per_wall_s=prefill.per_wall_s,
        route_per_wall_s=route.per_wall_s,
        load_average=(load_start, os.getloadavg()[0]),
    )
