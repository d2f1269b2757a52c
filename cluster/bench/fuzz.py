"""Fuzzing the public APIs (issue 15, acceptance 3): generated requests and garbage bytes, zero INTERNAL.

``python -m cluster.bench.fuzz --requests 10000`` starts an embedded cluster (the random tiny model)
unless ``--server``/``--http`` name a running one, then sends:

- ``--requests`` Generate calls whose bytes hypothesis draws over every field of the request, in the
  server's bytes-typed twin (``GenerateRequestWire``: invalid UTF-8, negative and huge numbers, NaN and
  infinite floats, unicode, token ids past the vocabulary, stop strings, chat messages, tenants), some
  with unknown fields appended, some truncated, some not a protobuf at all; random ``authorization``
  metadata on some;
- garbage on the wire: random bytes to the gRPC port, the HTTP/2 preface followed by random frames,
  random bytes and broken HTTP/1.1 requests to the HTTP port, and JSON bodies drawn over the OpenAI
  fields (``/v1/completions``, ``/v1/chat/completions``; some streamed and dropped after the status).

It passes when no call ends INTERNAL or UNKNOWN (HTTP: no 5xx but 503/504 under load), no replica
restarted (the Serve replica actors' ids and PIDs are the same before and after), and the server then
serves a normal request exactly. ``tests/integration/test_int_fuzz.py`` runs a smaller draw of the same.
"""

from __future__ import annotations

import asyncio
import collections
import json
import random
import socket
import struct
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

GENERATE = "/pdserve.v1.PDServe/Generate"
FORBIDDEN = ("INTERNAL", "UNKNOWN")
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
INT64 = 2**63 - 1
UINT64 = 2**64 - 1


# ---- what is sent -------------------------------------------------------------------------------------


def wire_request_strategy(vocab_size: int) -> Any:
    """Hypothesis strategy: serialized ``GenerateRequestWire`` bytes over every field, mostly invalid."""
    from hypothesis import strategies as st

    # Few choices per example (hypothesis spends ~0.1 ms a choice): short strings, and long ones by
    # repetition, so 10,000 requests draw in seconds.
    def text_bytes(max_size: int) -> Any:
        short = st.one_of(st.binary(max_size=min(max_size, 12)), st.text(max_size=8).map(_utf8_or_replace))
        if max_size <= 12:
            return short
        return st.one_of(
            short, st.tuples(short, st.integers(1, max_size)).map(lambda pair: pair[0] * pair[1])
        )

    small_ids = st.integers(0, vocab_size - 1)
    any_ids = st.one_of(small_ids, st.integers(0, UINT64))
    floats = st.one_of(
        st.floats(width=32, allow_nan=True, allow_infinity=True), st.floats(0.0, 1.0, width=32)
    )
    messages = st.lists(
        st.tuples(
            st.sampled_from([b"user", b"system", b"assistant", b"tool", b""]) | text_bytes(6), text_bytes(64)
        ),
        max_size=3,
    )

    # Every strategy is built once, here: building them inside a draw costs more than the draw.
    prompts = st.one_of(
        st.tuples(st.just("text"), text_bytes(200)),
        st.tuples(
            st.just("token_ids"), st.tuples(st.lists(any_ids, max_size=8), st.sampled_from([1, 2, 50, 700]))
        ),
        st.tuples(st.just("messages"), messages),
        st.tuples(st.just("none"), st.none()),
    )
    optional = st.tuples(
        st.none() | floats,
        st.none() | floats,
        st.none() | st.integers(-INT64 - 1, INT64),
        st.none() | st.integers(0, UINT64),
    )
    mangles = st.one_of(
        st.just(("none", 0)),
        st.tuples(st.just("unknown_field"), st.integers(14, 2**29 - 1)),
        st.tuples(st.just("truncate"), st.integers(0, 2**16)),
        st.tuples(st.just("garbage"), st.binary(max_size=256)),
    )
    fields = st.tuples(
        prompts,
        st.one_of(st.integers(1, 4), st.integers(-INT64 - 1, INT64)),  # max_tokens
        optional,  # temperature, top_p, top_k, seed
        st.tuples(st.lists(text_bytes(6), max_size=3), st.sampled_from([1, 1, 1, 6])),  # stop x repeat
        st.lists(any_ids, max_size=6),  # stop_token_ids
        text_bytes(300),  # tenant_id
        text_bytes(300),  # request_id
        st.booleans(),  # ignore_eos
        mangles,
    )

    return fields.map(_build_wire)


def _build_wire(drawn: tuple[Any, ...]) -> bytes:
    """The serialized request of one draw of ``wire_request_strategy``'s fields."""
    from protos import pdserve_wire_pb2 as wire

    (
        (kind, prompt),
        max_tokens,
        optional_values,
        (stops, repeat),
        stop_ids,
        tenant,
        request_id,
        eos,
        mangle,
    ) = drawn
    message = wire.GenerateRequestWire(
        max_tokens=max_tokens,
        stop=stops * repeat,
        stop_token_ids=stop_ids,
        tenant_id=tenant,
        request_id=request_id,
        ignore_eos=eos,
    )
    if kind == "text":
        message.text = prompt
    elif kind == "token_ids":
        message.token_ids.SetInParent()
        message.token_ids.ids.extend(prompt[0] * prompt[1])  # up to 5,600 ids: past the context
    elif kind == "messages":
        message.messages.SetInParent()
        for role, content in prompt:
            message.messages.messages.add(role=role, content=content)
    for name, value in zip(("temperature", "top_p", "top_k", "seed"), optional_values, strict=True):
        if value is not None:
            setattr(message, name, value)
    return _mangled(message.SerializeToString(), mangle)


def _mangled(data: bytes, mangle: tuple[str, Any]) -> bytes:
    """An unknown field appended, the bytes cut short, or replaced by garbage (or kept)."""
    kind, value = mangle
    if kind == "unknown_field":
        return data + _varint(value << 3) + _varint(value)
    if kind == "truncate" and data:
        return data[: value % len(data)]
    if kind == "garbage":
        return value
    return data


def openai_body_strategy() -> Any:
    """Hypothesis strategy: (path, JSON body bytes) over the OpenAI request fields, mostly invalid."""
    from hypothesis import strategies as st

    scalars = st.one_of(
        st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=40)
    )
    values = st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
        max_leaves=8,
    )
    prompt = st.one_of(st.text(max_size=60), st.lists(st.integers(-5, 70000), max_size=20), values)
    message = st.fixed_dictionaries(
        {
            "role": st.sampled_from(["user", "system", "assistant", "tool"]) | values,
            "content": st.text(max_size=60) | values,
        }
    )
    common = {
        "max_tokens": st.one_of(st.integers(1, 4), st.integers(-(2**70), 2**70), values),
        "temperature": st.floats() | values,
        "top_p": st.floats() | values,
        "top_k": st.integers() | values,
        "seed": st.integers() | values,
        "stop": st.text(max_size=8) | st.lists(st.text(max_size=6), max_size=20),
        "user": st.text(max_size=300),
        "stream": st.booleans() | values,
        "n": st.integers(-2, 3),
        "logprobs": values,
        "model": st.text(max_size=20) | st.none(),
        "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}) | values,
    }
    completion = st.fixed_dictionaries({"prompt": prompt}, optional=common)
    chat = st.fixed_dictionaries({"messages": st.lists(message, max_size=3) | values}, optional=common)

    def encode(body: Any) -> bytes:
        return json.dumps(body, allow_nan=True, default=str).encode("utf-8", "surrogatepass")

    return st.one_of(
        st.tuples(st.just("/v1/completions"), completion.map(encode)),
        st.tuples(st.just("/v1/chat/completions"), chat.map(encode)),
        st.tuples(st.sampled_from(["/v1/completions", "/v1/chat/completions"]), st.binary(max_size=200)),
    )


def draw_examples(strategy: Any, num: int, seed: int) -> list[Any]:
    """``num`` examples of ``strategy`` (hypothesis's generate phase only, no shrinking, no database)."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hypothesis_seed

    drawn: list[Any] = []

    @hypothesis_seed(seed)
    @settings(
        max_examples=num,
        phases=[Phase.generate],
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def collect(example: Any) -> None:
        drawn.append(example)

    while len(drawn) < num:  # hypothesis may stop early on duplicates: draw again with the next seed
        before = len(drawn)
        collect()
        if len(drawn) == before:
            break
        seed += 1
        collect = hypothesis_seed(seed)(collect)  # type: ignore[assignment]
    return drawn[:num]


def _utf8_or_replace(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


# ---- sending it -----------------------------------------------------------------------------------------


@dataclass
class FuzzReport:
    grpc_codes: collections.Counter[str] = field(default_factory=collections.Counter)
    http_statuses: collections.Counter[str] = field(default_factory=collections.Counter)
    raw_connections: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    replicas_before: dict[str, int] = field(default_factory=dict)
    replicas_after: dict[str, int] = field(default_factory=dict)
    serves_after: bool = False

    @property
    def num_forbidden(self) -> int:
        http_5xx = sum(
            n
            for status, n in self.http_statuses.items()
            if status.startswith("5") and status not in ("503", "504")
        )
        return sum(self.grpc_codes[code] for code in FORBIDDEN) + http_5xx

    @property
    def is_passing(self) -> bool:
        return self.num_forbidden == 0 and self.replicas_before == self.replicas_after and self.serves_after

    def summary(self) -> str:
        grpc_codes, http_statuses = (
            dict(sorted(self.grpc_codes.items())),
            dict(sorted(self.http_statuses.items())),
        )
        lines = [
            f"gRPC Generate calls: {sum(grpc_codes.values())} -> {grpc_codes}",
            f"HTTP requests: {sum(http_statuses.values())} -> {http_statuses}",
            f"raw garbage connections: {self.raw_connections}",
            "seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in self.seconds.items()),
            f"INTERNAL/UNKNOWN/5xx: {self.num_forbidden}",
            f"replicas unchanged: {self.replicas_before == self.replicas_after} "
            f"({len(self.replicas_after)} replica actors, ids and PIDs)",
            f"serves normally after: {self.serves_after}",
            f"PASS: {self.is_passing}",
        ]
        return "\n".join(lines)


async def send_grpc(
    address: str,
    payloads: Sequence[bytes],
    report: FuzzReport,
    concurrency: int = 64,
    seed: int = 0,
    timeout_s: float = 60.0,
) -> None:
    """Each payload as one raw Generate call (some with random ``authorization`` metadata)."""
    rng = random.Random(seed)
    semaphore = asyncio.Semaphore(concurrency)
    async with grpc.aio.insecure_channel(
        address, options=[("grpc.max_send_message_length", 64 * 2**20)]
    ) as channel:
        generate = channel.unary_stream(GENERATE, request_serializer=bytes, response_deserializer=bytes)

        async def one(payload: bytes) -> None:
            metadata = ()
            if rng.random() < 0.2:
                metadata = (
                    (
                        "authorization",
                        rng.choice(["", "Bearer", "Bearer x", "Basic abc", "Bearer " + "k" * 300]),
                    ),
                )
            async with semaphore:
                try:
                    async for _ in generate(payload, timeout=timeout_s, metadata=metadata):
                        pass
                    report.grpc_codes["OK"] += 1
                except grpc.aio.AioRpcError as error:
                    report.grpc_codes[error.code().name] += 1

        await asyncio.gather(*(one(payload) for payload in payloads))


async def send_http(
    address: str, bodies: Sequence[tuple[str, bytes]], report: FuzzReport, concurrency: int = 32
) -> None:
    """Each (path, body) as one HTTP/1.1 POST on its own connection; the status line is read, then the
    connection is dropped (so streamed answers are disconnects mid-stream)."""
    host, port = address.rsplit(":", 1)
    semaphore = asyncio.Semaphore(concurrency)

    async def one(path: str, body: bytes) -> None:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode()
        async with semaphore:
            report.http_statuses[await _status_of(host, int(port), head + body)] += 1

    await asyncio.gather(*(one(path, body) for path, body in bodies))


async def _status_of(host: str, port: int, data: bytes, timeout_s: float = 3.0) -> str:
    """The HTTP status the server answers ``data`` with; "dropped" when none came within ``timeout_s``
    (a long generation: the client goes away, which the server must handle as a cancel)."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
    except (OSError, asyncio.TimeoutError) as error:
        return f"connect failed ({type(error).__name__})"
    try:
        writer.write(data)
        await writer.drain()
        try:
            line = await asyncio.wait_for(reader.readline(), timeout_s)
        except asyncio.TimeoutError:
            return "dropped"
        parts = line.split()
        return parts[1].decode() if len(parts) >= 2 and line.startswith(b"HTTP/") else "closed"
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
        return "closed"
    finally:
        writer.close()


def raw_garbage(grpc_address: str, http_address: str, num: int, seed: int = 0) -> int:
    """Garbage bytes on both ports: random bytes, the HTTP/2 preface + random frames (gRPC port),
    broken HTTP/1.1 (HTTP port). Each on its own connection; returns how many were sent."""
    rng = random.Random(seed)
    sent = 0
    for index in range(num):
        kind = index % 4
        address = grpc_address if kind < 2 or not http_address else http_address
        if kind == 0 or kind == 2:
            data = rng.randbytes(rng.randrange(1, 512))
        elif kind == 1:
            data = HTTP2_PREFACE + b"".join(_random_frame(rng) for _ in range(rng.randrange(1, 8)))
        else:
            data = rng.choice(
                [
                    b"GET / HTTP/1.1\r\n\r\n",
                    b"POST /v1/completions HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n{",
                    b"\x00\xff" * 50 + b"\r\n\r\n",
                    b"GET /v1/models HTTP/9.9\r\nHost: \xff\r\n\r\n",
                    b"POST /v1/chat/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                ]
            )
        host, port = address.rsplit(":", 1)
        try:
            with socket.create_connection((host, int(port)), timeout=5) as sock:
                sock.sendall(data)
                sock.settimeout(0.05)
                try:
                    sock.recv(4096)
                except OSError:
                    pass
            sent += 1
        except OSError:
            sent += 1  # the server closing on us is an answer too
    return sent


def _random_frame(rng: random.Random) -> bytes:
    payload = rng.randbytes(rng.randrange(0, 64))
    frame_type = rng.choice([0, 1, 3, 4, 6, 7, 8, 9, rng.randrange(256)])  # DATA HEADERS RST SETTINGS ...
    stream_id = rng.choice([0, 1, 3, rng.randrange(2**31)])
    return (
        struct.pack(">I", len(payload))[1:]
        + bytes([frame_type, rng.randrange(256)])
        + struct.pack(">I", stream_id)
        + payload
    )


# ---- checks around it -----------------------------------------------------------------------------------


def replica_actors(app_name: str) -> dict[str, int]:
    """The app's live Serve replica actors: actor id -> PID (a restarted replica has a new id and PID)."""
    # ray.util.state.list_actors needs the dashboard, which pdserve's Ray runs without; the GCS's actor
    # table (Ray's debugging accessor) has the same facts.
    from ray._private.state import actors

    prefix = f"ServeReplica:{app_name}:"
    table = actors(actor_state_name="ALIVE").values()
    return {info["ActorID"]: info["Pid"] for info in table if info["ActorClassName"].startswith(prefix)}


def serves_normally(address: str) -> bool:
    """One ordinary greedy request: 3 tokens, finished by length."""
    from protos import pdserve_pb2 as pb
    from protos import pdserve_pb2_grpc

    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[256, 72, 105]), max_tokens=3, ignore_eos=True)
    with grpc.insecure_channel(address) as channel:
        responses = list(pdserve_pb2_grpc.PDServeStub(channel).Generate(request, timeout=60))
    return (
        sum(len(r.token_ids) for r in responses) == 3
        and responses[-1].finish_reason == pb.FINISH_REASON_LENGTH
    )


@dataclass
class Drawn:
    """What a run sends: raw Generate payloads and (path, body) HTTP requests, and the seconds drawn."""

    payloads: list[bytes]
    bodies: list[tuple[str, bytes]]
    seconds: float = 0.0


def draw(num_requests: int, num_http: int, vocab_size: int, seed: int = 0, cache: str | None = None) -> Drawn:
    """Draw the requests (hypothesis), or load them from ``cache`` when it exists (saved there otherwise),
    so a run on a shared machine can draw before it takes the cluster lock."""
    import os
    import pickle

    if cache is not None and os.path.exists(cache):
        with open(cache, "rb") as file:
            return pickle.load(file)
    started = time.perf_counter()
    payloads = draw_examples(wire_request_strategy(vocab_size), num_requests, seed)
    bodies = draw_examples(openai_body_strategy(), num_http, seed) if num_http else []
    drawn = Drawn(payloads, bodies, time.perf_counter() - started)
    if cache is not None:
        with open(cache, "wb") as file:
            pickle.dump(drawn, file)
    return drawn


def run(
    grpc_address: str,
    http_address: str,
    drawn: Drawn,
    num_raw: int,
    seed: int = 0,
    app_name: str | None = None,
) -> FuzzReport:
    """Send what was drawn and the garbage, then check (module docstring)."""
    report = FuzzReport()
    report.seconds["draw"] = drawn.seconds
    started = time.perf_counter()
    if app_name is not None:
        report.replicas_before = replica_actors(app_name)
    report.seconds["replicas"] = time.perf_counter() - started
    started = time.perf_counter()
    asyncio.run(send_grpc(grpc_address, drawn.payloads, report, seed=seed))
    report.seconds["grpc"] = time.perf_counter() - started
    if drawn.bodies and http_address:
        started = time.perf_counter()
        asyncio.run(send_http(http_address, drawn.bodies, report))
        report.seconds["http"] = time.perf_counter() - started
    started = time.perf_counter()
    report.raw_connections = raw_garbage(grpc_address, http_address, num_raw, seed)
    report.seconds["raw"] = time.perf_counter() - started
    started = time.perf_counter()
    report.serves_after = serves_normally(grpc_address)
    if app_name is not None:
        report.replicas_after = replica_actors(app_name)
    report.seconds["checks"] = time.perf_counter() - started
    return report


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    from engine.builtin import BUILTIN_VOCAB_SIZE

    parser = argparse.ArgumentParser(prog="python -m cluster.bench.fuzz", description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=10000, help="generated Generate calls")
    parser.add_argument("--http-requests", type=int, default=2000, help="generated OpenAI bodies")
    parser.add_argument("--raw", type=int, default=400, help="garbage connections (both ports)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--cache", default=None, help="pickle of the drawn requests: load if present, else save"
    )
    parser.add_argument("--draw-only", action="store_true", help="draw (into --cache) and exit")
    parser.add_argument("--server", default=None, help="gRPC HOST:PORT of a running cluster (else embedded)")
    parser.add_argument("--http", default="", help="its HTTP HOST:PORT")
    parser.add_argument(
        "--ray-temp-dir", default="/tmp/pdserve-fuzz-ray", help="the embedded cluster's own Ray"
    )
    args = parser.parse_args(argv)
    drawn = draw(args.requests, args.http_requests, BUILTIN_VOCAB_SIZE, args.seed, args.cache)
    print(
        f"drawn: {len(drawn.payloads)} Generate requests, {len(drawn.bodies)} HTTP bodies "
        f"in {drawn.seconds:.1f} s"
    )
    if args.draw_only:
        return 0
    if args.server is not None:
        report = run(args.server, args.http, drawn, args.raw, args.seed)
    else:
        report = _run_embedded(args, drawn)
    print(report.summary())
    return 0 if report.is_passing else 1


def _run_embedded(args: Any, drawn: Drawn) -> FuzzReport:
    from cluster.bench.soak import start_cluster, stop_cluster
    from cluster.config import config_from_dict
    from engine.builtin import BUILTIN_MODEL_ID

    pool = {"num_cpus": 0.25, "torch_threads": 1}
    config = config_from_dict(
        {
            "engine": {"model": BUILTIN_MODEL_ID, "dtype": "float32", "kv_cache_bytes": 16 * 2**20},
            "prefill": pool,
            "decode": pool,
            "grpc": {"port": 0},
            "http": {"port": 0},
            "app_name": "pdserve-fuzz",
        }
    )
    cluster = start_cluster(config, args.ray_temp_dir, num_cpus=4)
    try:
        return run(cluster.grpc_address, cluster.http_address, drawn, args.raw, args.seed, config.app_name)
    finally:
        stop_cluster(cluster)


if __name__ == "__main__":
    sys.exit(main())
