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


def prefill_step(chunks: list[tuple[int, int]]) -> Step:
    """A step of prefill chunks ``(num_cached_or_done_tokens, num_new_tokens)``."""
    tokens = sum(n for _, n in chunks)
    pairs = sum(n * s + n * (n + 1) / 2 for s, n in chunks)
    return Step(tokens, len(chunks), pairs, sum(s + n for s, n in chunks))


def decode_step(batch: int, context_tokens: float) -> Step:
    """A decode step of ``batch`` sequences whose contexts sum to ``context_tokens``."""
    return Step(batch, batch, context_tokens, context_tokens)


class CostModel(Protocol):
    kv_bytes_per_token: int

    def step_s(self, step: Step) -> float: ...

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
