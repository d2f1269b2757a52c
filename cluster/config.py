"""Cluster configuration: one YAML file -> one frozen, validated ``ClusterConfig`` (pydantic models).

``ClusterConfig`` holds each component's own config model as is: ``engine`` is ``engine.config.EngineConfig``,
``router`` is ``router.config.RouterConfig``, ``kv_transfer`` is one of ``kv_transfer.config``'s backend
models (picked by ``backend``), ``autoscaling`` holds the pool policies' configs of ``cluster.autoscaling``.
Only what is the cluster's own is declared here: the mode, the pools, the gRPC server, a few timeouts.
Every model refuses unknown fields and mistyped values; ``load_config`` / ``config_from_dict`` turn
pydantic's errors into a ``ConfigError`` that starts with the dotted path, e.g.
``decode.num_replcas: unknown field``, so a typo never silently falls back to a default.

Example (every field optional; the engine's defaults shown)::

    engine: {model: smollm2-135m-instruct, dtype: bfloat16, block_size: 16, kv_cache_bytes: 402653184}
    mode: disaggregated              # or colocated
    kv_transfer: {backend: shm, timeout_s: 5.0}
    router: {policy: prefix_hash}    # router.block_size is engine.block_size
    prefill: {num_replicas: 1, num_cpus: 0.5}
    decode: {num_replicas: 1, num_cpus: 0.5, device: cpu}
    autoscaling: {decode: {target_kv_blocks_used_fraction: 0.7}}
    grpc: {host: 127.0.0.1, port: 50051}
    http: {enabled: true, host: 127.0.0.1, port: 8000}   # the OpenAI-compatible API

Derived values (the router's block size, a pool's device and dtype when left out) are filled in by the
validators and stay out of ``model_fields_set``, so ``override`` derives them again from the new values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, Field, ValidationError, model_validator

from cluster.admission import AdmissionConfig
from cluster.attribution import AttributionConfig
from cluster.auth import AuthConfig
from cluster.autoscaling import DecodePolicyConfig, PrefillPolicyConfig
from cluster.config_errors import ConfigError, describe_validation_error
from cluster.metrics import MetricsConfig
from cluster.migration import MigrationConfig
from cluster.rate_limit import RateLimitConfig
from cluster.tls import TlsConfig
from cluster.tracing import TracingConfig
from engine.builtin import BUILTIN_MODEL_ID, SMOLLM2_MODEL_ID, resolve_model_path
from engine.config import STRICT_FROZEN, Device, DType, EngineConfig, Positive
from engine.gguf import find_gguf_file
from kv_transfer.config import ShmConfig, TorchDistConfig, TransportConfig
from router.config import RouterConfig

Mode = Literal["disaggregated", "colocated"]
"""The cluster modes: the one list of their names (colocated: each decode replica prefills its own)."""
MODES: tuple[str, ...] = get_args(Mode)
PoolName = Literal["prefill", "decode", "ingress"]

PositiveInt = Annotated[int, Field(ge=1)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]

__all__ = [
    "MODES",
    "ClusterConfig",
    "ConfigError",
    "GrpcConfig",
    "HttpConfig",
    "PoolConfig",
    "config_from_dict",
    "load_config",
]


DEFAULT_MODEL_ID = SMOLLM2_MODEL_ID
"""What ``pdserve serve`` serves with no ``--model``: a real instruct model (``engine.builtin``)."""
DEFAULT_DTYPE = "bfloat16"  # faster than float32 on this CPU (AVX512-BF16); docs/benchmarks.md
DEFAULT_KV_CACHE_BYTES = 384 * 2**20  # per replica: 32 streams of 512 SmolLM2 tokens in bfloat16 (+6 %)
# Set in every replica process (Ray runtime_env). glibc's per-thread malloc arenas fragment: a prefill
# replica's RSS crept ~4 MiB/min in a 30-min soak with the default, flat with 2 (docs/benchmarks.md, "Soak")
DEFAULT_REPLICA_ENV_VARS = {"MALLOC_ARENA_MAX": "2"}
EnvVarName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]


class ClusterEngineConfig(EngineConfig):
    """The ``engine:`` section: ``engine.config.EngineConfig`` with the defaults a user of the cluster
    meets (SmolLM2-135M-Instruct in bfloat16, a KV pool sized for it). ``EngineConfig()`` itself keeps the
    random built-in model, which the engine's unit tests run. ``engine_for`` hands replicas a plain
    ``EngineConfig`` with every field written out."""

    model: str = Field(DEFAULT_MODEL_ID, min_length=1)
    dtype: DType = DEFAULT_DTYPE
    kv_cache_bytes: Positive = DEFAULT_KV_CACHE_BYTES


class _Section(BaseModel):
    model_config = STRICT_FROZEN


def _derive(model: BaseModel, **values: Any) -> None:
    """Fill derived fields of ``model`` while it is being validated (frozen models have no setter); the
    values stay out of ``model_fields_set``, so a rebuild from the set fields derives them again."""
    model.__dict__.update(values)


class PoolConfig(_Section):
    """One Serve deployment's replicas and resources (``prefill``, ``decode``, ``ingress``)."""

    num_replicas: PositiveInt = 1  # fixed replica count (ignored when autoscaling is on)
    min_replicas: PositiveInt | None = None  # set both bounds to autoscale with cluster.autoscaling policies
    max_replicas: PositiveInt | None = None
    num_cpus: NonNegativeFloat = 0.5  # fractional on CPU so 1 prefill + 1 decode fit a 2-core machine
    num_gpus: NonNegativeFloat = 0.0
    max_ongoing_requests: PositiveInt = 256  # streams are long-lived: Serve's default of 5 queues them
    # torch intra-op threads inside each replica; None: the replica's whole CPUs, at least 1 (Ray's
    # OMP_NUM_THREADS rule). More threads than CPUs wait at every op's barrier on a shared machine: 2 threads
    # at load 10 on 2 cores decoded 0.4-1.1 tok/s at batch 1, 1 thread 13 (docs/benchmarks.md, "Peers")
    torch_threads: PositiveInt | None = None

    @property
    def num_torch_threads(self) -> int:
        """``torch_threads``, or the replica's whole CPUs (at least 1) when unset."""
        return self.torch_threads if self.torch_threads is not None else max(1, int(self.num_cpus))
    device: Device | None = None  # where the model and KV pool live; None: cuda when num_gpus > 0, else cpu
    dtype: DType | None = None  # serving and KV dtype; None: engine.dtype
    # Ray custom resources each replica needs, e.g. {prefill_node: 1} to place the pool on nodes that
    # were started with `ray start --resources '{"prefill_node": 4}'`
    resources: dict[str, NonNegativeFloat] = Field(default_factory=dict)
    # the environment of each replica process (Ray runtime_env env_vars, so KubeRay too); {}: none
    env_vars: dict[EnvVarName, str] = Field(default_factory=lambda: dict(DEFAULT_REPLICA_ENV_VARS))

    @model_validator(mode="after")
    def _check_and_derive(self) -> PoolConfig:
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise ValueError("min_replicas/max_replicas: set both to autoscale, or neither")
        low, high = self.min_replicas, self.max_replicas
        if low is not None and high is not None and high < low:
            raise ValueError(f"max_replicas: must be >= min_replicas ({low}), got {high}")
        if self.device == "cuda" and self.num_gpus == 0:
            raise ValueError("device: cuda needs num_gpus > 0 (Ray gives the replica no GPU otherwise)")
        if self.device is None:
            _derive(self, device="cuda" if self.num_gpus > 0 else "cpu")
        return self

    @property
    def is_autoscaling(self) -> bool:
        return self.min_replicas is not None


class IngressConfig(PoolConfig):
    """The ingress pool: light replicas that each hold many open streams."""

    num_cpus: NonNegativeFloat = 0.1
    max_ongoing_requests: PositiveInt = 4096


class GrpcConfig(_Section):
    """Where the public gRPC API listens (served by each ingress replica itself, not Serve's proxy)."""

    host: str = Field("127.0.0.1", min_length=1)  # embedded default: loopback only; "0.0.0.0": every host
    port: Annotated[int, Field(ge=0, le=65535)] = 50051  # 0: any free port


class HttpConfig(_Section):
    """Where the OpenAI-compatible HTTP API listens (each ingress replica serves it beside gRPC)."""

    enabled: bool = True
    host: str = Field("127.0.0.1", min_length=1)  # embedded default: loopback only
    port: Annotated[int, Field(ge=0, le=65535)] = 8000  # 0: any free port
    max_body_bytes: PositiveInt = 8 * 2**20  # a larger request body is refused with 413


class AutoscalingConfig(_Section):
    """The pool policies' knobs (Serve's ``policy_kwargs``); used by pools that set min/max_replicas."""

    prefill: PrefillPolicyConfig = Field(default_factory=PrefillPolicyConfig)
    decode: DecodePolicyConfig = Field(default_factory=DecodePolicyConfig)


class ClusterConfig(_Section):
    """The whole cluster: engine, mode, transport, router, the three pools, autoscaling, the API."""

    engine: ClusterEngineConfig = Field(default_factory=ClusterEngineConfig)
    mode: Mode = "disaggregated"
    lease_s: PositiveFloat = 30.0  # pinned prefill KV is released after this even if no release arrives
    request_timeout_s: PositiveFloat = 600.0  # a stream is ended (DEADLINE_EXCEEDED) after this
    app_name: str = Field("pdserve", min_length=1)
    coalesce_every_streams: PositiveInt = 8  # decode messages carry one more token per this many streams
    coalesce_max_wait_ms: NonNegativeFloat = 100.0  # ...but a message never waits longer than this
    kv_transfer: TransportConfig = Field(default_factory=ShmConfig)
    router: RouterConfig = Field(default_factory=RouterConfig)
    prefill: PoolConfig = Field(default_factory=PoolConfig)
    decode: PoolConfig = Field(default_factory=PoolConfig)
    ingress: IngressConfig = Field(default_factory=IngressConfig)
    autoscaling: AutoscalingConfig = Field(default_factory=AutoscalingConfig)
    grpc: GrpcConfig = Field(default_factory=GrpcConfig)
    http: HttpConfig = Field(default_factory=HttpConfig)
    migration: MigrationConfig = Field(default_factory=MigrationConfig)  # cluster.migration
    admission: AdmissionConfig = Field(default_factory=AdmissionConfig)  # cluster.admission: KV budget
    tracing: TracingConfig = Field(default_factory=TracingConfig)  # OpenTelemetry; off by default
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)  # Prometheus request series; on
    attribution: AttributionConfig = Field(default_factory=AttributionConfig)  # hit-rate warning
    auth: AuthConfig = Field(default_factory=AuthConfig)  # API keys -> tenants (cluster/auth.py); off: none
    rate_limits: RateLimitConfig = Field(default_factory=RateLimitConfig)  # per-tenant tokens/minute
    tls: TlsConfig = Field(default_factory=TlsConfig)  # cert + key: gRPC and HTTP over TLS (cluster/tls.py)

    @model_validator(mode="after")
    def _check_and_derive(self) -> ClusterConfig:
        _check_model(self.engine.model)
        if self.engine.device != "cpu" or self.engine.num_threads is not None:
            raise ValueError("engine.device/num_threads: set them per pool (device, torch_threads)")
        if "block_size" in self.router.model_fields_set and self.router.block_size != self.engine.block_size:
            raise ValueError(
                f"router.block_size: must equal engine.block_size ({self.engine.block_size}); leave it out"
            )
        _derive(self, router=_copy(self.router, block_size=self.engine.block_size))
        for name in ("prefill", "decode"):
            pool = getattr(self, name)
            if pool.dtype is None:
                _derive(self, **{name: _copy(pool, dtype=self.engine.dtype)})
        if not self.is_colocated:
            self._check_transport()
        return self

    def _check_transport(self) -> None:
        """The KV blocks move as they are, between the two pools' devices and nodes."""
        prefill, decode, transport = self.prefill, self.decode, self.kv_transfer
        if prefill.dtype != decode.dtype:
            raise ValueError(
                f"decode.dtype: must equal prefill.dtype ({prefill.dtype}) in disaggregated mode "
                f"(KV blocks move as they are), got {decode.dtype}"
            )
        for name, pool in (("prefill", prefill), ("decode", decode)):
            if pool.device == "cuda" and not transport.supports_gpu_memory:
                raise ValueError(
                    f"kv_transfer.backend: {transport.backend} cannot serve GPU memory and {name}.device is "
                    "cuda; use nixl or torch_dist"
                )
        if prefill.resources != decode.resources:  # custom resources place the pools on different nodes
            if not transport.is_cross_node:
                raise ValueError(
                    f"kv_transfer.backend: {transport.backend} cannot cross nodes and prefill.resources / "
                    "decode.resources place the pools apart; use nixl or torch_dist"
                )
            if isinstance(transport, TorchDistConfig) and transport.host in ("127.0.0.1", "localhost"):
                raise ValueError(
                    f"kv_transfer.host: {transport.host} is not reachable from another node, and "
                    "prefill.resources / decode.resources place the pools apart; use auto"
                )

    @property
    def is_colocated(self) -> bool:
        return self.mode == "colocated"

    @property
    def worker_pools(self) -> tuple[Literal["prefill", "decode"], ...]:
        """The pools that run an engine: decode alone when colocated."""
        return ("decode",) if self.is_colocated else ("prefill", "decode")

    def pool(self, name: PoolName) -> PoolConfig:
        return getattr(self, name)

    def engine_for(self, pool: Literal["prefill", "decode"]) -> EngineConfig:
        """The engine config of one pool's replicas: the pool's device, dtype and torch threads applied."""
        section = self.pool(pool)
        changes = {"device": section.device, "dtype": section.dtype, "num_threads": section.num_torch_threads}
        return EngineConfig.model_validate({**self.engine.model_dump(), **changes})

    def check_devices(self, pools: tuple[PoolName, ...] | None = None) -> None:
        """Refuse, naming the field, a pool that asks for cuda where torch sees no GPU. Called where the
        cluster starts and in each replica, never while parsing: a GPU cluster's YAML parses on a laptop."""
        import torch

        for name in pools if pools is not None else self.worker_pools:
            if self.pool(name).device == "cuda" and not torch.cuda.is_available():
                raise ConfigError(f"{name}.device: cuda requested but torch sees no GPU")

    def override(self, changes: dict[str, Any]) -> ClusterConfig:
        """A validated copy with dotted-key ``changes``, e.g. ``{"engine.model": "/x", "grpc.port": 0}``.

        Built again from the fields that were set plus the changes, so derived values follow them."""
        data = self.model_dump(exclude_unset=True)
        for dotted, value in changes.items():
            *sections, leaf = dotted.split(".")
            node = data
            for key in sections:
                node = node.setdefault(key, {})
                if not isinstance(node, dict):
                    raise ConfigError(f"{dotted}: {key} is not a section")
            node[leaf] = value.model_dump(exclude_unset=True) if isinstance(value, BaseModel) else value
        return config_from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict of every field; ``config_from_dict(c.to_dict()) == c``."""
        return self.model_dump()


def _copy(model: Any, **values: Any) -> Any:
    """A copy of ``model`` with derived ``values`` (kept out of its ``model_fields_set``)."""
    copy = model.model_copy()
    _derive(copy, **values)
    return copy


def _check_model(model: str) -> None:
    """The built-in id, a known model id (``engine.builtin``), a ``.gguf`` file, or a directory: a
    Hugging Face checkpoint or one holding exactly one GGUF file. Weights are read by the replicas."""
    if model == BUILTIN_MODEL_ID:
        return
    try:
        path = resolve_model_path(model)
        if Path(path).is_dir():
            find_gguf_file(path)  # a directory with several .gguf files is ambiguous
    except (FileNotFoundError, ValueError) as error:
        raise ValueError(f"engine.model: {error}") from None
    if Path(path).is_file() and find_gguf_file(path) is None:
        raise ValueError(f"engine.model: {model!r} is a file but not a GGUF file (*.gguf)")
    if not Path(path).exists():
        raise ValueError(
            f"engine.model: {model!r} is not the built-in model id ({BUILTIN_MODEL_ID}), a known model id "
            f"({SMOLLM2_MODEL_ID}) nor an existing checkpoint directory or GGUF file"
        )


def config_from_dict(data: dict[str, Any] | None) -> ClusterConfig:
    """Build a ``ClusterConfig`` from parsed YAML, refusing unknown fields and wrong types by dotted path."""
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"config: the top level must be a mapping, got {type(data).__name__}")
    try:
        return ClusterConfig.model_validate(data or {})
    except ValidationError as error:
        raise ConfigError(describe_validation_error(error)) from None


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
