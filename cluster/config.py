"""Cluster configuration: one YAML file -> one frozen, validated ``ClusterConfig``.

Every section is a frozen dataclass validated in ``__post_init__`` with messages that name the field.
``load_config`` refuses unknown or mistyped keys (``ConfigError`` naming the dotted path, e.g.
``decode.num_replcas: unknown field``), so a typo never silently falls back to a default.

Example (every field optional)::

    model: pdserve-builtin-tiny      # or a local HF checkpoint directory
    mode: disaggregated              # or colocated
    kv_cache_bytes: 67108864
    kv_transfer: {backend: shm, timeout_s: 5.0}
    router: {policy: prefix_hash}
    prefill: {num_replicas: 1, num_cpus: 0.5}
    decode: {num_replicas: 1, num_cpus: 0.5}
    grpc: {host: 127.0.0.1, port: 50051}
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.builtin import BUILTIN_MODEL_ID

MODES = ("disaggregated", "colocated")
KV_BACKENDS = ("shm", "nixl", "torch_dist")
ROUTER_POLICIES = ("prefix_hash", "round_robin", "least_loaded", "consistent_hash")
DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range; the message names the field."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass(frozen=True)
class PoolConfig:
    """One Serve deployment's replicas and resources."""

    num_replicas: int = 1  # fixed replica count (ignored when autoscaling is on)
    min_replicas: int | None = None  # set both bounds to autoscale with cluster.autoscaling policies
    max_replicas: int | None = None
    num_cpus: float = 0.5  # fractional on CPU so 1 prefill + 1 decode fit a 2-core machine
    num_gpus: float = 0.0
    max_ongoing_requests: int = 256  # streams are long-lived: Serve's default of 5 queues them
    torch_threads: int | None = None  # torch intra-op threads inside each replica; None: torch default

    def __post_init__(self) -> None:
        _require(self.num_replicas >= 1, f"num_replicas: must be >= 1, got {self.num_replicas}")
        _require(self.num_cpus >= 0, f"num_cpus: must be >= 0, got {self.num_cpus}")
        _require(self.num_gpus >= 0, f"num_gpus: must be >= 0, got {self.num_gpus}")
        _require(
            self.max_ongoing_requests >= 1,
            f"max_ongoing_requests: must be >= 1, got {self.max_ongoing_requests}",
        )
        _require(
            (self.min_replicas is None) == (self.max_replicas is None),
            "min_replicas/max_replicas: set both to autoscale, or neither",
        )
        if self.min_replicas is not None and self.max_replicas is not None:
            _require(self.min_replicas >= 1, f"min_replicas: must be >= 1, got {self.min_replicas}")
            _require(
                self.max_replicas >= self.min_replicas,
                f"max_replicas: must be >= min_replicas ({self.min_replicas}), got {self.max_replicas}",
            )
        if self.torch_threads is not None:
            _require(self.torch_threads >= 1, f"torch_threads: must be >= 1, got {self.torch_threads}")

    @property
    def is_autoscaling(self) -> bool:
        return self.min_replicas is not None


@dataclass(frozen=True)
class KVTransferSection:
    """Which KV transport moves blocks from prefill to decode, and how long a pull may take."""

    backend: str = "shm"  # "shm" | "nixl" | "torch_dist"
    timeout_s: float = 10.0  # a pull slower than this fails; decode then recomputes the prompt
    # TEST HOOK, 0 in production: the decode worker waits this long after reserving its blocks and
    # before starting the pull, so a fault test can kill the prefill replica while a transfer is
    # under way (tests/integration/test_int_faults.py). Not counted in timeout_s.
    test_pull_delay_s: float = 0.0

    def __post_init__(self) -> None:
        _require(self.backend in KV_BACKENDS, f"backend: must be one of {KV_BACKENDS}, got {self.backend!r}")
        _require(self.timeout_s > 0, f"timeout_s: must be > 0, got {self.timeout_s}")
        _require(
            self.test_pull_delay_s >= 0, f"test_pull_delay_s: must be >= 0, got {self.test_pull_delay_s}"
        )


@dataclass(frozen=True)
class RouterSection:
    """How the ingress picks a prefill replica (and a decode replica)."""

    policy: str = "prefix_hash"  # "prefix_hash" | "round_robin" | "least_loaded" | "consistent_hash"
    load_report_period_s: float = 0.2  # how often replicas publish load for routing
    # prefix_hash's load-watermark fallback (router.config.RouterConfig): a prefill replica is skipped
    # while its queued prefill tokens exceed max(high_watermark_tokens, high_load_factor x pool mean),
    # until they fall below max(low_watermark_tokens, low_load_factor x pool mean)
    high_watermark_tokens: int = 8192
    low_watermark_tokens: int = 4096
    high_load_factor: float = 1.5  # 0: the absolute floor alone
    low_load_factor: float = 1.2

    def __post_init__(self) -> None:
        _require(
            self.policy in ROUTER_POLICIES, f"policy: must be one of {ROUTER_POLICIES}, got {self.policy!r}"
        )
        _require(
            self.low_watermark_tokens >= 0,
            f"low_watermark_tokens: must be >= 0, got {self.low_watermark_tokens}",
        )
        _require(
            self.high_watermark_tokens > self.low_watermark_tokens,
            f"high_watermark_tokens: must be above low_watermark_tokens ({self.low_watermark_tokens}), "
            f"got {self.high_watermark_tokens}",
        )
        _require(
            self.high_load_factor == 0 or self.high_load_factor >= 1,
            f"high_load_factor: must be 0 (off) or >= 1, got {self.high_load_factor}",
        )
        if self.high_load_factor == 0:
            _require(
                self.low_load_factor == 0,
                f"low_load_factor: must be 0 when high_load_factor is 0, got {self.low_load_factor}",
            )
        else:
            _require(
                0 <= self.low_load_factor < self.high_load_factor,
                f"low_load_factor: must be >= 0 and below high_load_factor ({self.high_load_factor}), "
                f"got {self.low_load_factor}",
            )
        _require(
            self.load_report_period_s > 0,
            f"load_report_period_s: must be > 0, got {self.load_report_period_s}",
        )


@dataclass(frozen=True)
class GrpcSection:
    """Where the public gRPC API listens (served by each ingress replica itself, not Serve's proxy)."""

    host: str = "127.0.0.1"  # embedded default: loopback only; "0.0.0.0" to serve other hosts
    port: int = 50051

    def __post_init__(self) -> None:
        _require(bool(self.host), "host: must not be empty")
        _require(0 <= self.port <= 65535, f"port: must be in [0, 65535], got {self.port}")


@dataclass(frozen=True)
class ClusterConfig:
    """The whole cluster: model and cache, mode, transport, router, the three pools, the API."""

    model: str = BUILTIN_MODEL_ID  # the built-in model id or a local HF checkpoint directory
    dtype: str = "float32"
    block_size: int = 16
    kv_cache_bytes: int = 64 * 1024 * 1024  # per worker replica
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 64
    max_model_len: int | None = None  # None: the model's own context length
    mode: str = "disaggregated"  # "colocated": each decode replica prefills its own requests
    lease_s: float = 30.0  # pinned prefill KV is released after this even if no release arrives
    request_timeout_s: float = 600.0  # a stream is ended (DEADLINE_EXCEEDED) after this
    app_name: str = "pdserve"
    coalesce_every_streams: int = 8  # decode messages carry one more token per this many open streams
    coalesce_max_wait_ms: float = 100.0  # ...but a message never waits longer than this for them
    kv_transfer: KVTransferSection = field(default_factory=KVTransferSection)
    router: RouterSection = field(default_factory=RouterSection)
    prefill: PoolConfig = field(default_factory=PoolConfig)
    decode: PoolConfig = field(default_factory=PoolConfig)
    ingress: PoolConfig = field(default_factory=lambda: PoolConfig(num_cpus=0.1, max_ongoing_requests=4096))
    grpc: GrpcSection = field(default_factory=GrpcSection)

    def __post_init__(self) -> None:
        _require(bool(self.model), "model: must be the built-in model id or a checkpoint directory")
        if self.model != BUILTIN_MODEL_ID:
            _require(
                Path(self.model).is_dir(),
                f"model: {self.model!r} is not the built-in model id "
                f"({BUILTIN_MODEL_ID}) nor an existing directory",
            )
        _require(self.dtype in DTYPES, f"dtype: must be one of {DTYPES}, got {self.dtype!r}")
        _require(self.block_size > 0, f"block_size: must be > 0, got {self.block_size}")
        _require(self.kv_cache_bytes > 0, f"kv_cache_bytes: must be > 0, got {self.kv_cache_bytes}")
        _require(
            self.max_num_batched_tokens > 0,
            f"max_num_batched_tokens: must be > 0, got {self.max_num_batched_tokens}",
        )
        _require(self.max_num_seqs > 0, f"max_num_seqs: must be > 0, got {self.max_num_seqs}")
        if self.max_model_len is not None:
            _require(self.max_model_len > 0, f"max_model_len: must be > 0, got {self.max_model_len}")
        _require(self.mode in MODES, f"mode: must be one of {MODES}, got {self.mode!r}")
        _require(self.lease_s > 0, f"lease_s: must be > 0, got {self.lease_s}")
        _require(self.request_timeout_s > 0, f"request_timeout_s: must be > 0, got {self.request_timeout_s}")
        _require(bool(self.app_name), "app_name: must not be empty")
        _require(
            self.coalesce_every_streams >= 1,
            f"coalesce_every_streams: must be >= 1, got {self.coalesce_every_streams}",
        )
        _require(
            self.coalesce_max_wait_ms >= 0,
            f"coalesce_max_wait_ms: must be >= 0, got {self.coalesce_max_wait_ms}",
        )

    @property
    def is_colocated(self) -> bool:
        return self.mode == "colocated"

    def replace(self, **changes: Any) -> ClusterConfig:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict; ``config_from_dict(c.to_dict()) == c``."""
        return dataclasses.asdict(self)


def config_from_dict(data: dict[str, Any] | None) -> ClusterConfig:
    """Build a ``ClusterConfig`` from parsed YAML, refusing unknown fields and wrong types by name."""
    return _build(ClusterConfig, data or {}, "")


def load_config(path: str | Path | None) -> ClusterConfig:
    """Read a YAML file (``None``: all defaults)."""
    if path is None:
        return ClusterConfig()
    import yaml

    text = Path(path).read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return config_from_dict(data)


def _build(cls: type, data: Any, prefix: str) -> Any:
    """``cls(**data)`` with nested sections, unknown keys and scalar types checked field by field."""
    where = prefix.rstrip(".") or "config"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            raise ConfigError(f"{prefix}{key}: unknown field (known: {', '.join(sorted(known))})")
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, f"{prefix}{key}.")
        else:
            kwargs[key] = _check_scalar(hint, value, f"{prefix}{key}")
    try:
        return cls(**kwargs)
    except ConfigError as error:
        if prefix:
            raise ConfigError(f"{prefix}{error}") from None
        raise


def _check_scalar(hint: Any, value: Any, name: str) -> Any:
    """Accept ``value`` for a field typed ``hint`` (int, float, str, bool, or ``X | None``)."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, _union_type()) else (hint,)
    if value is None:
        if type(None) in options:
            return None
        raise ConfigError(f"{name}: must not be null")
    for option in options:
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if option is str and isinstance(value, str):
            return value
    expected = " or ".join(getattr(o, "__name__", str(o)) for o in options)
    raise ConfigError(f"{name}: must be {expected}, got {type(value).__name__} {value!r}")


def _union_type() -> Any:
    import types

    return types.UnionType
