"""Typed configuration of the KV transports: one frozen dataclass per backend, one that picks.

``TransportConfig(backend="shm")`` is all a same-host cluster needs; every field has a working default.
The cluster builds one of these from its own config and hands it to ``make_transport``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

BACKENDS = ("shm", "nixl", "torch_dist")
BackendName = Literal["shm", "nixl", "torch_dist"]


def _check_positive(owner: str, name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{owner}.{name} must be positive, got {value!r}")


@dataclass(frozen=True)
class ShmConfig:
    """Same-host shared memory: the prefill pool lives in a file under ``shm_dir`` that peers map."""

    shm_dir: str = "/dev/shm"
    """tmpfs directory holding the pool segments."""
    segment_prefix: str = "pdserve-kv-"
    """File-name prefix of every segment this backend creates (and of the orphans it reaps)."""
    copy_chunk_bytes: int = 8 << 20
    """A copy is split into chunks of this many bytes; a timeout or close() stops it between chunks."""
    reap_orphans: bool = True
    """On allocate_pool, delete segments under the prefix whose owner process is gone (SIGKILLed)."""

    def __post_init__(self) -> None:
        if not self.shm_dir:
            raise ValueError("ShmConfig.shm_dir must be a directory path")
        if not self.segment_prefix or "/" in self.segment_prefix:
            raise ValueError(
                f"ShmConfig.segment_prefix must be a non-empty file name prefix, got {self.segment_prefix!r}"
            )
        _check_positive("ShmConfig", "copy_chunk_bytes", self.copy_chunk_bytes)


@dataclass(frozen=True)
class NixlConfig:
    """NIXL agent settings (the decode side posts one-sided READs; the prefill side runs no code)."""

    ucx_backend: str = "UCX"
    """NIXL backend plugin name (UCX picks shared memory / CMA / TCP / RDMA / CUDA IPC itself)."""
    num_threads: int = 0
    """UCX worker threads (0 = NIXL's default)."""
    enable_progress_thread: bool = True
    """NIXL progress thread. Required on a worker that serves reads (prefill); it busy-polls (~1/3 core
    idle), so a read-only decode worker may turn it off (its own polling drives its reads)."""
    poll_interval_s: float = 0.0002
    """Upper bound of the back-off between check_xfer_state polls while waiting."""
    hugepages: bool = True
    """madvise(MADV_HUGEPAGE) on pools from allocate_pool (fewer TLB misses and faster registration)."""

    def __post_init__(self) -> None:
        if not self.ucx_backend:
            raise ValueError("NixlConfig.ucx_backend must name a NIXL backend plugin, e.g. 'UCX'")
        if self.num_threads < 0:
            raise ValueError(f"NixlConfig.num_threads must be >= 0, got {self.num_threads}")
        _check_positive("NixlConfig", "poll_interval_s", self.poll_interval_s)


@dataclass(frozen=True)
class TorchDistConfig:
    """torch.distributed point-to-point: one 2-rank process group per (prefill, decode) pair."""

    host: str = "127.0.0.1"
    """Address the prefill side listens on for read requests (and publishes in its endpoint)."""
    port_min: int = 0
    """Lowest control port to try; 0 together with port_max 0 lets the OS pick a free one."""
    port_max: int = 0
    """Highest control port to try (inclusive)."""
    device: Literal["cpu", "cuda"] = "cpu"
    """Where the pool lives: cpu uses gloo, cuda uses NCCL."""
    connect_timeout_s: float = 10.0
    """Timeout of the control connection and of the per-pair process group rendezvous."""

    def __post_init__(self) -> None:
        if not self.host:
            raise ValueError("TorchDistConfig.host must be an address")
        if not 0 <= self.port_min <= self.port_max <= 65535:
            raise ValueError(
                f"TorchDistConfig.port_min/port_max must satisfy 0 <= min <= max <= 65535, "
                f"got {self.port_min}..{self.port_max}"
            )
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"TorchDistConfig.device must be 'cpu' or 'cuda', got {self.device!r}")
        _check_positive("TorchDistConfig", "connect_timeout_s", self.connect_timeout_s)

    @property
    def process_group_backend(self) -> str:
        return "nccl" if self.device == "cuda" else "gloo"


@dataclass(frozen=True)
class TransportConfig:
    """Which transport the cluster uses, the per-transfer timeout, and each backend's own settings."""

    backend: BackendName = "shm"
    """"shm" (same host), "nixl" (UCX; same host or across hosts) or "torch_dist" (gloo / NCCL)."""
    timeout_s: float = 10.0
    """A transfer not DONE this many seconds after read_blocks ends FAILED (timed out)."""
    shm: ShmConfig = field(default_factory=ShmConfig)
    nixl: NixlConfig = field(default_factory=NixlConfig)
    torch_dist: TorchDistConfig = field(default_factory=TorchDistConfig)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"TransportConfig.backend must be one of {BACKENDS}, got {self.backend!r}")
        _check_positive("TransportConfig", "timeout_s", self.timeout_s)
