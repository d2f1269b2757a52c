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
    cpu_s: dict[str, float] = field(default_factory=dict)  # CPU seconds per process label during the run

    @property
    def tokens_per_s(self) -> float:
        return self.num_tokens / self.seconds


def build_engine(config: ClusterConfig, threads: int) -> LLMEngine:
    """The decode pool's engine (model, dtype, KV pool) with ``threads`` torch threads, in this process."""
    from engine.llm_engine import LLMEngine

    return LLMEngine(config.engine_for("decode").model_copy(update={"num_threads": threads}))


def run_engine_alone(engine: LLMEngine, prompts: list[list[int]], max_tokens: int) -> SideResult:
    """The N requests through ``engine``, added at once and stepped until done, prefill included. Their
    sampling parameters are the ones the cluster's engines get for the same gRPC request
    (``SamplingSpec.to_engine``: detokenized, as every server engine does), so both sides do the same work."""
    from worker_common.messages import SamplingSpec

    warm = SamplingSpec(max_tokens=4, ignore_eos=True).to_engine()
    for index, prompt in enumerate(prompts[:2]):  # warm-up, unrecorded
        engine.add_request(f"warm-{index}-{uuid.uuid4().hex[:8]}", prompt[:16], warm)
    while engine.has_unfinished_requests():
        engine.step()
    params = SamplingSpec(max_tokens=max_tokens, ignore_eos=True).to_engine()
    num_tokens = 0
    start, cpu_start = time.perf_counter(), time.process_time()
    for index, prompt in enumerate(prompts):
        engine.add_request(f"alone-{index}-{uuid.uuid4().hex[:8]}", prompt, params)
    while engine.has_unfinished_requests():
        num_tokens += sum(len(output.new_token_ids) for output in engine.step())
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return SideResult(num_tokens, seconds, cpu_s={"engine": cpu})


async def run_cluster(address: str, prompts: list[list[int]], max_tokens: int) -> SideResult:
    """The N requests as concurrent gRPC ``Generate`` streams; per-request stamps and server timings."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pdserve_pb2_grpc.PDServeStub(channel)
        warm = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompts[0][:16]), max_tokens=4, ignore_eos=True)
        async for _ in stub.Generate(warm, timeout=120):
            pass
        cpu_before = cpu_seconds_by_process()
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
        cpu = cpu_delta(cpu_before, cpu_seconds_by_process())
    return SideResult(sum(r.num_tokens for r in records), seconds, tuple(records), cpu)


def _proc_children() -> dict[int, list[int]]:
    """parent pid -> child pids, from /proc (empty where there is no /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    ppid = int(stat.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    return children


def _proc_label(pid: int) -> str:
    """``ray::ServeReplica:pdserve:PrefillDeployment.x`` -> ``PrefillDeployment``; else the program name."""
    with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
        argv = cmdline.read().split(b"\0")
    name = argv[0].decode(errors="replace") if argv and argv[0] else "?"
    if name.startswith("ray::"):
        return name.split(":")[-1].split(".")[0] or name
    return os.path.basename(name.split()[0]) if name.split() else name


def cpu_seconds_by_process() -> dict[str, float]:
    """CPU seconds (user + system) of this process ("bench") and each of its descendants (the embedded
    cluster's raylet, GCS, Serve controller and replicas), summed per label. Linux only ({} elsewhere)."""
    children = _proc_children()
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    totals: dict[str, float] = {}
    stack = [os.getpid()]
    while stack:
        pid = stack.pop()
        stack.extend(children.get(pid, ()))
        try:
            with open(f"/proc/{pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            label = "bench" if pid == os.getpid() else _proc_label(pid)
        except (OSError, IndexError):
            continue  # gone meanwhile
        totals[label] = totals.get(label, 0.0) + (int(fields[11]) + int(fields[12])) / ticks
    return totals


def cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """CPU seconds per label spent between two ``cpu_seconds_by_process`` snapshots, largest first."""
    delta = {label: after[label] - before.get(label, 0.0) for label in after}
    return dict(sorted(((k, v) for k, v in delta.items() if v >= 0.005), key=lambda kv: -kv[1]))


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def first_token_groups(firsts: list[float], gap_s: float = 0.05) -> list[int]:
    """Sizes of the groups of first tokens that arrive within ``gap_s`` of the previous one: one group per
    prefill forward, roughly (a forward's prompts all get their first token in the same step)."""
    sizes: list[int] = []
    previous = None
    for first in sorted(firsts):
        if previous is None or first - previous > gap_s:
            sizes.append(0)
        sizes[-1] += 1
        previous = first
    return sizes


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
        f"the last token at {last:.2f} s; first-token groups (~ prefill forwards): "
        f"{first_token_groups(firsts)}",
        f"decode window (first first-token -> last token): {decode_window:.2f} s for {decode_tokens} tokens "
        f"= {decode_tokens / decode_window:.0f} tok/s; after the last first token: "
        f"{last - firsts[-1]:.2f} s",
        "server timings, median / max ms: "
        + ", ".join(f"{key} {_median(v):.0f} / {max(v):.0f}" for key, v in timings.items() if v),
        f"tokens per message: {cluster.num_tokens / sum(r.num_messages for r in records):.2f} "
        f"(max_tokens {max_tokens})",
    ]
    if cluster.cpu_s:  # the embedded cluster's processes (a --server cluster is not this one's child)
        lines.append(
            f"CPU seconds during the run, {sum(cluster.cpu_s.values()):.2f} in all: "
            + ", ".join(f"{label} {seconds:.2f}" for label, seconds in cluster.cpu_s.items())
        )
    return lines


def _start_embedded(config: ClusterConfig) -> EmbeddedCluster:
    from cluster.embedded import EmbeddedCluster

    return EmbeddedCluster(config.override({"grpc.port": 0, "http.port": 0})).start()


def engine_side(
    config: ClusterConfig, threads: int, prompts: list[list[int]] | None, args: dict[str, int]
) -> tuple[SideResult, list[list[int]]]:
    """One engine-alone run on a fresh engine (no prefix cache carried over); the engine is freed after."""
    engine = build_engine(config, threads)
    prompts = prompts or make_prompts(args["streams"], args["prompt_tokens"], engine.model_config.vocab_size)
    alone = run_engine_alone(engine, prompts, args["max_tokens"])
    del engine
    gc.collect()  # the engine's weights and KV pool go before the cluster starts
    click.echo(
        f"engine alone: {alone.num_tokens} tokens in {alone.seconds:.2f} s = {alone.tokens_per_s:.1f} tok/s "
        f"({threads} torch threads, {alone.cpu_s['engine']:.2f} CPU seconds, "
        f"load average {os.getloadavg()[0]:.2f})"
    )
    return alone, prompts


def cluster_side(
    config: ClusterConfig, server: str | None, prompts: list[list[int]], max_tokens: int
) -> SideResult:
    """The streams through ``server``, or through an embedded cluster started (and stopped) here."""
    started = time.perf_counter()
    cluster = _start_embedded(config) if server is None else None
    try:
        address = server or cluster.grpc_address
        click.echo(f"cluster up on {address} ({time.perf_counter() - started:.0f} s to start); streams start")
        through = asyncio.run(run_cluster(address, prompts, max_tokens))
    finally:
        if cluster is not None:
            cluster.stop()
    click.echo(
        f"cluster ({address}): {through.num_tokens} tokens in {through.seconds:.2f} s = "
        f"{through.tokens_per_s:.1f} tok/s, load average {os.getloadavg()[0]:.2f}"
    )
    return through


@click.command()
@click.option(
    "--server", default=None, help="gRPC API of a running cluster (default: start the embedded one)."
)
@click.option("--config", "config_path", default=None, help="cluster YAML (default: the embedded default).")
@click.option("--streams", type=int, default=32, show_default=True)
@click.option("--prompt-tokens", type=int, default=128, show_default=True)
@click.option("--max-tokens", type=int, default=64, show_default=True)
@click.option("--engine-threads", type=int, default=os.cpu_count() or 1, show_default=True)
@click.option(
    "--engine-after/--no-engine-after",
    default=True,
    show_default=True,
    help="run the engine alone again after the cluster (a fresh engine) and compare with the mean of both "
    "runs: the load of a shared machine drifts between the two sides",
)
def main(
    server: str | None,
    config_path: str | None,
    streams: int,
    prompt_tokens: int,
    max_tokens: int,
    engine_threads: int,
    engine_after: bool,
) -> None:
    """Engine alone, then the cluster, then (by default) the engine alone again, on the same requests; the
    ratio and where the cluster's time goes."""
    config = load_config(config_path)
    args = {"streams": streams, "prompt_tokens": prompt_tokens, "max_tokens": max_tokens}
    before, prompts = engine_side(config, engine_threads, None, args)
    through = cluster_side(config, server, prompts, max_tokens)
    alone = [before]
    if engine_after:
        alone.append(engine_side(config, engine_threads, prompts, args)[0])
    rate = statistics.mean(side.tokens_per_s for side in alone)
    cpu = statistics.mean(side.cpu_s["engine"] for side in alone)
    click.echo(
        f"cluster / engine alone: {100 * through.tokens_per_s / rate:.0f} % "
        f"(engine alone {rate:.1f} tok/s, the mean of {len(alone)} run(s))"
    )
    for line in where_time_goes(through, max_tokens):
        click.echo("  " + line)
    if through.cpu_s:
        click.echo(
            f"  CPU seconds, engine alone / cluster: {cpu:.2f} / {sum(through.cpu_s.values()):.2f} "
            f"= {100 * cpu / sum(through.cpu_s.values()):.0f} %"
        )


if __name__ == "__main__":
    main()
