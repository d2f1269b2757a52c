"""``python -m engine.bench_join``: what a long prompt joining costs the decode batch (engine alone).

The decode side of a disaggregated cluster joins a request whose KV was pulled: ``allocate_blocks`` +
``add_prefilled_request``, then the next step copies its context into the decode mirror
(engine/decode_mirror.py). This bench replays that: first ``--burst`` streams at once (the mirror grows to
that many rows, as after a concurrent burst in a long-lived replica) until ``--fill-blocks`` blocks sit in
the prefix cache, then ``--streams`` short streams decode, then a ``--prompt-tokens`` prompt joins. It
prints each step's wall and thread-CPU milliseconds and the mirror's shape (the default engine is the
two-core cluster's decode pool: SmolLM2-135M bf16, one torch thread, the default 384 MiB pool).
``--mirror-from FILE`` runs another version's ``DecodeMirror`` (``git show REV:engine/decode_mirror.py``).
"""

from __future__ import annotations

import importlib.util
import inspect
import random
import time
from typing import Any

import click

from engine import model_runner
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling import SamplingParams


def _join(engine: LLMEngine, rng: random.Random, request_id: str, num_tokens: int, max_tokens: int) -> None:
    prompt = [rng.randrange(1000, 20000) for _ in range(num_tokens)]
    block_ids = engine.allocate_blocks(request_id, num_tokens)
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    engine.add_prefilled_request(request_id, prompt, 42, block_ids, params)


def _fill(engine: LLMEngine, rng: random.Random, burst: int, fill_blocks: int) -> None:
    """Bursts of ``burst`` 200-token streams of 3 tokens, to the end, until the cache holds enough."""
    index = 0
    while True:
        for _ in range(burst):
            _join(engine, rng, f"fill-{index}", 200, 3)
            index += 1
        while engine.has_unfinished_requests():
            engine.step()
        if engine.pool.num_cached_blocks >= fill_blocks:
            return


def _use_mirror_from(path: str) -> None:
    """Make the engine build ``path``'s ``DecodeMirror`` (an older version, for before/after figures)."""
    spec = importlib.util.spec_from_file_location("bench_join_mirror", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    mirror_class = module.DecodeMirror
    takes_padding = "zero_padding" in inspect.signature(mirror_class).parameters

    def make(kv_cache: Any, max_bytes: int, zero_padding: bool = True) -> Any:  # the runner's call
        return (
            mirror_class(kv_cache, max_bytes, zero_padding)
            if takes_padding
            else mirror_class(kv_cache, max_bytes)
        )

    model_runner.DecodeMirror = make


@click.command()
@click.option("--model", default="smollm2-135m-instruct", show_default=True)
@click.option("--prompt-tokens", default=1743, show_default=True, help="The long prompt's tokens.")
@click.option("--streams", default=2, show_default=True, help="Short streams decoding when it joins.")
@click.option("--burst", default=8, show_default=True, help="Streams at once before (the mirror's rows).")
@click.option("--fill-blocks", default=808, show_default=True, help="Cached blocks before (0: no burst).")
@click.option("--steps", default=12, show_default=True)
@click.option("--mirror-from", default=None, help="A decode_mirror.py file to run instead of this one.")
def main(
    model: str,
    prompt_tokens: int,
    streams: int,
    burst: int,
    fill_blocks: int,
    steps: int,
    mirror_from: str | None,
) -> None:
    if mirror_from is not None:
        _use_mirror_from(mirror_from)
    engine = LLMEngine(EngineConfig(model=model, dtype="bfloat16", kv_cache_bytes=402653184, num_threads=1))
    rng = random.Random(0)
    if fill_blocks > 0:
        _fill(engine, rng, burst, fill_blocks)
    for index in range(streams):
        _join(engine, rng, f"short-{index}", 100, steps + 4)
    mirror = engine.runner.mirror
    print(f"cached blocks {engine.pool.num_cached_blocks}, free {engine.pool.num_free_blocks}")
    print("step | wall ms | thread CPU ms | mirror [layers, 2, rows, kv_heads, capacity, head_dim]")
    for step in range(steps):
        if step == 3:
            _join(engine, rng, "long", prompt_tokens, steps)
            print(f"-- {prompt_tokens}-token prompt joins")
        wall, cpu = time.perf_counter(), time.thread_time()
        engine.step()
        wall, cpu = (time.perf_counter() - wall) * 1e3, (time.thread_time() - cpu) * 1e3
        shape = tuple(mirror.tensor.shape) if mirror is not None else None
        print(f"{step} | {wall:.1f} | {cpu:.1f} | {shape}")


if __name__ == "__main__":
    main()
