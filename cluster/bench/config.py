"""Configuration of one benchmark run: workload shape, SLOs and output.

Everything a run depends on lives in `BenchConfig`, a frozen dataclass written verbatim into
results.json so a run can be repeated from its own output.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

ArrivalKind = Literal["trace", "poisson", "closed"]


@dataclass(frozen=True)
class SLO:
    """Per-request service-level objectives for goodput (DistServe): a request counts only if it
    meets every objective that is set. `None` means "no objective on this metric"."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2e_ms: float | None = None

    def __post_init__(self) -> None:
        for name in ("ttft_ms", "tpot_ms", "e2e_ms"):
            value = getattr(self, name)
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise ValueError(f"SLO.{name} must be a positive finite number of ms, got {value!r}")

    @property
    def is_empty(self) -> bool:
        """True when no objective is set (goodput is then not reported)."""
        return self.ttft_ms is None and self.tpot_ms is None and self.e2e_ms is None

    @classmethod
    def parse(cls, items: tuple[str, ...] | list[str]) -> SLO:
        """Parse `("ttft:500", "tpot:50")` (vLLM's `--goodput` syntax) into an SLO."""
        values: dict[str, float] = {}
        for item in items:
            for part in item.replace(",", " ").split():
                key, sep, value = part.partition(":")
                key = key.strip().lower()
                if not sep or key not in ("ttft", "tpot", "e2e"):
                    raise ValueError(f"--goodput: expected ttft:MS, tpot:MS or e2e:MS, got {part!r}")
                try:
                    values[f"{key}_ms"] = float(value)
                except ValueError:
                    raise ValueError(f"--goodput: {key} needs a number of ms, got {value!r}") from None
        return cls(**values)

    def describe(self) -> str:
        """`ttft<=500ms, tpot<=50ms` (or `none`)."""
        parts = [f"{name}<={value:g}ms" for name, value in
                 (("ttft", self.ttft_ms), ("tpot", self.tpot_ms), ("e2e", self.e2e_ms)) if value is not None]
        return ", ".join(parts) if parts else "none"


@dataclass(frozen=True)
class LengthClass:
    """One class of a synthetic workload: prompt and output length, and its share of requests."""

    input_len: int
    output_len: int
    weight: float = 1.0

    def __post_init__(self) -> None:
        if self.input_len < 1 or self.output_len < 1:
            raise ValueError(f"LengthClass: input_len and output_len must be >= 1, got {self}")
        if not self.weight > 0:
            raise ValueError(f"LengthClass.weight must be > 0, got {self.weight}")


def parse_length_mix(spec: str) -> tuple[LengthClass, ...]:
    """Parse `"64x128:0.8,2048x4:0.2"` (INPUTxOUTPUT[:WEIGHT], comma separated)."""
    classes: list[LengthClass] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        lengths, _, weight = part.partition(":")
        input_len, sep, output_len = lengths.lower().partition("x")
        try:
            if not sep:
                raise ValueError
            classes.append(LengthClass(int(input_len), int(output_len), float(weight) if weight else 1.0))
        except ValueError:
            raise ValueError(f"--lengths: expected INPUTxOUTPUT[:WEIGHT], got {part!r}") from None
    if not classes:
        raise ValueError("--lengths: no length class given")
    return tuple(classes)


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark run.

    Arrivals: `trace` replays the trace's own timestamps multiplied by `time_scale`; `poisson`
    draws exponential gaps at `rate` req/s (`inf`: all at once); `closed` keeps `concurrency`
    requests in flight. Lengths come from the trace (times `length_scale`, clipped to
    `max_context`) or, without a trace, from the synthetic `lengths` mix.
    """

    arrival: ArrivalKind = "poisson"
    trace: str | None = None                 # path to a Mooncake .jsonl or Azure .csv trace
    rate: float = 1.0                        # req/s for poisson arrivals
    concurrency: int = 1                     # in-flight requests for closed-loop arrivals
    time_scale: float = 1.0                  # trace replay: trace seconds x time_scale = replay seconds
    length_scale: float = 1.0                # trace lengths x length_scale
    lengths: tuple[LengthClass, ...] = field(default_factory=lambda: (LengthClass(256, 64),))
    duration_s: float | None = None          # stop issuing requests after this many seconds
    num_requests: int | None = None          # stop after this many requests
    trace_start_s: float = 0.0               # skip the first seconds of the trace
    max_context: int = 4096                  # the model's context length: prompt + output must fit
    vocab_size: int = 256                    # synthesized token ids are drawn from [0, vocab_size)
    block_tokens: int = 512                  # tokens per trace hash id (Mooncake: 512), before scaling
    slo: SLO = field(default_factory=SLO)
    seed: int = 0
    tenant_id: str = ""
    poll_interval_s: float = 0.5             # ClusterInfo polling period for per-pool utilization
    request_timeout_s: float = 600.0
    warmup_requests: int = 1                 # small unrecorded requests sent before the run

    def __post_init__(self) -> None:
        if self.arrival not in ("trace", "poisson", "closed"):
            raise ValueError(f"BenchConfig.arrival must be trace, poisson or closed, got {self.arrival!r}")
        if self.arrival == "trace" and not self.trace:
            raise ValueError("BenchConfig.trace: trace arrivals need a trace file")
        if not self.rate > 0:
            raise ValueError(f"BenchConfig.rate must be > 0 req/s (inf allowed), got {self.rate}")
        if self.concurrency < 1:
            raise ValueError(f"BenchConfig.concurrency must be >= 1, got {self.concurrency}")
        for name in ("time_scale", "length_scale", "poll_interval_s", "request_timeout_s"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"BenchConfig.{name} must be a positive finite number, got {value}")
        if self.duration_s is None and self.num_requests is None:
            raise ValueError("BenchConfig: set duration_s or num_requests (or both)")
        if self.duration_s is not None and not self.duration_s > 0:
            raise ValueError(f"BenchConfig.duration_s must be > 0, got {self.duration_s}")
        if self.num_requests is not None and self.num_requests < 1:
            raise ValueError(f"BenchConfig.num_requests must be >= 1, got {self.num_requests}")
        if self.warmup_requests < 0:
            raise ValueError(f"BenchConfig.warmup_requests must be >= 0, got {self.warmup_requests}")
        if self.trace_start_s < 0:
            raise ValueError(f"BenchConfig.trace_start_s must be >= 0, got {self.trace_start_s}")
        if self.max_context < 2:
            raise ValueError(f"BenchConfig.max_context must be >= 2, got {self.max_context}")
        if self.vocab_size < 2:
            raise ValueError(f"BenchConfig.vocab_size must be >= 2, got {self.vocab_size}")
        if self.block_tokens < 1:
            raise ValueError(f"BenchConfig.block_tokens must be >= 1, got {self.block_tokens}")
        if not self.lengths:
            raise ValueError("BenchConfig.lengths must hold at least one length class")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (written into results.json)."""
        data = asdict(self)
        data["rate"] = self.rate if math.isfinite(self.rate) else "inf"
        return data
