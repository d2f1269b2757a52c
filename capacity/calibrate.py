"""``pdserve simulate --calibrate``: time the real engine's steps on this machine and fit a
:class:`~capacity.costs.LinearCost` to them (the only module of ``capacity`` that imports the engine,
and only inside :func:`measure_steps`).

Measured: prefill steps of one prompt of 16 .. 1,024 tokens (no cache hit), and decode steps at
batch 1 .. 64 over contexts of 64 .. 512 tokens, each step timed around ``LLMEngine.step()`` (wall
clock, after a warm-up), on the torch thread count a cluster replica gets. The fit is ordinary least
squares of step time on (1, tokens, seqs, attention pairs, KV tokens), coefficients clipped at 0.
"""

from __future__ import annotations

import platform
import time

import numpy as np

from capacity.costs import LinearCost, Step, decode_step, prefill_step


def measure_steps(
    model: str,
    dtype: str,
    num_threads: int | None,
    repeats: int = 3,
    prefill_lengths: tuple[int, ...] = (16, 128, 512, 1024),
    decode_shapes: tuple[tuple[int, int], ...] = ((1, 64), (1, 512), (8, 128), (16, 256), (32, 64), (64, 64)),
) -> tuple[list[tuple[Step, float]], int]:
    """(step shape, seconds) pairs from the real engine, and the model's KV bytes per token."""
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine
    from engine.sampling import SamplingParams

    config = EngineConfig(
        model=model,
        dtype=dtype,
        num_threads=num_threads,
        kv_cache_bytes=512 * 2**20,
        max_num_batched_tokens=2048,
        max_num_seqs=64,
        enable_prefix_caching=False,
    )
    engine = LLMEngine(config)
    rng = np.random.default_rng(0)
    counter = iter(range(10**9))
    samples: list[tuple[Step, float]] = []

    def prompt(n: int) -> list[int]:
        return [int(t) for t in rng.integers(3, 250, n)]

    for _ in range(repeats):
        for length in prefill_lengths:
            engine.add_request(
                f"cal-{next(counter)}", prompt(length), SamplingParams(max_tokens=1, ignore_eos=True)
            )
            start = time.perf_counter()
            engine.step()
            samples.append((prefill_step([(0, length)]), time.perf_counter() - start))
            while engine.has_unfinished_requests():
                engine.step()
        for batch, context in decode_shapes:
            samples.extend(_decode_samples(engine, counter, prompt, batch, context))
    return samples[len(samples) // repeats :], _kv_bytes(engine)  # the first round is the warm-up


def _decode_samples(engine, counter, prompt, batch: int, context: int) -> list[tuple[Step, float]]:
    from engine.sampling import SamplingParams

    new_tokens = 8
    for _ in range(batch):
        engine.add_request(
            f"cal-{next(counter)}", prompt(context), SamplingParams(max_tokens=new_tokens, ignore_eos=True)
        )
    while engine.scheduler.num_queued_prefill_tokens > 0:  # prefill every prompt first
        engine.step()
    samples = []
    for k in range(new_tokens - 2):
        start = time.perf_counter()
        engine.step()
        samples.append((decode_step(batch, batch * (context + 1 + k)), time.perf_counter() - start))
    while engine.has_unfinished_requests():
        engine.step()
    return samples


def _kv_bytes(engine) -> int:
    return int(engine.stats().kv_bytes_per_token) if hasattr(engine.stats(), "kv_bytes_per_token") else 0


def fit(
    samples: list[tuple[Step, float]],
    kv_bytes_per_token: int,
    source: str,
    transfer_bytes_per_s: float = 1e9,
    transfer_overhead_s: float = 0.002,
) -> LinearCost:
    """Least-squares fit of the median time of each step shape, in relative error (each row divided
    by its time); non-negative coefficients by dropping negative ones and refitting."""
    by_shape: dict[Step, list[float]] = {}
    for step, seconds in samples:
        by_shape.setdefault(step, []).append(seconds)
    shapes = list(by_shape)
    times = np.array([float(np.median(by_shape[s])) for s in shapes])
    rows = np.array([[1.0, s.num_tokens, s.num_seqs, s.attn_pairs, s.kv_tokens] for s in shapes])
    overhead, per_token, per_seq, per_pair, per_kv = nonnegative_fit(rows, times)
    return LinearCost(
        kv_bytes_per_token,
        overhead,
        per_token,
        per_seq,
        per_pair,
        per_kv,
        transfer_bytes_per_s,
        transfer_overhead_s,
        source,
    )


def nonnegative_fit(rows: np.ndarray, times: np.ndarray) -> list[float]:
    """Least squares of ``times`` on ``rows`` in relative error (each row divided by its time), the
    coefficients non-negative by dropping the negative ones and refitting (numpy only: no scipy here)."""
    scaled, target = rows / times[:, None], np.ones(len(times))
    active = list(range(rows.shape[1]))
    coefficients = np.zeros(rows.shape[1])
    for _ in range(rows.shape[1]):
        solution, *_ = np.linalg.lstsq(scaled[:, active], target, rcond=None)
        if (solution >= 0).all():
            coefficients[active] = solution
            break
        active = [a for a, value in zip(active, solution, strict=True) if value >= 0]
    return [float(c) for c in coefficients]


def calibrate(
    model: str, dtype: str, num_threads: int | None, kv_bytes_per_token: int
) -> tuple[LinearCost, float]:
    """Measure and fit; returns the model and its median relative error over the measured step shapes."""
    samples, _ = measure_steps(model, dtype, num_threads)
    source = (
        f"{model} {dtype}, {num_threads or 'default'} torch threads, {platform.machine()} "
        f"{platform.node()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )
    cost = fit(samples, kv_bytes_per_token, source)
    by_shape: dict[Step, list[float]] = {}
    for step, seconds in samples:
        by_shape.setdefault(step, []).append(seconds)
    errors = [abs(cost.step_s(s) - float(np.median(t))) / float(np.median(t)) for s, t in by_shape.items()]
    return cost, float(np.median(errors))
