"""Engine configuration: frozen pydantic models, validated on construction (unknown fields refused).

``EngineConfig`` is the one object a worker builds; it is also the ``engine:`` section of the cluster
YAML, held as is by ``cluster.config.ClusterConfig``. ``scheduler_config`` is its derived view for the
scheduler; ``max_context_len`` is the one place the longest sequence is worked out.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from engine.builtin import BUILTIN_MODEL_ID
from engine.kv_memory import DTYPES, KVShape

DType = Literal[DTYPES]  # type: ignore[valid-type]  # the names live in engine.kv_memory.DTYPES
Device = Literal["cpu", "cuda"]
AttentionBackend = Literal["auto", "torch", "flash_attn", "triton"]  # flash_attn, triton: CUDA only
Positive = Annotated[int, Field(gt=0)]

STRICT_FROZEN = ConfigDict(extra="forbid", frozen=True, strict=True)
"""Every config model's settings: unknown fields refused, no mutation, no coercion ("2" is not an int)."""


class SchedulerConfig(BaseModel):
    """Continuous batching with chunked prefill."""

    model_config = STRICT_FROZEN

    max_num_batched_tokens: Positive = 2048  # per-step token budget (prefill chunks + decode tokens)
    max_num_seqs: Positive = 64  # sequences running at once
    max_model_len: Positive = 4096  # context length: prompt + generated tokens


class EngineConfig(BaseModel):
    """Everything ``LLMEngine`` needs.

    ``model`` is ``"pdserve-builtin-tiny"`` (the built-in model, no files needed) or a local Hugging
    Face checkpoint directory (config.json + *.safetensors + tokenizer files). Nothing is downloaded.
    """

    model_config = STRICT_FROZEN

    model: str = Field(BUILTIN_MODEL_ID, min_length=1)
    dtype: DType = "float32"
    block_size: Positive = 16  # tokens per KV block
    kv_cache_bytes: Positive = 64 * 1024 * 1024  # byte budget of the whole pool (all layers, K and V)
    max_num_batched_tokens: Positive = 2048
    max_num_seqs: Positive = 64
    max_model_len: Positive | None = None  # None: the model's context (capped by the KV pool)
    enable_prefix_caching: bool = True  # reuse full blocks by chain hash across requests
    attention_backend: AttentionBackend = "auto"
    device: Device = "cpu"
    num_threads: Positive | None = None  # torch intra-op threads; None leaves torch's default
    # contiguous decode KV copy (see decode_mirror.py); 0 = off
    decode_mirror_bytes: Annotated[int, Field(ge=0)] = 256 * 1024 * 1024
    # CUDA only: decode steps of up to this many sequences replay CUDA graphs captured at start for
    # padded batch sizes 1, 2, 4, 8, 16, 24, ... (engine/cuda_graphs.py); 0 = off. Ignored on CPU.
    cuda_graph_max_batch_size: Annotated[int, Field(ge=0)] = 128
    # Cache attribution and tenant KV shares (engine/block_pool.py, docs/observability.md): the eviction
    # log's cap in entries (~233 bytes each; 0 = no log); every tenant's guaranteed fraction of the KV
    # blocks in eviction (0 = plain LRU), and per-tenant fractions that replace it (their sum <= 1).
    eviction_log_entries: Annotated[int, Field(ge=0)] = 65_536
    tenant_kv_share: Annotated[float, Field(ge=0, le=1)] = 0.0
    tenant_kv_shares: dict[str, Annotated[float, Field(ge=0, le=1)]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check_tenant_kv_shares(self) -> EngineConfig:
        total = sum(self.tenant_kv_shares.values())
        if total > 1:
            raise ValueError(f"tenant_kv_shares: the fractions must sum to at most 1, got {total:g}")
        return self

    def kv_shape(self, num_layers: int, num_kv_heads: int, head_dim: int) -> KVShape:
        """The per-token KV geometry of a model with these dimensions in this config's dtype."""
        return KVShape(num_layers, num_kv_heads, head_dim, self.dtype)

    def max_context_len(self, model_context_len: int, kv: KVShape) -> int:
        """The longest sequence one worker can hold: the model's context, capped by the KV pool (whole
        blocks of ``kv_cache_bytes``) and by ``max_model_len``. Both the engine and the ingress use this."""
        pool_tokens = kv.num_blocks(self.kv_cache_bytes, self.block_size) * self.block_size
        context = min(model_context_len, pool_tokens)
        return context if self.max_model_len is None else min(context, self.max_model_len)

    def scheduler_config(self, max_context_len: int) -> SchedulerConfig:
        """The scheduler's view, for sequences of up to ``max_context_len`` tokens (``max_context_len``)."""
        return SchedulerConfig(
            max_num_batched_tokens=self.max_num_batched_tokens,
            max_num_seqs=self.max_num_seqs,
            max_model_len=max_context_len,
        )
