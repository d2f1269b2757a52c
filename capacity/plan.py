"""The capacity planner: from a model, a node, a workload, a prefix hit rate and SLOs to pool sizes.

The arithmetic, in order (every step is a function below, so a test can check each one):

1. KV bytes per token (``engine.kv_memory``), per request (mean prompt + output tokens).
2. KV budget of a node = tp x device memory - weights - reserve; tokens it holds; the concurrency it
   holds (budget / bytes of a mean request, and of a reference ``4k`` request).
3. The decode batch that meets TPOT: the largest batch whose decode step (cost model, at the mean
   context) stays within ``tpot_p99 x margin``, capped by the node's KV concurrency and max_num_seqs.
   A decode node then gives ``batch / step`` output tokens/s.
4. Prefill: a request computes ``(1 - hit rate) x prompt`` tokens on top of ``hit rate x prompt``
   cached ones, in chunks of ``max_num_batched_tokens``; its service time S is the sum of those steps.
   The TTFT p99 budget bounds the utilization rho of a prefill node through the M/M/1 tail of the
   waiting time, ``W99 = S x rho / (1 - rho) x ln(100 rho)`` (conservative for near-deterministic
   service): the largest rho with ``S(p99 prompt) + transfer + W99 <= ttft_p99`` is the operating point.
5. Node counts at the peak rate: prefill = rate x S / rho, decode = rate x output tokens / (tokens/s
   of a decode node); P:D is their ratio. Colocated: every node runs chunked prefill beside its decode
   batch, and the planner searches the chunk size that needs the fewest nodes at the same SLOs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from capacity.costs import CostModel, Step, decode_step, prefill_step
from capacity.model import ModelSpec, NodeSpec


@dataclass(frozen=True)
class WorkloadStats:
    """What the planner needs of a workload (from length classes, a distribution or a trace)."""

    mean_input: float
    mean_output: float
    p99_input: float
    peak_rate: float  # requests/s at the peak

    @property
    def mean_context(self) -> float:
        """Mean context of a decoding sequence: the prompt plus half its answer."""
        return self.mean_input + self.mean_output / 2


@dataclass(frozen=True)
class SLOs:
    ttft_p99_s: float
    tpot_p99_s: float
    tpot_margin: float = 0.9  # the decode step aims at this share of the TPOT SLO (step jitter, joins)


@dataclass(frozen=True)
class EngineLimits:
    block_size: int = 16
    max_num_batched_tokens: int = 8192
    max_num_seqs: int = 1024


@dataclass
class Plan:
    """Every figure the planner derives (``to_dict`` is what ``pdserve plan --json`` prints)."""

    kv_bytes_per_token: int
    kv_bytes_per_request: float
    kv_budget_bytes: float
    kv_tokens_per_node: int
    concurrency_per_node: int  # mean requests (prompt + output) a decode node's KV holds
    concurrency_4k_per_node: int  # 4,096-token requests it holds
    decode_batch: int
    decode_step_s: float
    decode_tokens_per_s_per_node: float
    prefill_service_s: float  # mean request's prefill time on an idle node
    prefill_tokens_per_s_per_node: float  # prompt tokens (cached ones included) per second of prefill
    prefill_max_utilization: float
    transfer_s: float
    prefill_nodes: int
    decode_nodes: int
    colocated_nodes: int
    colocated_chunk_tokens: int
    notes: list[str] = field(default_factory=list)

    @property
    def pd_ratio(self) -> float:
        return self.prefill_nodes / self.decode_nodes if self.decode_nodes else math.inf

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "pd_ratio": self.pd_ratio}


def kv_concurrency(model: ModelSpec, node: NodeSpec, tokens_per_request: float) -> tuple[float, int, int]:
    """(KV budget bytes, tokens it holds, requests of ``tokens_per_request`` it holds)."""
    budget = node.kv_budget_bytes(model)
    tokens = int(budget // model.kv_bytes_per_token)
    return budget, tokens, int(tokens // max(1.0, tokens_per_request))


def prefill_service_s(cost: CostModel, num_input: float, hit_rate: float, limits: EngineLimits) -> float:
    """Prefill time of one prompt alone on a node: its uncached tokens in budget-sized chunks."""
    cached = int(num_input * hit_rate)
    remaining = max(1, int(num_input) - cached)
    total = 0.0
    while remaining > 0:
        chunk = min(remaining, limits.max_num_batched_tokens)
        total += cost.step_s(prefill_step([(cached, chunk)]))
        cached += chunk
        remaining -= chunk
    return total


def max_batch_within(cost: CostModel, step_budget_s: float, context: float, limit: int) -> tuple[int, float]:
    """Largest decode batch (<= ``limit``) whose step at mean ``context`` fits ``step_budget_s``
    (binary search: the step time grows with the batch). (0, step of 1) when even one does not fit."""

    def step_of(batch: int) -> float:
        return cost.step_s(decode_step(batch, batch * context))

    if limit < 1 or step_of(1) > step_budget_s:
        return 0, step_of(1)
    low, high = 1, limit
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if step_of(mid) <= step_budget_s else (low, mid - 1)
    return low, step_of(low)


def mm1_wait_p99_s(service_s: float, rho: float) -> float:
    """p99 waiting time of an M/M/1 queue at utilization ``rho`` (0 when under 1 % wait at all)."""
    if rho <= 0.01:
        return 0.0
    if rho >= 1:
        return math.inf
    return service_s * rho / (1 - rho) * math.log(100 * rho)


def max_utilization(service_s: float, fixed_s: float, ttft_budget_s: float) -> float:
    """Largest utilization (grid of 0.5 %) whose p99 wait plus ``fixed_s`` fits the TTFT budget."""
    best = 0.0
    for step in range(1, 200):
        rho = step / 200
        if fixed_s + mm1_wait_p99_s(service_s, rho) <= ttft_budget_s:
            best = rho
    return best


def plan(
    model: ModelSpec,
    node: NodeSpec,
    cost: CostModel,
    workload: WorkloadStats,
    hit_rate: float,
    slos: SLOs,
    limits: EngineLimits = EngineLimits(),
) -> Plan:
    """The pool sizes for ``workload`` at its peak (see the module docstring)."""
    notes: list[str] = []
    per_request = workload.mean_input + workload.mean_output
    budget, kv_tokens, concurrency = kv_concurrency(model, node, per_request)
    concurrency_4k = int(kv_tokens // 4096)
    batch_cap = min(concurrency, limits.max_num_seqs)
    batch, step = max_batch_within(cost, slos.tpot_p99_s * slos.tpot_margin, workload.mean_context, batch_cap)
    if batch == 0:
        notes.append("no decode batch meets the TPOT SLO on this node (a single sequence's step is slower)")
    decode_rate = batch / step if batch else 0.0
    if batch == batch_cap and batch_cap == concurrency:
        notes.append(f"decode is KV-bound: {concurrency} mean requests fill the node's KV before TPOT binds")
    service = prefill_service_s(cost, workload.mean_input, hit_rate, limits)
    service_p99 = prefill_service_s(cost, workload.p99_input, hit_rate, limits)
    transfer = cost.transfer_s(workload.mean_input * model.kv_bytes_per_token)
    rho = max_utilization(service, service_p99 + transfer, slos.ttft_p99_s)
    if rho == 0:
        notes.append("no prefill utilization meets the TTFT SLO (the p99 prompt alone takes longer)")
    prefill_nodes = math.ceil(workload.peak_rate * service / rho - 1e-9) if rho else 0
    decode_nodes = (
        math.ceil(workload.peak_rate * workload.mean_output / decode_rate - 1e-9) if decode_rate else 0
    )
    colocated, chunk = colocated_nodes(cost, workload, hit_rate, slos, limits, batch_cap)
    return Plan(
        kv_bytes_per_token=model.kv_bytes_per_token,
        kv_bytes_per_request=per_request * model.kv_bytes_per_token,
        kv_budget_bytes=budget, kv_tokens_per_node=kv_tokens, concurrency_per_node=concurrency,
        concurrency_4k_per_node=concurrency_4k, decode_batch=batch, decode_step_s=step,
        decode_tokens_per_s_per_node=decode_rate, prefill_service_s=service,
        prefill_tokens_per_s_per_node=workload.mean_input / service, prefill_max_utilization=rho,
        transfer_s=transfer, prefill_nodes=prefill_nodes, decode_nodes=decode_nodes,
        colocated_nodes=colocated, colocated_chunk_tokens=chunk, notes=notes,
    )  # fmt: skip


def colocated_nodes(
    cost: CostModel,
    workload: WorkloadStats,
    hit_rate: float,
    slos: SLOs,
    limits: EngineLimits,
    batch_cap: int,
) -> tuple[int, int]:
    """Fewest colocated nodes at the same SLOs, and the prefill chunk per step that achieves it.

    A colocated node's step carries a decode batch ``b`` and a prefill chunk of ``c`` tokens; every
    decoding sequence waits for the whole step, so ``step(b, c) <= TPOT`` budget. The node gives
    ``b / step`` output tokens/s and ``c / step`` prefill tokens/s; prefill runs at most at the
    utilization the TTFT budget allows (as for a prefill node, with the chunked service time).
    """
    uncached_per_request = max(1.0, workload.mean_input * (1 - hit_rate))
    target = slos.tpot_p99_s * slos.tpot_margin
    best: tuple[int, int] = (0, 0)
    for chunk in (64, 128, 256, 512, 1024, 2048, 4096, 8192):
        if chunk > limits.max_num_batched_tokens:
            break
        batch, step = _mixed_batch(cost, chunk, workload, hit_rate, target, batch_cap)
        if batch == 0:
            continue
        service = math.ceil(uncached_per_request / chunk) * step
        service_p99 = math.ceil(max(1.0, workload.p99_input * (1 - hit_rate)) / chunk) * step
        rho = max_utilization(service, service_p99, slos.ttft_p99_s)
        if rho == 0:
            continue
        prefill_share = workload.peak_rate * uncached_per_request / (chunk / step) / rho
        decode_share = workload.peak_rate * workload.mean_output / (batch / step)
        nodes = math.ceil(max(prefill_share, decode_share) - 1e-9)
        if best[0] == 0 or nodes < best[0]:
            best = (nodes, chunk)
    return best


def _mixed_batch(
    cost: CostModel, chunk: int, workload: WorkloadStats, hit_rate: float, target_s: float, batch_cap: int
) -> tuple[int, float]:
    cached = workload.mean_input * hit_rate

    def step_of(batch: int) -> float:
        prefill = prefill_step([(int(cached), chunk)])
        ctx = batch * workload.mean_context
        return cost.step_s(
            Step(prefill.num_tokens + batch, batch + 1, prefill.attn_pairs + ctx, prefill.kv_tokens + ctx, 1)
        )

    if step_of(1) > target_s:
        return 0, step_of(1)
    low, high = 1, max(1, batch_cap)
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if step_of(mid) <= target_s else (low, mid - 1)
    return low, step_of(low)
