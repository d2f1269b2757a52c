"""What tracing and metrics cost: tokens/s with both on vs both off, interleaved in one run (issue 14,
acceptance 6; docs/benchmarks.md, "Tracing and metrics overhead").

    python -m cluster.bench.overhead [--streams 32] [--max-tokens 64] [--prompt-tokens 64] [--rounds 4]
                                     [--model builtin|smollm2] [--scrape-interval 1.0]

Two pdserve applications on one local Ray, the same but for two sections (and their ports):
- **off**: ``tracing.enabled: false``, ``metrics.enabled: false`` (no span object, no series recorded);
- **on**: ``tracing`` exporting OTLP/gRPC from every process to a receiver in this process
  (``cluster.otlp_receiver``: real wire, counted, not kept), ``metrics`` recorded, and ``/metrics``
  scraped every ``--scrape-interval`` seconds while the arm runs (a Prometheus would scrape every 15-60 s).
Only one app has requests at a time. Each round runs both arms, the order flipped every round (so a load
change on the machine hits both); an arm is ``--streams`` concurrent ``Generate`` streams of
``--max-tokens`` tokens (``ignore_eos``) through the app's gRPC API; tokens/s = generated tokens / wall
time from the first request sent to the last token received. Reports each round's ratio on/off and the
ratio of the totals (the acceptance: >= 95 % at 32 streams).
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
import urllib.request
from dataclasses import dataclass

import click
import grpc

from cluster.config import ClusterConfig, config_from_dict
from cluster.embedded import EmbeddedCluster
from cluster.otlp_receiver import OtlpReceiver
from engine.builtin import BUILTIN_MODEL_ID, SMOLLM2_MODEL_ID
from protos import pdserve_pb2 as pb
from protos import pdserve_pb2_grpc

ARMS = ("off", "on")


@dataclass(frozen=True)
class ArmRun:
    arm: str
    num_tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.num_tokens / self.seconds


def arm_configs(model: str, endpoint: str) -> dict[str, ClusterConfig]:
    """The two apps' configs: the same cluster, tracing and metrics off / on."""
    builtin = model == "builtin"
    pool = {"num_cpus": 0.25, "torch_threads": 1}
    base = config_from_dict({
        "engine": {"model": BUILTIN_MODEL_ID, "dtype": "float32"} if builtin else {"model": SMOLLM2_MODEL_ID},
        "prefill": pool, "decode": pool, "grpc": {"port": 0}, "http": {"port": 0},
    })
    return {
        "off": base.override({"app_name": "overhead-off", "metrics.enabled": False}),
        "on": base.override({
            "app_name": "overhead-on", "tracing.enabled": True, "tracing.exporter": "otlp",
            "tracing.otlp_endpoint": endpoint,
        }),
    }


async def _streams(address: str, prompts: list[list[int]], max_tokens: int) -> tuple[int, float]:
    """All prompts at once as Generate streams; (tokens received, wall seconds)."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pdserve_pb2_grpc.PDServeStub(channel)

        async def one(prompt: list[int]) -> int:
            ids = pb.TokenIds(ids=prompt)
            request = pb.GenerateRequest(token_ids=ids, max_tokens=max_tokens, ignore_eos=True)
            return sum([len(response.token_ids) async for response in stub.Generate(request, timeout=600)])

        start = time.perf_counter()
        counts = await asyncio.gather(*(one(prompt) for prompt in prompts))
        return sum(counts), time.perf_counter() - start


class _Scraper:
    """GET /metrics every ``interval_s`` in a thread while the "on" arm runs (what Prometheus does)."""

    def __init__(self, http_address: str, interval_s: float) -> None:
        self.url, self.interval_s = f"http://{http_address}/metrics", interval_s
        self.num_scrapes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with urllib.request.urlopen(self.url, timeout=10) as response:
                response.read()
            self.num_scrapes += 1
            self._stop.wait(self.interval_s)

    def __enter__(self) -> _Scraper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _run_arm(
    arm: str, cluster: EmbeddedCluster, prompts: list[list[int]], max_tokens: int, scrape_interval_s: float
) -> ArmRun:
    if arm == "on":
        with _Scraper(cluster.http_address, scrape_interval_s):
            num_tokens, seconds = asyncio.run(_streams(cluster.grpc_address, prompts, max_tokens))
    else:
        num_tokens, seconds = asyncio.run(_streams(cluster.grpc_address, prompts, max_tokens))
    if num_tokens != len(prompts) * max_tokens:
        raise RuntimeError(f"{arm}: {num_tokens} tokens, expected {len(prompts) * max_tokens}")
    return ArmRun(arm, num_tokens, seconds)


def _prompts(num: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[256] + [rng.randrange(32, 127) for _ in range(length - 1)] for _ in range(num)]


def _report(rounds: list[dict[str, ArmRun]], num_spans: int, num_bytes: int) -> None:
    click.echo("| round | order | off tokens/s | on tokens/s | on / off |")
    click.echo("|---:|---|---:|---:|---:|")
    for index, runs in enumerate(rounds, 1):
        order = " then ".join(runs)
        ratio = runs["on"].tokens_per_s / runs["off"].tokens_per_s
        click.echo(f"| {index} | {order} | {runs['off'].tokens_per_s:.0f} | {runs['on'].tokens_per_s:.0f} "
                   f"| {ratio:.1%} |")
    totals = {arm: sum(r[arm].num_tokens for r in rounds) / sum(r[arm].seconds for r in rounds)
              for arm in ARMS}
    ratio = totals["on"] / totals["off"]
    click.echo(f"| all | | {totals['off']:.0f} | {totals['on']:.0f} | **{ratio:.1%}** |")
    click.echo(f"\nspans received over OTLP during the rounds: {num_spans} ({num_bytes} bytes)")


@click.command()
@click.option("--streams", type=int, default=32, show_default=True)
@click.option("--max-tokens", type=int, default=64, show_default=True)
@click.option("--prompt-tokens", type=int, default=64, show_default=True)
@click.option("--rounds", type=int, default=4, show_default=True, help="Each round runs off and on once.")
@click.option("--model", type=click.Choice(["builtin", "smollm2"]), default="builtin", show_default=True,
              help="builtin: the random tiny model (float32; the cheapest tokens, so the overhead shows "
                   "most); smollm2: the default SmolLM2-135M-Instruct (bf16).")
@click.option("--scrape-interval", type=float, default=1.0, show_default=True,
              help="Seconds between scrapes of the on arm's /metrics.")
def main(
    streams: int, max_tokens: int, prompt_tokens: int, rounds: int, model: str, scrape_interval: float
) -> None:
    """Tokens/s with tracing + metrics on vs both off, interleaved, one run."""
    with OtlpReceiver(keep_spans=False) as receiver:
        configs = arm_configs(model, receiver.endpoint)
        clusters: dict[str, EmbeddedCluster] = {}
        try:
            for arm in ARMS:
                clusters[arm] = EmbeddedCluster(configs[arm]).start()
            warm = _prompts(streams, prompt_tokens, seed=99)
            for arm in ARMS:  # first requests pay one-time costs (routers, connections, allocations)
                _run_arm(arm, clusters[arm], warm, max_tokens, scrape_interval)
            spans_before, bytes_before = receiver.num_spans, receiver.num_bytes
            results: list[dict[str, ArmRun]] = []
            for index in range(rounds):
                prompts = _prompts(streams, prompt_tokens, seed=index)
                order = ARMS if index % 2 == 0 else ARMS[::-1]
                results.append({arm: _run_arm(arm, clusters[arm], prompts, max_tokens, scrape_interval)
                                for arm in order})
            time.sleep(configs["on"].tracing.export_delay_ms / 1e3 + 1.0)  # the last batches arrive
            click.echo(f"\n{streams} streams x {max_tokens} tokens, {prompt_tokens}-token prompts, model "
                       f"{model}, 1 prefill + 1 decode replica per app, scrape every {scrape_interval:g} s\n")
            _report(results, receiver.num_spans - spans_before, receiver.num_bytes - bytes_before)
            click.echo(f"traced requests in the rounds: {rounds * streams}")
        finally:
            for cluster in reversed(list(clusters.values())):  # the first one started owns Ray: last
                cluster.stop()


if __name__ == "__main__":
    main()
