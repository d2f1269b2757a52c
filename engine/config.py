"""Engine configuration: frozen dataclasses, validated on construction.

``EngineConfig`` is the one object a worker builds; ``cache_config`` and ``scheduler_config`` are its
derived views for the block pool and the scheduler.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.builtin import BUILTIN_MODEL_ID

SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_BACKENDS = ("auto", "torch", "flash_attn")


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV cache."""

    block_size: int = 16  # tokens per block
    kv_cache_bytes: int = 256 * 1024 * 1024  # byte budget of the whole pool (all layers, K and V)
    enable_prefix_caching: bool = True  # reuse full blocks by chain hash across requests

    def __post_init__(self) -> None:
        if self.block_size <= 0:
            raise ValueError(f"block_size must be > 0, got {self.block_size}")
        if self.kv_cache_bytes <= 0:
            raise ValueError(f"kv_cache_bytes must be > 0, got {self.kv_cache_bytes}")


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching with chunked prefill."""

    max_num_batched_tokens: int = 2048  # per-step token budget (prefill chunks + decode tokens)
    max_num_seqs: int = 64  # sequences running at once
    max_model_len: int = 4096  # context length: prompt + generated tokens

    def __post_init__(self) -> None:
        for name in ("max_num_batched_tokens", "max_num_seqs", "max_model_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class EngineConfig:
    """Everything ``LLMEngine`` needs.

    ``model`` is ``"pdserve-builtin-tiny"`` (the built-in model, no files needed) or a local Hugging
    Face checkpoint directory (config.json + *.safetensors + tokenizer files). Nothing is downloaded.
    """

    model: str = BUILTIN_MODEL_ID
    dtype: str = "float32"  # "float32" | "bfloat16" | "float16"
    block_size: int = 16
    kv_cache_bytes: int = 256 * 1024 * 1024
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 64
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    enable_prefix_caching: bool = True
    attention_backend: str = "auto"  # "auto" | "torch" | "flash_attn" (CUDA only)
    device: str = "cpu"
    num_threads: int | None = None  # torch intra-op threads; None leaves torch's default
    decode_mirror_bytes: int = 256 * 1024 * 1024  # contiguous decode KV copy (see decode_mirror.py); 0 = off

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("model must be a checkpoint directory or the built-in model id, got ''")
        if self.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"dtype must be one of {SUPPORTED_DTYPES}, got {self.dtype!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"attention_backend must be one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}"
            )
        if self.max_model_len is not None and self.max_model_len <= 0:
            raise ValueError(f"max_model_len must be > 0, got {self.max_model_len}")
        if self.decode_mirror_bytes < 0:
            raise ValueError(f"decode_mirror_bytes must be >= 0, got {self.decode_mirror_bytes}")
        if self.num_threads is not None and self.num_threads <= 0:
            raise ValueError(f"num_threads must be > 0, got {self.num_threads}")
        self.cache_config  # noqa: B018 -- validates block_size / kv_cache_bytes
        SchedulerConfig(self.max_num_batched_tokens, self.max_num_seqs, 1)

    @property
    def cache_config(self) -> CacheConfig:
        return CacheConfig(self.block_size, self.kv_cache_bytes, self.enable_prefix_caching)

    def scheduler_config(self, model_max_len: int) -> SchedulerConfig:
        """The scheduler's view; the context length is capped by the model's own."""
        max_len = model_max_len if self.max_model_len is None else min(self.max_model_len, model_max_len)
        return SchedulerConfig(self.max_num_batched_tokens, self.max_num_seqs, max_len)
