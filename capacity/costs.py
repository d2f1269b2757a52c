"""Per-step cost models: how long one engine step, or one KV transfer, takes.

A step is described by :class:`Step`: the tokens it computes (prefill chunks plus one per decoding
sequence), the sequences in it, the (query, key) attention pairs it evaluates and the KV tokens it
reads. Two models answer ``step_s(step)``:

* :class:`RooflineCost`: ``max(compute, memory) + overhead`` on a named device, tensor parallel over
  ``tp`` devices: compute = (2 x params x tokens + attention FLOPs) / (tp x peak FLOP/s x efficiency),
  memory = (weight bytes + KV bytes read) / (tp x HBM bytes/s x efficiency).
* :class:`LinearCost`: ``overhead + per_token x tokens + per_seq x seqs + per_pair x pairs +
  per_kv_token x kv tokens``, least-squares fitted to steps measured on the real engine
  (``capacity.calibrate``).

Every model's :meth:`describe` is the line written next to each figure it produced.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Protocol

from capacity.model import ModelSpec, NodeSpec


@dataclass(frozen=True, slots=True)
class Step:
    """One engine step's work."""

    num_tokens: int  # tokens computed (prefill chunk tokens + one per decoding sequence)
    num_seqs: int  # sequences in the batch
    attn_pairs: float  # sum over computed tokens of the context they attend to
    kv_tokens: float  # KV tokens read (sum of the sequences' context lengths)
    num_prefills: int = 0  # of num_seqs, the prefill chunks (0: a decode-only step)


def prefill_step(chunks: list[tuple[int, int]]) -> Step:
    """A step of prefill chunks ``(num_cached_or_done_tokens, num_new_tokens)``."""
    tokens = sum(n for _, n in chunks)
    pairs = sum(n * s + n * (n + 1) / 2 for s, n in chunks)
    return Step(tokens, len(chunks), pairs, sum(s + n for s, n in chunks), len(chunks))


def decode_step(batch: int, context_tokens: float) -> Step:
    """A decode step of ``batch`` sequences whose contexts sum to ``context_tokens``."""
    return Step(batch, batch, context_tokens, context_tokens)


def _contexts(context_tokens: float, batch: int, num_steps: int) -> list[float]:
    """The batch's summed context at each of ``num_steps`` decode steps (one token more per sequence a
    step); integer-valued floats, so ``c + k * batch`` is exactly the running sum."""
    return [context_tokens + k * batch for k in range(num_steps)]


class CostModel(Protocol):
    kv_bytes_per_token: int

    def step_s(self, step: Step) -> float: ...

    def decode_durations(self, batch: int, context_tokens: float, num_steps: int) -> list[float]: ...

    def transfer_s(self, num_bytes: float) -> float: ...

    def describe(self) -> str: ...


@dataclass(frozen=True)
class RooflineCost:
    """Roofline of ``model`` on ``node`` (see the module docstring)."""

    model: ModelSpec
    node: NodeSpec

    @cached_property
    def kv_bytes_per_token(self) -> int:
        return self.model.kv_bytes_per_token

    @cached_property
    def _coefficients(self) -> tuple[float, float, float, float, float]:
        device, tp, model = self.node.device, self.node.tp, self.model
        flop_s = tp * device.flops * device.compute_efficiency
        byte_s = tp * device.hbm_bytes_per_s * device.bandwidth_efficiency
        return (
            2.0 * model.num_params / flop_s,
            model.attention_flops_per_pair / flop_s,
            model.weight_bytes / byte_s,
            model.kv_bytes_per_token / byte_s,
            device.step_overhead_s,
        )

    def step_s(self, step: Step) -> float:
        per_token, per_pair, weights, per_kv_token, overhead = self._coefficients
        compute = per_token * step.num_tokens + per_pair * step.attn_pairs
        memory = weights + per_kv_token * step.kv_tokens
        return (compute if compute > memory else memory) + overhead

    def decode_durations(self, batch: int, context_tokens: float, num_steps: int) -> list[float]:
        """``step_s(decode_step(batch, c))`` for ``num_steps`` consecutive decode steps, ``c`` growing by
        ``batch`` a step: the same arithmetic, bit for bit, without a Step per step (the simulator's
        decode runs call this on every batch change)."""
        per_token, per_pair, weights, per_kv_token, overhead = self._coefficients
        tokens = per_token * batch
        durations = []
        for ctx in _contexts(context_tokens, batch, num_steps):
            compute, memory = tokens + per_pair * ctx, weights + per_kv_token * ctx
            durations.append((compute if compute > memory else memory) + overhead)
        return durations

    def transfer_s(self, num_bytes: float) -> float:
        return num_bytes / self.node.device.interconnect_bytes_per_s

    def describe(self) -> str:
        model, node = self.model, self.node
        return f"roofline of {model.name} ({model.dtype}) on {node.tp} x {node.device.describe()}"


@dataclass(frozen=True)
class LinearCost:
    """A linear step-time model fitted to measured engine steps (``capacity.calibrate``)."""

    kv_bytes_per_token: int
    overhead_s: float
    per_token_s: float
    per_seq_s: float
    per_pair_s: float
    per_kv_token_s: float
    transfer_bytes_per_s: float
    transfer_overhead_s: float
    source: str  # what was measured: model, dtype, threads, machine, date

    def step_s(self, step: Step) -> float:
        return max(
            0.0,
            self.overhead_s
            + self.per_token_s * step.num_tokens
            + self.per_seq_s * step.num_seqs
            + self.per_pair_s * step.attn_pairs
            + self.per_kv_token_s * step.kv_tokens,
        )

    def decode_durations(self, batch: int, context_tokens: float, num_steps: int) -> list[float]:
        """As :meth:`RooflineCost.decode_durations` (the same sums in the same order as ``step_s``)."""
        base = self.overhead_s + self.per_token_s * batch + self.per_seq_s * batch
        pair, kv = self.per_pair_s, self.per_kv_token_s
        return [max(0.0, base + pair * c + kv * c) for c in _contexts(context_tokens, batch, num_steps)]

    def transfer_s(self, num_bytes: float) -> float:
        return self.transfer_overhead_s + num_bytes / self.transfer_bytes_per_s

    def describe(self) -> str:
        return (
            f"calibrated ({self.source}): step = {self.overhead_s * 1e3:.2f} ms"
            f" + {self.per_token_s * 1e6:.1f} us/token"
            f" + {self.per_seq_s * 1e6:.1f} us/seq + {self.per_pair_s * 1e9:.2f} ns/attn pair"
            f" + {self.per_kv_token_s * 1e9:.1f} ns/KV token;"
            f" transfer {self.transfer_overhead_s * 1e3:.1f} ms"
            f" + {self.transfer_bytes_per_s / 1e9:.2f} GB/s"
        )

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> LinearCost:
        return cls(**json.loads(Path(path).read_text()))


@dataclass(frozen=True)
class ServedCost:
    """Step costs as a served cluster shows them (``capacity.served`` fits them to the per-request
    server timings of a live cluster): a step with prefill chunks costs ``prefill_s + per_prefill_token
    x tokens + per_prefill_pair x attention pairs`` (the prefill replica's whole per-request work: the
    step, the KV export, the result message), a decode-only step ``decode_s + per_decode_seq x batch +
    per_decode_kv_token x KV tokens read`` (batch-size dependent), a KV hand-off ``transfer_s`` (the
    ingress's call to the decode replica, the pull, the admission), and every request ``path_s``
    outside the engines (client -> ingress -> prefill replica and the first token's way back), added to
    TTFT and E2E."""

    kv_bytes_per_token: int
    prefill_s: float
    per_prefill_token_s: float
    per_prefill_pair_s: float
    decode_s: float
    per_decode_seq_s: float
    per_decode_kv_token_s: float
    transfer_overhead_s: float
    per_transfer_token_s: float  # the hand-off grows with the prompt (the KV written into the decode cache)
    path_s: float
    prefill_shared: float  # slowdown of a prefill step while the decode replica works (shared cores)
    decode_shared: float  # slowdown of a decode step while the prefill replica works
    source: str
    # the machine's load noise: observed / fitted time of the probes' requests (prefills, decode
    # TPOTs); the simulator holds one drawn at random (seeded) for every ``noise_period_s`` of
    # simulated time and multiplies the steps starting in it by it (load moves in bursts of seconds,
    # not per step), () for none
    noise: tuple[float, ...] = ()
    noise_period_s: float = 1.0

    def step_s(self, step: Step) -> float:
        if step.num_prefills:
            return (
                self.prefill_s
                + self.per_prefill_token_s * step.num_tokens
                + self.per_prefill_pair_s * step.attn_pairs
            )
        decode = self.decode_s + self.per_decode_seq_s * step.num_seqs
        return decode + self.per_decode_kv_token_s * step.kv_tokens

    def decode_durations(self, batch: int, context_tokens: float, num_steps: int) -> list[float]:
        base, kv = self.decode_s + self.per_decode_seq_s * batch, self.per_decode_kv_token_s
        return [base + kv * c for c in _contexts(context_tokens, batch, num_steps)]

    def transfer_s(self, num_bytes: float) -> float:
        return self.transfer_overhead_s + self.per_transfer_token_s * num_bytes / self.kv_bytes_per_token

    def describe(self) -> str:
        return (
            f"served ({self.source}): prefill = {self.prefill_s * 1e3:.1f} ms"
            f" + {self.per_prefill_token_s * 1e6:.1f} us/token"
            f" + {self.per_prefill_pair_s * 1e9:.2f} ns/attn pair;"
            f" decode step = {self.decode_s * 1e3:.1f} ms + {self.per_decode_seq_s * 1e3:.2f} ms/seq"
            f" + {self.per_decode_kv_token_s * 1e6:.2f} us/KV token;"
            f" KV hand-off {self.transfer_overhead_s * 1e3:.1f} ms"
            f" + {self.per_transfer_token_s * 1e6:.1f} us/token;"
            f" path {self.path_s * 1e3:.1f} ms/request;"
            f" sharing 2 cores: prefill x{1 + self.prefill_shared:.2f}"
            f" while decoding, decode x{1 + self.decode_shared:.2f} while prefilling"
        )

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"kind": "served", **asdict(self)}) + "\n")
