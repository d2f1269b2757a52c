"""Typed configuration of the KV transports: one frozen pydantic model per backend, picked by ``backend``.

``ShmConfig()`` is all a same-host cluster needs; every field has a working default. Each backend's model
carries the fields every transport has (``timeout_s``, ``test_pull_delay_s``, from ``TransportSettings``)
and its own; ``TransportConfig`` is their union, discriminated on ``backend`` (``"shm"`` when absent), and
is what the cluster YAML's ``kv_transfer:`` section holds and what ``make_transport`` takes::

    kv_transfer: {backend: nixl, timeout_s: 5, enable_progress_thread: true}
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, TypeAdapter, model_validator

BackendName = Literal["shm", "nixl", "torch_dist"]
"""The transport backends: the one list of their names."""
BACKENDS: tuple[str, ...] = BackendName.__args__

PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]


class TransportSettings(BaseModel):
    """What every backend's config has; the ``is_*`` class flags say where a backend can be used."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    is_cross_node: ClassVar[bool] = True
    """The backend can reach a peer on another host."""
    supports_gpu_memory: ClassVar[bool] = True
    """The backend can serve and fill a KV pool in GPU memory."""

    timeout_s: PositiveFloat = 10.0
    """A transfer not DONE this many seconds after read_blocks ends FAILED (timed out); decode then
    recomputes the prompt."""
    test_pull_delay_s: Annotated[float, Field(ge=0)] = 0.0
    """TEST HOOK, 0 in production: the decode worker waits this long after reserving its blocks and
    before starting the pull, so a fault test can kill the prefill replica while a transfer is under way
    (tests/integration/test_int_faults.py). Not counted in timeout_s."""


class ShmConfig(TransportSettings):
    """Same-host shared memory: the prefill pool lives in a file under ``shm_dir`` that peers map."""

    is_cross_node: ClassVar[bool] = False
    supports_gpu_memory: ClassVar[bool] = False

    backend: Literal["shm"] = "shm"
    shm_dir: str = Field("/dev/shm", min_length=1)
    """tmpfs directory holding the pool segments."""
    segment_prefix: str = Field("pdserve-kv-", min_length=1, pattern=r"^[^/]+$")
    """File-name prefix of every segment this backend creates (and of the orphans it reaps); no '/'."""
    copy_chunk_bytes: PositiveInt = 8 << 20
    """A copy is split into chunks of this many bytes; a timeout or close() stops it between chunks."""
    reap_orphans: bool = True
    """On allocate_pool, delete segments under the prefix whose owner process is gone (SIGKILLed)."""


class NixlConfig(TransportSettings):
    """NIXL agent settings (the decode side posts one-sided READs; the prefill side runs no code)."""

    backend: Literal["nixl"] = "nixl"
    ucx_backend: str = Field("UCX", min_length=1)
    """NIXL backend plugin name (UCX picks shared memory / CMA / TCP / RDMA / CUDA IPC itself)."""
    num_threads: Annotated[int, Field(ge=0)] = 0
    """UCX worker threads (0 = NIXL's default)."""
    net_devices: str | None = Field(None, min_length=1)
    """The network devices UCX may use, as UCX_NET_DEVICES spells them (``"mlx5_0:1"``, ``"eth0"``,
    ``"lo"``; a comma-separated list). None: UCX picks (or an exported UCX_NET_DEVICES applies). Written
    to UCX_NET_DEVICES by the transport before it creates its agent. Shared memory and CMA between the
    processes of one host are not network devices and stay available."""
    enable_progress_thread: bool = True
    """NIXL progress thread. Required on a worker that serves reads (prefill); it busy-polls (~1/3 core
    idle), so a read-only decode worker may turn it off (its own polling drives its reads)."""
    poll_interval_s: PositiveFloat = 0.0002
    """Upper bound of the back-off between check_xfer_state polls while waiting."""
    hugepages: bool = True
    """madvise(MADV_HUGEPAGE) on pools from allocate_pool (fewer TLB misses and faster registration)."""


class TorchDistConfig(TransportSettings):
    """torch.distributed point-to-point: one 2-rank process group per (prefill, decode) pair.

    The process group runs gloo for a pool in host memory and NCCL for one on a GPU (the pool's device,
    which the cluster sets per pool)."""

    backend: Literal["torch_dist"] = "torch_dist"
    host: str = Field("127.0.0.1", min_length=1)
    """Address the prefill side listens on for read requests (and publishes in its endpoint). ``"auto"``:
    this node's IP address as Ray sees it (the cluster resolves it in each replica), so a decode replica
    on another node can connect."""
    port_min: Annotated[int, Field(ge=0, le=65535)] = 0
    """Lowest control port to try; 0 together with port_max 0 lets the OS pick a free one."""
    port_max: Annotated[int, Field(ge=0, le=65535)] = 0
    """Highest control port to try (inclusive); >= port_min."""
    connect_timeout_s: PositiveFloat = 10.0
    """Timeout of the control connection and of the per-pair process group rendezvous."""

    @model_validator(mode="after")
    def _check_ports(self) -> TorchDistConfig:
        if self.port_max < self.port_min:
            raise ValueError(f"port_max: must be >= port_min ({self.port_min}), got {self.port_max}")
        return self


def _backend_of(value: Any) -> str:
    if isinstance(value, dict):
        return value.get("backend", "shm")
    return getattr(value, "backend", "shm")


TransportConfig = Annotated[
    Annotated[ShmConfig, Tag("shm")]
    | Annotated[NixlConfig, Tag("nixl")]
    | Annotated[TorchDistConfig, Tag("torch_dist")],
    Discriminator(_backend_of),
]
"""One backend's config, chosen by its ``backend`` field."""

_ADAPTER: TypeAdapter[Any] = TypeAdapter(TransportConfig)


def transport_config(data: dict[str, Any] | None = None) -> ShmConfig | NixlConfig | TorchDistConfig:
    """The backend config ``data["backend"]`` names (``"shm"`` when absent), validated."""
    return _ADAPTER.validate_python(data or {})
