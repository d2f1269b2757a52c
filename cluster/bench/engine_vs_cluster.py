"""N concurrent streams through a cluster vs the engine alone on the same N requests (issue 12, acceptance 6).

    python -m cluster.bench.engine_vs_cluster [--server HOST:PORT] [--streams 32] [--prompt-tokens 128]
        [--max-tokens 64] [--engine-threads 2] [--config FILE]

Both sides get the same N prompts (random token ids of the model's vocabulary, a fixed seed), greedy,
``ignore_eos``, so every request generates ``--max-tokens`` tokens; prefill is included on both sides.

- **engine alone**: one ``LLMEngine`` in this process, built from the cluster config's decode engine
  (model, dtype, KV pool: ``config.engine_for("decode")``) with ``--engine-threads`` torch threads; the N
  requests added at once, stepped until done. Run first, then freed, so it never shares the CPU with
  the cluster.
- **cluster**: the same N requests as concurrent gRPC ``Generate`` streams to ``--server`` (a running
  ``pdserve serve``), or, without ``--server``, to an embedded cluster of ``--config`` (default: the
  embedded default, as ``pdserve serve`` starts it), started after the engine side.

tokens/s = generated tokens / wall time from the first request to the last token. Then where the
cluster's wall time goes, from the server's own per-request timings (queue, prefill, KV transfer, TTFT,
TPOT) and the client's arrival stamps: the spread of first tokens (prefill of N prompts, in turn, on
the prefill pool) against the decode phase after it.
"""

from __future__ import annotations

import asyncio
import gc
import os
import random
import statistics
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import click
import grpc

from cluster.config import ClusterConfig, load_config
from protos import pdserve_pb2 as pb
from protos import pdserve_pb2_grpc

if TYPE_CHECKING:  # torch and Ray are imported only by the side that runs them
    from cluster.embedded import EmbeddedCluster
    from engine.llm_engine import LLMEngine


def make_prompts(num: int, length: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    """``num`` prompts of ``length`` token ids, drawn from the vocabulary's ordinary range (above the
    first 256 ids, where special and byte tokens sit)."""
    rng = random.Random(seed)
    low = min(256, vocab_size // 2)
    return [[rng.randrange(low, vocab_size) for _ in range(length)] for _ in range(num)]


@dataclass
class StreamRecord:
    """One request's client stamps (seconds since the run's start) and its final message's figures."""

    first_s: float = 0.0
    last_s: float = 0.0
    num_tokens: int = 0
    num_messages: int = 0
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class SideResult:
    num_tokens: int
    seconds: float
    records: tuple[StreamRecord, ...] = ()

    @property
    def tokens_per_s(self) -> float:
        return self.num_tokens / self.seconds


def build_engine(config: ClusterConfig, threads: int) -> LLMEngine:
    """The decode pool's engine (model, dtype, KV pool) with ``threads`` torch threads, in this process."""
    from engine.llm_engine import LLMEngine

    return LLMEngine(config.engine_for("decode").model_copy(update={"num_threads": threads}))


def run_engine_alone(engine: LLMEngine, prompts: list[list[int]], max_tokens: int) -> SideResult:
    """The N requests through ``engine``, added at once and stepped until done, prefill included."""
    from engine.sampling import SamplingParams

    for index, prompt in enumerate(prompts[:2]):  # warm-up, unrecorded
        engine.add_request(f"warm-{index}", prompt[:16], SamplingParams(max_tokens=4, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    num_tokens = 0
    start = time.perf_counter()
    for index, prompt in enumerate(prompts):
        engine.add_request(f"alone-{index}", prompt, params)
    while engine.has_unfinished_requests():
        num_tokens += sum(len(output.new_token_ids) for output in engine.step())
    return SideResult(num_tokens, time.perf_counter() - start)


async def run_cluster(address: str, prompts: list[list[int]], max_tokens: int) -> SideResult:
    """The N requests as concurrent gRPC ``Generate`` streams; per-request stamps and server timings."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pdserve_pb2_grpc.PDServeStub(channel)
        warm = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompts[0][:16]), max_tokens=4, ignore_eos=True)
        async for _ in stub.Generate(warm, timeout=120):
            pass
        start = time.perf_counter()

        async def one(prompt: list[int]) -> StreamRecord:
            request = pb.GenerateRequest(
                token_ids=pb.TokenIds(ids=prompt),
                max_tokens=max_tokens,
                ignore_eos=True,
                request_id=f"evc-{uuid.uuid4().hex[:12]}",
            )
            record = StreamRecord()
            async for response in stub.Generate(request, timeout=600):
                now = time.perf_counter() - start
                if response.token_ids:
                    record.first_s = record.first_s or now
                    record.last_s = now
                record.num_tokens += len(response.token_ids)
                record.num_messages += 1
                if response.HasField("timings"):
                    timings = response.timings
                    record.timings = {
                        name.name: getattr(timings, name.name) for name in timings.DESCRIPTOR.fields
                    }
            return record

        records = await asyncio.gather(*(one(p) for p in prompts))
        seconds = time.perf_counter() - start
    return SideResult(sum(r.num_tokens for r in records), seconds, tuple(records))


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def where_time_goes(cluster: SideResult, max_tokens: int) -> list[str]:
    """Lines on the cluster run: the first-token spread (prefill phase) vs the decode phase after it."""
    records = cluster.records
    firsts = sorted(r.first_s for r in records)
    last = max(r.last_s for r in records)
    timings = {key: [r.timings.get(key, 0.0) for r in records] for key in records[0].timings}
    decode_tokens = sum(r.num_tokens - 1 for r in records)
    decode_window = last - firsts[0]
    lines = [
        f"first tokens arrive from {firsts[0]:.2f} s to {firsts[-1]:.2f} s (median {_median(firsts):.2f} s); "
        f"the last token at {last:.2f} s",
        f"decode window (first first-token -> last token): {decode_window:.2f} s for {decode_tokens} tokens "
        f"= {decode_tokens / decode_window:.0f} tok/s; after the last first token: "
        f"{last - firsts[-1]:.2f} s",
        "server timings, median / max ms: "
        + ", ".join(f"{key} {_median(v):.0f} / {max(v):.0f}" for key, v in timings.items() if v),
        f"tokens per message: {cluster.num_tokens / sum(r.num_messages for r in records):.2f} "
        f"(max_tokens {max_tokens})",
    ]
    return lines


def _start_embedded(config: ClusterConfig) -> EmbeddedCluster:
    from cluster.embedded import EmbeddedCluster

    return EmbeddedCluster(config.override({"grpc.port": 0, "http.port": 0})).start()


@click.command()
@click.option(
    "--server", default=None, help="gRPC API of a running cluster (default: start the embedded one)."
)
@click.option("--config", "config_path", default=None, help="cluster YAML (default: the embedded default).")
@click.option("--streams", type=int, default=32, show_default=True)
@click.option("--prompt-tokens", type=int, default=128, show_default=True)
@click.option("--max-tokens", type=int, default=64, show_default=True)
@click.option("--engine-threads", type=int, default=os.cpu_count() or 1, show_default=True)
def main(
    server: str | None,
    config_path: str | None,
    streams: int,
    prompt_tokens: int,
    max_tokens: int,
    engine_threads: int,
) -> None:
    """Engine alone, then the cluster, on the same requests; the ratio and where the cluster's time goes."""
    config = load_config(config_path)
    engine = build_engine(config, engine_threads)
    prompts = make_prompts(streams, prompt_tokens, engine.runner.model.config.vocab_size)
    alone = run_engine_alone(engine, prompts, max_tokens)
    del engine
    gc.collect()  # the engine's weights and KV pool go before the cluster starts
    click.echo(
        f"engine alone: {alone.num_tokens} tokens in {alone.seconds:.2f} s = {alone.tokens_per_s:.1f} tok/s "
        f"({engine_threads} torch threads, load average {os.getloadavg()[0]:.2f})"
    )
    cluster = _start_embedded(config) if server is None else None
    try:
        address = server or cluster.grpc_address
        through = asyncio.run(run_cluster(address, prompts, max_tokens))
    finally:
        if cluster is not None:
            cluster.stop()
    click.echo(
        f"cluster ({address}): {through.num_tokens} tokens in {through.seconds:.2f} s = "
        f"{through.tokens_per_s:.1f} tok/s, load average {os.getloadavg()[0]:.2f}"
    )
    click.echo(f"cluster / engine alone: {100 * through.tokens_per_s / alone.tokens_per_s:.0f} %")
    for line in where_time_goes(through, max_tokens):
        click.echo("  " + line)


if __name__ == "__main__":
    main()
