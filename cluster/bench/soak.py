"""Load and soak (issue 15, acceptance 4): 1,000 concurrent streams, and a long mixed run with kills.

``python -m cluster.bench.soak streams --streams 1000`` opens that many Generate streams at once on the
embedded default (SmolLM2-135M-Instruct, bfloat16, one prefill + one decode replica) and reports errors
and the RSS of the ingress and each replica before and after. ``python -m cluster.bench.soak soak
--minutes 30`` runs ``--concurrency`` clients that each loop over a random action — finish (a normal
request), cancel (after a few messages), disconnect (the channel closed under a live stream), error (a
request the server refuses), an HTTP stream dropped mid-way — while a killer SIGKILLs a prefill or
decode replica every ``--kill-every-s``; at the end it waits for the cluster to go idle and reports
leaked KV blocks (blocks held by requests once none runs: must be 0), INTERNAL/UNKNOWN counts (must be
0) and the memory of each replica over time (RSS samples). Streams cut by a kill end UNAVAILABLE (or
are migrated, when decode migration is on): counted, not failures. ``--kill drain-decode`` removes a
decode replica by a scale-down instead (Serve drains it; streams that outlive ``migration.drain_timeout_s``
migrate) and adds it back half a period later.

Both start their own local Ray in this process, in ``--ray-temp-dir`` (not the tests' /tmp/pdserve-ray),
and never attach to another Ray: ``ray.init`` is called without an address, so it starts a new one.
Run them under the shared integration lock on a shared machine.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import random
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from protos import pdserve_pb2 as pb
from protos import pdserve_pb2_grpc

FORBIDDEN = ("INTERNAL", "UNKNOWN")
MIB = 2**20
DETAILS: dict[str, collections.Counter[str]] = {}  # code -> the details of the streams that ended so
KILLABLE = {"any": ("Prefill", "Decode"), "decode": ("Decode",), "prefill": ("Prefill",)}  # --kill
DRAIN = "drain-decode"  # --kill: a scale-down by one decode replica (it drains), back up halfway to the next


# ---- the cluster and its processes --------------------------------------------------------------------


def start_cluster(config: Any, ray_temp_dir: str, num_cpus: int) -> Any:
    """A fresh local Ray (own temp dir) and the app on it."""
    import logging

    import ray

    from cluster.embedded import EmbeddedCluster

    if ray.is_initialized():
        raise RuntimeError("Ray is already initialized in this process: the bench needs its own")
    os.makedirs(ray_temp_dir, exist_ok=True)
    ray.init(
        num_cpus=num_cpus,
        _temp_dir=ray_temp_dir,
        _node_ip_address="127.0.0.1",
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=True,
        logging_level=logging.WARNING,
    )
    return EmbeddedCluster(config).start()  # Ray is initialized: it is used, and shut down by us


def stop_cluster(cluster: Any) -> None:
    import ray
    from ray import serve

    try:
        cluster.delete_app()
    finally:
        serve.shutdown()
        ray.shutdown()


def replica_pids(app_name: str) -> dict[str, int]:
    """``Deployment#replica`` -> PID of each live Serve replica of the app (GCS actor table; the state API
    needs the dashboard, which this Ray runs without)."""
    from ray._private.state import actors

    prefix = f"ServeReplica:{app_name}:"
    pids = {}
    for info in actors(actor_state_name="ALIVE").values():
        if info["ActorClassName"].startswith(prefix):
            deployment = info["ActorClassName"][len(prefix) :]
            pids[f"{deployment}#{info['ActorID'][:8]}"] = int(info["Pid"])
    return pids


def rss_mib(pids: dict[str, int]) -> dict[str, float]:
    import psutil

    sizes = {}
    for name, pid in pids.items():
        try:
            size = psutil.Process(pid).memory_info().rss / MIB
        except psutil.Error:
            continue
        if size > 0:  # a killed replica not yet reaped reads 0
            sizes[name] = size
    return sizes


def blocks_held(address: str) -> dict[str, int]:
    with grpc.insecure_channel(address) as channel:
        info = pdserve_pb2_grpc.PDServeStub(channel).ClusterInfo(pb.ClusterInfoRequest(), timeout=30)
    return {
        f"{pool.name}/{r.replica_id[-8:]}": r.kv_blocks_used for pool in info.pools for r in pool.replicas
    }


def wait_idle(address: str, within_s: float) -> dict[str, int]:
    """Poll until every replica holds zero request blocks (or ``within_s`` passes); the last view."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            held = blocks_held(address)
        except grpc.RpcError:
            held = {"unreachable": -1}
        if (held and all(count == 0 for count in held.values())) or time.monotonic() > deadline:
            return held
        time.sleep(0.5)


# ---- 1,000 streams ------------------------------------------------------------------------------------


async def _one_stream(stub: Any, request: pb.GenerateRequest, codes: collections.Counter[str]) -> int:
    tokens = 0
    try:
        async for response in stub.Generate(request, timeout=900):
            tokens += len(response.token_ids)
        codes["OK"] += 1
    except grpc.aio.AioRpcError as error:
        codes[error.code().name] += 1
        DETAILS.setdefault(error.code().name, collections.Counter())[(error.details() or "")[:160]] += 1
    return tokens


async def many_streams(
    address: str, num: int, max_tokens: int, num_channels: int = 8
) -> tuple[Any, int, float]:
    """``num`` concurrent greedy streams of short distinct prompts: (codes, tokens received, seconds)."""
    rng = random.Random(0)
    codes: collections.Counter[str] = collections.Counter()
    channels = [grpc.aio.insecure_channel(address) for _ in range(num_channels)]
    stubs = [pdserve_pb2_grpc.PDServeStub(channel) for channel in channels]
    requests = [
        pb.GenerateRequest(
            text=f"Item {index}: {rng.choice(['red', 'blue', 'green'])}",
            max_tokens=max_tokens,
            ignore_eos=True,
        )
        for index in range(num)
    ]
    started = time.perf_counter()
    tokens = await asyncio.gather(
        *(_one_stream(stubs[i % num_channels], r, codes) for i, r in enumerate(requests))
    )
    seconds = time.perf_counter() - started
    for channel in channels:
        await channel.close()
    return codes, sum(tokens), seconds


def _settings(pairs: Sequence[str]) -> dict[str, Any]:
    import yaml

    return {key: yaml.safe_load(value) for key, _, value in (pair.partition("=") for pair in pairs)}


def streams_command(args: argparse.Namespace) -> int:
    from cluster.config import ClusterConfig

    changes = {"grpc.port": 0, "http.port": 0, "app_name": "pdserve-streams", **_settings(args.set)}
    config = ClusterConfig().override(changes)
    cluster = start_cluster(config, args.ray_temp_dir, args.num_cpus)
    try:
        asyncio.run(many_streams(cluster.grpc_address, 16, 2))  # warm up (compile paths, first requests)
        pids = replica_pids(config.app_name)
        before = rss_mib(pids)
        codes, tokens, seconds = asyncio.run(
            many_streams(cluster.grpc_address, args.streams, args.max_tokens)
        )
        held = wait_idle(cluster.grpc_address, 60)
        after = rss_mib(pids)
        print(
            f"{args.streams} concurrent streams x {args.max_tokens} tokens ({config.engine.model}, "
            f"{config.engine.dtype}): {dict(codes)} in {seconds:.1f} s, {tokens} tokens received "
            f"(expected {args.streams * args.max_tokens})"
        )
        print(f"blocks held after: {held}; replicas unchanged: {replica_pids(config.app_name) == pids}")
        for code, details in DETAILS.items():
            print(f"  {code}: {details.most_common(3)}")
        print("RSS MiB before -> after:")
        for name in sorted(before):
            print(f"  {name:48s} {before[name]:8.1f} -> {after.get(name, float('nan')):8.1f}")
        is_ok = codes["OK"] == args.streams and tokens == args.streams * args.max_tokens
        return 0 if is_ok and all(n == 0 for n in held.values()) else 1
    finally:
        stop_cluster(cluster)


# ---- the soak -----------------------------------------------------------------------------------------


@dataclass
class SoakStats:
    actions: collections.Counter[str] = field(default_factory=collections.Counter)
    codes: collections.Counter[str] = field(default_factory=collections.Counter)
    kills: list[str] = field(default_factory=list)
    rss: list[tuple[float, dict[str, float]]] = field(default_factory=list)
    killed_pids: set[int] = field(default_factory=set)
    migrations: dict[str, int] = field(default_factory=dict)


async def _stream(stub: Any, request: pb.GenerateRequest, stats: SoakStats, cancel_after: int | None) -> None:
    call = stub.Generate(request, timeout=120)
    messages = 0
    try:
        async for _ in call:
            messages += 1
            if cancel_after is not None and messages >= cancel_after:
                call.cancel()
                stats.codes["CANCELLED (client)"] += 1
                return
        stats.codes["OK"] += 1
    except grpc.aio.AioRpcError as error:
        stats.codes[error.code().name] += 1


async def _http_drop(http_address: str, rng: random.Random, stats: SoakStats) -> None:
    """An HTTP streamed completion whose connection is closed after the first bytes of the stream."""
    host, port = http_address.rsplit(":", 1)
    body = f'{{"prompt": "soak {rng.random()}", "max_tokens": 40, "stream": true, "ignore_eos": true}}'
    head = f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
    try:
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(f"{head}Content-Length: {len(body)}\r\n\r\n{body}".encode())
        await writer.drain()
        status = (await asyncio.wait_for(reader.readline(), 120)).split()
        stats.codes[f"HTTP {status[1].decode() if len(status) > 1 else 'closed'}"] += 1
        await asyncio.wait_for(reader.read(200), 120)
        writer.close()  # mid-stream: the server must cancel and free the request
    except (OSError, asyncio.TimeoutError) as error:
        stats.codes[f"HTTP {type(error).__name__}"] += 1


async def _client(address: str, http_address: str, deadline: float, seed: int, stats: SoakStats) -> None:
    rng = random.Random(seed)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pdserve_pb2_grpc.PDServeStub(channel)
        while time.monotonic() < deadline:
            action = rng.choice(["finish", "finish", "cancel", "disconnect", "error", "http_drop"])
            stats.actions[action] += 1
            prompt = f"soak {seed} {rng.randrange(10**6)} " + "word " * rng.randrange(1, 60)
            request = pb.GenerateRequest(
                text=prompt,
                max_tokens=rng.randrange(1, 48),
                ignore_eos=True,
                tenant_id=rng.choice(["", "t1", "t2"]),
            )
            if action == "finish":
                await _stream(stub, request, stats, None)
            elif action == "cancel":
                await _stream(stub, request, stats, rng.randrange(1, 4))
            elif action == "disconnect":
                await _disconnect(address, request, rng, stats)
            elif action == "error":
                request.max_tokens = rng.choice([0, 10**6])
                await _stream(stub, request, stats, None)
            elif http_address:
                await _http_drop(http_address, rng, stats)


async def _disconnect(
    address: str, request: pb.GenerateRequest, rng: random.Random, stats: SoakStats
) -> None:
    """A stream whose channel is closed (the connection goes away) after its first message."""
    channel = grpc.aio.insecure_channel(address)
    call = pdserve_pb2_grpc.PDServeStub(channel).Generate(request, timeout=120)
    try:
        async for _ in call:
            break
        stats.codes["disconnected"] += 1
    except grpc.aio.AioRpcError as error:
        stats.codes[error.code().name] += 1
    finally:
        await channel.close(grace=None)


async def _killer(
    app_name: str, deadline: float, args: argparse.Namespace, stats: SoakStats, seed: int
) -> None:
    if args.kill == DRAIN:
        return await _drainer(app_name, deadline, args, stats)
    rng = random.Random(seed)
    every_s, prefixes = args.kill_every_s, KILLABLE[args.kill]
    while time.monotonic() + every_s < deadline:
        await asyncio.sleep(every_s)
        workers = {name: pid for name, pid in replica_pids(app_name).items() if name.startswith(prefixes)}
        if not workers:
            continue
        name = rng.choice(sorted(workers))
        os.kill(workers[name], signal.SIGKILL)
        stats.killed_pids.add(workers[name])
        stats.kills.append(f"{time.strftime('%H:%M:%S')} {name}")


async def _drainer(app_name: str, deadline: float, args: argparse.Namespace, stats: SoakStats) -> None:
    """Every ``--kill-every-s``: the decode pool scaled down by one (``cluster.app.scale_pool``: Serve stops
    one replica gracefully; its streams finish within ``migration.drain_timeout_s``, the rest migrate), and
    back up half a period later."""
    from cluster.app import scale_pool

    every_s, num = args.kill_every_s, args.decode_replicas
    while time.monotonic() + every_s < deadline:
        await asyncio.sleep(every_s / 2)
        await asyncio.to_thread(scale_pool, app_name, "decode", num - 1)
        stats.kills.append(f"{time.strftime('%H:%M:%S')} decode {num}->{num - 1} (drain)")
        await asyncio.sleep(every_s / 2)
        await asyncio.to_thread(scale_pool, app_name, "decode", num)


async def _sampler(app_name: str, deadline: float, every_s: float, stats: SoakStats) -> None:
    started = time.monotonic()
    while time.monotonic() < deadline:
        stats.rss.append((time.monotonic() - started, rss_mib(replica_pids(app_name))))
        await asyncio.sleep(every_s)


async def soak(address: str, http_address: str, app_name: str, args: argparse.Namespace) -> SoakStats:
    stats = SoakStats()
    deadline = time.monotonic() + args.minutes * 60
    tasks = [_client(address, http_address, deadline, seed, stats) for seed in range(args.concurrency)]
    tasks.append(_killer(app_name, deadline, args, stats, 1))
    tasks.append(_sampler(app_name, deadline, args.sample_every_s, stats))
    await asyncio.gather(*tasks)
    return stats


def soak_command(args: argparse.Namespace) -> int:
    from cluster.config import ClusterConfig
    from engine.builtin import BUILTIN_MODEL_ID

    changes: dict[str, Any] = {"grpc.port": 0, "http.port": 0, "app_name": "pdserve-soak"}
    if args.tiny:
        changes |= {
            "engine.model": BUILTIN_MODEL_ID,
            "engine.dtype": "float32",
            "engine.kv_cache_bytes": 32 * MIB,
        }
    config = ClusterConfig().override(changes | _settings(args.set))
    args.decode_replicas = config.decode.num_replicas
    if args.kill == DRAIN and (config.decode.num_replicas < 2 or config.decode.is_autoscaling):
        raise SystemExit(f"--kill {DRAIN}: needs a fixed decode pool of 2+ (--set decode.num_replicas=2)")
    cluster = start_cluster(config, args.ray_temp_dir, args.num_cpus)
    try:
        asyncio.run(many_streams(cluster.grpc_address, 8, 2))  # warm up
        stats = asyncio.run(soak(cluster.grpc_address, cluster.http_address, config.app_name, args))
        held = wait_idle(cluster.grpc_address, 120)
        stats.rss.append((args.minutes * 60, rss_mib(replica_pids(config.app_name))))
        stats.migrations = migration_counts(config.app_name)
        _print_soak(config, args, stats, held)
        forbidden = sum(stats.codes[code] for code in FORBIDDEN)
        return 0 if forbidden == 0 and all(n == 0 for n in held.values()) else 1
    finally:
        stop_cluster(cluster)


def migration_counts(app_name: str) -> dict[str, int]:
    """The ingress replica's migration counters (``IngressDeployment.migration_stats``; one replica's
    view: the default has one ingress replica)."""
    from ray import serve

    handle = serve.get_deployment_handle("IngressDeployment", app_name)
    stats = handle.migration_stats.remote().result(timeout_s=30)
    return {"migrated": stats["num_migrations"], "failed": stats["num_failed"]}


def _print_soak(config: Any, args: argparse.Namespace, stats: SoakStats, held: dict[str, int]) -> None:
    print(
        f"soak: {args.minutes} min, {args.concurrency} clients, {config.engine.model} "
        f"({config.engine.dtype}), "
        f"{'a decode replica drained' if args.kill == DRAIN else 'a replica SIGKILLed'} every "
        f"{args.kill_every_s:.0f} s"
    )
    num_actions = sum(stats.actions.values())
    print(f"actions: {dict(stats.actions)}: {num_actions / args.minutes:.0f} requests/min")
    print(f"outcomes: {dict(stats.codes)}")
    print(f"decode migrations (ingress): {stats.migrations}")
    print(f"INTERNAL/UNKNOWN: {sum(stats.codes[c] for c in FORBIDDEN)}")
    print(f"kills: {stats.kills}")
    print(f"blocks held by requests at the end (must be 0): {held}")
    print("RSS MiB of each process at 0 / 25 / 50 / 75 / 100 % of its samples (s into the soak), and its")
    print("growth over its last third in MiB/min (a killed replica's successor is a new process, apart):")
    for name, samples in sorted(rss_trajectories(stats).items()):
        picks = [samples[round(q * (len(samples) - 1))] for q in (0, 0.25, 0.5, 0.75, 1)]
        tail = samples[-max(2, len(samples) // 3) :]
        slope = (tail[-1][1] - tail[0][1]) / max(tail[-1][0] - tail[0][0], 1e-9) * 60
        sizes = " ".join(f"{size:6.0f} ({at:4.0f})" for at, size in picks)
        print(f"  {name:30s} {sizes}  last third {slope:+6.2f} MiB/min")
    if args.rss_csv:
        with open(args.rss_csv, "w") as out:
            out.write("seconds,process,rss_mib\n")
            out.writelines(
                f"{at:.1f},{name},{size:.1f}\n" for at, sizes in stats.rss for name, size in sizes.items()
            )
        print(f"every RSS sample: {args.rss_csv}")


def rss_trajectories(stats: SoakStats) -> dict[str, list[tuple[float, float]]]:
    """Process name -> its (seconds, RSS MiB) samples."""
    trajectories: dict[str, list[tuple[float, float]]] = collections.defaultdict(list)
    for at, sizes in stats.rss:
        for name, size in sizes.items():
            trajectories[name].append((at, size))
    return trajectories


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.bench.soak", description=__doc__.split("\n")[0])
    parser.add_argument("--ray-temp-dir", default="/tmp/pdserve-soak-ray")
    parser.add_argument("--num-cpus", type=int, default=4)
    commands = parser.add_subparsers(dest="command", required=True)
    streams = commands.add_parser("streams", help="N concurrent streams on the embedded default")
    streams.add_argument("--streams", type=int, default=1000)
    streams.add_argument("--max-tokens", type=int, default=8)
    streams.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a dotted config change (YAML value), e.g. migration.heartbeat_timeout_s=30",
    )
    run = commands.add_parser("soak", help="mixed load with replica kills")
    run.add_argument("--minutes", type=float, default=30.0)
    run.add_argument("--concurrency", type=int, default=16)
    run.add_argument("--kill-every-s", type=float, default=180.0)
    run.add_argument(
        "--kill", choices=[*sorted(KILLABLE), DRAIN], default="any",
        help=f"which pools' replicas to SIGKILL; {DRAIN}: scale decode down by one instead (it drains)",
    )
    run.add_argument("--sample-every-s", type=float, default=10.0)
    run.add_argument("--rss-csv", default="", help="write every RSS sample (seconds,process,rss_mib) here")
    run.add_argument("--tiny", action="store_true", help="the random tiny model instead of SmolLM2")
    run.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="a dotted config change (YAML value)"
    )
    args = parser.parse_args(argv)
    return streams_command(args) if args.command == "streams" else soak_command(args)


if __name__ == "__main__":
    sys.exit(main())
