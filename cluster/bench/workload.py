"""The requests a benchmark sends: prompts, output lengths and arrival times.

A workload is a lazy, deterministic (seeded) sequence of `BenchRequest`s. Lengths come from a trace
(`router.traces`, shared with the router's replay) scaled by `length_scale`, or from a synthetic
length mix. Arrival times come from the trace's timestamps (times `time_scale`), from a Poisson
process at `rate`, or are left to the closed loop (`arrival_s is None`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from cluster.bench.config import BenchConfig


class TimedRecord(Protocol):
    """What the workload needs of a trace record (router.traces.TraceRecord has it)."""

    timestamp_s: float
    input_length: int
    output_length: int
    hash_ids: Sequence[int] | None


@dataclass(frozen=True)
class BenchRequest:
    """One request to send. `arrival_s` is seconds after the start of the run (None: closed loop)."""

    index: int
    prompt_token_ids: tuple[int, ...]
    max_tokens: int
    arrival_s: float | None
    is_clipped: bool = False      # lengths were cut to fit the model's context


def clip_lengths(input_len: int, output_len: int, max_context: int) -> tuple[int, int, bool]:
    """Fit `prompt + output <= max_context`, keeping at least one token of each.

    The prompt is kept first (it is what drives prefill and transfer cost), then the output is
    cut to the room left. Returns `(input_len, output_len, is_clipped)`.
    """
    new_input = min(max(1, input_len), max_context - 1)
    new_output = min(max(1, output_len), max_context - new_input)
    return new_input, new_output, (new_input, new_output) != (input_len, output_len)


def spread_ties(timestamps: Sequence[float]) -> list[float]:
    """Spread runs of equal timestamps evenly up to the next distinct one.

    Mooncake timestamps come in ~3 s steps (90 % of requests share one with their neighbour);
    replaying them as bursts would measure the trace's quantisation, not the cluster. The last run
    (no next timestamp) is spread with the trace's mean gap.
    """
    if not timestamps:
        return []
    mean_gap = (timestamps[-1] - timestamps[0]) / max(1, len(timestamps) - 1)
    out: list[float] = []
    i = 0
    while i < len(timestamps):
        j = i
        while j < len(timestamps) and timestamps[j] == timestamps[i]:
            j += 1
        run = j - i
        span = (timestamps[j] - timestamps[i]) if j < len(timestamps) else mean_gap * run
        out.extend(timestamps[i] + span * k / run for k in range(run))
        i = j
    return out


def trace_arrivals(records: Sequence[TimedRecord], time_scale: float, start_s: float = 0.0) -> list[float]:
    """Replay times (s from the run's start) of `records` whose timestamp is at or after the
    trace's first timestamp + `start_s`, ties spread, multiplied by `time_scale`. The first
    selected record arrives at 0."""
    if not records:
        return []
    cutoff = records[0].timestamp_s + start_s
    stamps = [r.timestamp_s for r in records if r.timestamp_s >= cutoff]
    return [(t - stamps[0]) * time_scale for t in spread_ties(stamps)]


def poisson_arrivals(rate: float, rng: np.random.Generator) -> Iterator[float]:
    """Endless Poisson arrival times at `rate` req/s (all at 0 when rate is infinite)."""
    now = 0.0
    while True:
        yield now
        if math.isfinite(rate):
            now += float(rng.exponential(1.0 / rate))


def random_prompt(index: int, length: int, vocab_size: int, seed: int) -> tuple[int, ...]:
    """A deterministic pseudo-random prompt for request `index` (no shared prefixes)."""
    rng = np.random.default_rng([seed, index])
    return tuple(int(t) for t in rng.integers(0, vocab_size, size=length))


class Workload:
    """Builds the request sequence for a `BenchConfig`.

    `records` are the trace's records (None without a trace); `prompt_for` synthesizes a trace
    record's prompt (router.traces.synthesize_prompt); both are injected so tests need no files.
    """

    def __init__(self, config: BenchConfig, records: Sequence[TimedRecord] | None = None,
                 prompt_for: PromptSynthesizer | None = None) -> None:
        self.config = config
        self.records = records
        self.prompt_for = prompt_for
        if config.trace and records is None:
            self.records, self.prompt_for = _load_trace(config.trace)

    def __iter__(self) -> Iterator[BenchRequest]:
        """Requests in send order, bounded by `num_requests` and (for timed arrivals) `duration_s`."""
        config = self.config
        arrivals = self._arrivals()
        requests = (self._request(i, arrival) for i, arrival in enumerate(arrivals))
        if config.num_requests is not None:
            requests = itertools.islice(requests, config.num_requests)
        for request in requests:
            if request is None:
                return
            if (config.duration_s is not None and request.arrival_s is not None
                    and request.arrival_s >= config.duration_s):
                return
            yield request

    def _arrivals(self) -> Iterator[float | None]:
        config = self.config
        if config.arrival == "trace":
            assert self.records is not None
            return iter(trace_arrivals(self.records, config.time_scale, config.trace_start_s))
        if config.arrival == "poisson":
            return poisson_arrivals(config.rate, np.random.default_rng([config.seed, 1]))
        return itertools.repeat(None)

    def _request(self, index: int, arrival_s: float | None) -> BenchRequest | None:
        config = self.config
        if self.records is not None:
            record_index = index + self._first_record()
            if record_index >= len(self.records):
                return None   # the trace ran out
            record = self.records[record_index]
            input_len = round(record.input_length * config.length_scale)
            output_len = round(record.output_length * config.length_scale)
            input_len, output_len, is_clipped = clip_lengths(input_len, output_len, config.max_context)
            assert self.prompt_for is not None
            prompt = self.prompt_for(record, config)
            if len(prompt) > input_len:
                prompt = prompt[:input_len]
            elif len(prompt) < input_len:   # rounding in the synthesizer: pad deterministically
                prompt = prompt + random_prompt(index, input_len - len(prompt), config.vocab_size,
                                                config.seed)
            return BenchRequest(index, tuple(prompt), output_len, arrival_s, is_clipped)
        classes = config.lengths
        weights = np.array([c.weight for c in classes], dtype=np.float64)
        pick = np.random.default_rng([config.seed, 2, index]).choice(len(classes), p=weights / weights.sum())
        chosen = classes[int(pick)]
        input_len, output_len, is_clipped = clip_lengths(chosen.input_len, chosen.output_len,
                                                         config.max_context)
        prompt = random_prompt(index, input_len, config.vocab_size, config.seed)
        return BenchRequest(index, prompt, output_len, arrival_s, is_clipped)

    def _first_record(self) -> int:
        """Index of the first record at or after `trace_start_s` (cached)."""
        if not hasattr(self, "_first"):
            assert self.records is not None
            origin = self.records[0].timestamp_s + self.config.trace_start_s if self.records else 0.0
            self._first = next((i for i, r in enumerate(self.records) if r.timestamp_s >= origin),
                               len(self.records))
        return self._first


class PromptSynthesizer(Protocol):
    """Token ids for a trace record under a config (length about input_length x length_scale)."""

    def __call__(self, record: TimedRecord, config: BenchConfig, /) -> tuple[int, ...]: ...


def _load_trace(path: str) -> tuple[Sequence[TimedRecord], PromptSynthesizer]:
    """Load a trace with the shared router.traces loader and bind its prompt synthesizer."""
    from router.traces import load_trace, synthesize_prompt

    def prompt_for(record: TimedRecord, config: BenchConfig) -> tuple[int, ...]:
        ids = synthesize_prompt(record, block_tokens=config.block_tokens, vocab_size=config.vocab_size,
                                scale=config.length_scale, seed=config.seed)
        return tuple(int(t) for t in ids)

    return load_trace(path), prompt_for
