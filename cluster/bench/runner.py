"""Drive one benchmark run against a gRPC address: dispatch, ClusterInfo polling, progress.

With ``http_address`` the requests go through the OpenAI HTTP API instead (``--api openai``:
``cluster.bench.openai_client``, the same workload and records); ClusterInfo still comes over gRPC.

    open-loop (trace / poisson): sleep until each request's arrival time, start its stream as a task
    closed-loop: `concurrency` workers, each sends its next request when the previous one ends
    meanwhile: a poller samples ClusterInfo every `poll_interval_s` for per-pool utilization

Issuing stops at `duration_s` / `num_requests`; requests already in flight are awaited (as in
vLLM's bench), so the measured duration can run past `duration_s`.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
from tqdm import tqdm

from cluster.bench.client import RequestRecord, send_request
from cluster.bench.config import BenchConfig
from cluster.bench.workload import BenchRequest, Workload, random_prompt
from protos import pdserve_pb2, pdserve_pb2_grpc

CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]


@dataclass
class RunResult:
    """What a run produced: per-request records, ClusterInfo samples and the server's identity."""

    records: list[RequestRecord]
    samples: list[dict[str, Any]] = field(default_factory=list)
    cluster: dict[str, Any] = field(default_factory=dict)   # model, block size, transport, router policy
    started_at_unix: float = 0.0
    origin_perf_s: float = 0.0      # time.perf_counter() at the run's time 0 (records are relative to it)


class BenchRunner:
    """Runs a `Workload` against one gRPC address (a plain class; the CLI is a thin wrapper)."""

    def __init__(self, config: BenchConfig, workload: Workload, address: str, *,
                 show_progress: bool = True, label: str = "", http_address: str | None = None) -> None:
        self.config = config
        self.workload = workload
        self.address = address
        self.http_address = http_address  # set: requests over the OpenAI HTTP API (host:port)
        self._http: Any = None  # the aiohttp session of an HTTP run
        self.show_progress = show_progress
        self.label = label
        self.run_id = uuid.uuid4().hex[:8]

    def run(self) -> RunResult:
        """Run to completion (blocking; owns its event loop)."""
        return asyncio.run(self.run_async())

    async def run_async(self) -> RunResult:
        """Run to completion inside the caller's event loop."""
        if self.http_address is None:
            return await self._run_grpc()
        import aiohttp

        connector = aiohttp.TCPConnector(limit=0)  # no pool cap: one connection per stream in flight
        async with aiohttp.ClientSession(connector=connector) as session:
            self._http = session
            try:
                return await self._run_grpc()
            finally:
                self._http = None

    async def _request(self, stub: pdserve_pb2_grpc.PDServeStub, request: BenchRequest, request_id: str,
                       origin: float, tenant_id: str = "") -> RequestRecord:
        """One request over the run's API."""
        seed, timeout_s = self.config.seed, self.config.request_timeout_s
        if self._http is not None:
            from cluster.bench.openai_client import send_openai_request

            return await send_openai_request(self._http, f"http://{self.http_address}", request, request_id,
                                             origin, seed=seed, tenant_id=tenant_id, timeout_s=timeout_s)
        return await send_request(stub, request, request_id, origin, seed=seed, tenant_id=tenant_id,
                                  timeout_s=timeout_s)

    async def _run_grpc(self) -> RunResult:
        async with grpc.aio.insecure_channel(self.address, options=CHANNEL_OPTIONS) as channel:
            stub = pdserve_pb2_grpc.PDServeStub(channel)
            try:
                await asyncio.wait_for(channel.channel_ready(), timeout=60.0)
            except asyncio.TimeoutError:
                raise TimeoutError(f"no gRPC server at {self.address} after 60 s") from None
            cluster = await self._cluster_identity(stub)
            await self._warm_up(stub)
            timed = self.config.arrival != "closed"
            # materialize bounded workloads up front: prompt synthesis must not delay arrivals
            bounded = timed or self.config.num_requests is not None
            requests: Iterator[BenchRequest] | list[BenchRequest] = (
                list(self.workload) if bounded else iter(self.workload))
            total = len(requests) if isinstance(requests, list) else None
            progress = tqdm(total=total, desc=self.label or "bench", unit="req",
                            disable=not self.show_progress, dynamic_ncols=True)
            started_at = time.time()
            origin = time.perf_counter()
            samples: list[dict[str, Any]] = []
            poller = asyncio.create_task(self._poll(stub, origin, samples))
            try:
                if timed:
                    records = await self._open_loop(stub, requests, origin, progress)
                else:
                    records = await self._closed_loop(stub, iter(requests), origin, progress)
            finally:
                poller.cancel()
                await asyncio.gather(poller, return_exceptions=True)
                progress.close()
        records.sort(key=lambda r: r.index)
        return RunResult(records, samples, cluster, started_at, origin)

    async def _send(self, stub: pdserve_pb2_grpc.PDServeStub, request: BenchRequest, origin: float,
                    progress: tqdm) -> RequestRecord:
        record = await self._request(stub, request, f"bench-{self.run_id}-{request.index}", origin,
                                     self.config.tenant_id)
        progress.update(1)
        if not record.is_ok:
            progress.set_postfix_str(f"last error: {record.status}", refresh=False)
        return record

    async def _open_loop(self, stub: pdserve_pb2_grpc.PDServeStub,
                         requests: Iterator[BenchRequest] | list[BenchRequest], origin: float,
                         progress: tqdm) -> list[RequestRecord]:
        tasks: list[asyncio.Task[RequestRecord]] = []
        for request in requests:
            assert request.arrival_s is not None
            delay = origin + request.arrival_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(self._send(stub, request, origin, progress)))
        return list(await asyncio.gather(*tasks))

    async def _closed_loop(self, stub: pdserve_pb2_grpc.PDServeStub, requests: Iterator[BenchRequest],
                           origin: float, progress: tqdm) -> list[RequestRecord]:
        deadline = None if self.config.duration_s is None else origin + self.config.duration_s
        records: list[RequestRecord] = []

        async def worker() -> None:
            # `next` on a shared iterator is safe: asyncio runs one worker at a time
            while deadline is None or time.perf_counter() < deadline:
                request = next(requests, None)
                if request is None:
                    return
                records.append(await self._send(stub, request, origin, progress))

        await asyncio.gather(*(worker() for _ in range(self.config.concurrency)))
        return records

    async def _warm_up(self, stub: pdserve_pb2_grpc.PDServeStub) -> None:
        """Send `warmup_requests` small unrecorded requests first (lazy initialisation on the
        server must not land in the first measured TTFT); a failure here stops the run."""
        for i in range(self.config.warmup_requests):
            # an index no workload reaches: warm-up prompts share no prefix with measured ones
            prompt = random_prompt(2**40 + i, 16, self.config.vocab_size, self.config.seed)
            request = BenchRequest(index=-1 - i, prompt_token_ids=prompt, max_tokens=4, arrival_s=None)
            request_id = f"bench-{self.run_id}-warmup-{i}"
            record = await self._request(stub, request, request_id, time.perf_counter())
            if not record.is_ok:
                raise RuntimeError(f"warm-up request failed at {self.address}: "
                                   f"{record.status} {record.error}")

    async def _cluster_identity(self, stub: pdserve_pb2_grpc.PDServeStub) -> dict[str, Any]:
        try:
            info = await stub.ClusterInfo(pdserve_pb2.ClusterInfoRequest(), timeout=10.0)
        except grpc.aio.AioRpcError as error:
            return {"error": error.code().name}
        return {"model": info.model, "block_size": info.block_size, "kv_transport": info.kv_transport,
                "router_policy": info.router_policy,
                "pools": {pool.name: [r.replica_id for r in pool.replicas] for pool in info.pools}}

    async def _poll(self, stub: pdserve_pb2_grpc.PDServeStub, origin: float,
                    samples: list[dict[str, Any]]) -> None:
        """Sample ClusterInfo until cancelled; gives up quietly if the server does not offer it."""
        for _ in itertools.count():
            try:
                info = await stub.ClusterInfo(pdserve_pb2.ClusterInfoRequest(), timeout=5.0)
            except grpc.aio.AioRpcError as error:
                if error.code() == grpc.StatusCode.UNIMPLEMENTED:
                    return
            else:
                samples.append({"t_s": time.perf_counter() - origin, "pools": _pools(info)})
            await asyncio.sleep(self.config.poll_interval_s)


def _pools(info: pdserve_pb2.ClusterInfoResponse) -> dict[str, list[dict[str, Any]]]:
    return {pool.name: [{"replica_id": r.replica_id, "running_requests": r.running_requests,
                         "queued_requests": r.queued_requests, "kv_blocks_used": r.kv_blocks_used,
                         "kv_blocks_total": r.kv_blocks_total, "kv_blocks_cached": r.kv_blocks_cached}
                        for r in pool.replicas]
            for pool in info.pools}
