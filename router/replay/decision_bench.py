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
