"""The Llama-family decoder (Llama 2/3, Mistral, Qwen2, Qwen3) written against the paged KV cache.

Parameter names match ``transformers``' ``*ForCausalLM`` so checkpoints load by name. The forward
takes flattened tokens of the whole step (``[T]``), their positions, the pool and one
``AttentionMetadata``; it never sees requests or blocks beyond that.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.attention import AttentionMetadata, TorchAttention
from engine.cpu_linear import KERNEL_MAX_ROWS
from engine.model_config import ModelConfig
from engine.rope import RotaryEmbedding, apply_rotary


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 and scaled in the input dtype, exactly as ``transformers``."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input_dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(input_dtype)


class Attention(nn.Module):
    """Self-attention block: projections, optional q/k norm, RoPE, paged attention, output projection."""

    def __init__(self, config: ModelConfig, backend: TorchAttention, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = (
            config.num_heads,
            config.num_kv_heads,
            config.head_dim,
        )
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.o_proj_bias)
        if config.has_qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.has_qk_norm = config.has_qk_norm
        self.backend = backend

    def forward(
        self,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        layer_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        query = self.q_proj(hidden).view(num_tokens, self.num_heads, self.head_dim)
        key = self.k_proj(hidden).view(num_tokens, self.num_kv_heads, self.head_dim)
        value = self.v_proj(hidden).view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.has_qk_norm:
            query, key = self.q_norm(query), self.k_norm(key)
        query, key = apply_rotary(query, cos, sin), apply_rotary(key, cos, sin)
        out = self.backend.forward(self.layer, layer_cache, query, key, value, meta)  # [T, heads, head_dim]
        return self.o_proj(out.reshape(num_tokens, self.num_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm residual block: attention then MLP."""

    def __init__(self, config: ModelConfig, backend: TorchAttention, layer: int) -> None:
        super().__init__()
        self.self_attn = Attention(config, backend, layer)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden, cos, sin, layer_cache, meta):
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), cos, sin, layer_cache, meta)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class _Body(nn.Module):
    """``model.*`` in HF naming: embeddings, layers, final norm."""

    def __init__(self, config: ModelConfig, backend: TorchAttention) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, backend, layer) for layer in range(config.num_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class CausalLM(nn.Module):
    """Llama-family causal LM over a block-contiguous paged KV pool."""

    def __init__(
        self, config: ModelConfig, hf_config: Any, backend: TorchAttention, max_positions: int
    ) -> None:
        super().__init__()
        self.config = config
        self.hf_config = hf_config
        self.max_positions = max_positions
        self.model = _Body(config, backend)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary: RotaryEmbedding | None = None  # built by ``init_rotary`` once weights sit on a device
        # The bf16 CPU kernel module when ``engine.cpu_linear.pack_for_kernels`` packed the projections
        # (q|k|v -> ``self_attn.qkv_proj``, gate|up -> ``mlp.gate_up_proj``); None runs the torch path.
        self.kernels: Any = None
        self.decode_weights: list[torch.Tensor] | None = None  # for ``kernels.decode_layers`` (cpu_linear.py)

    def init_rotary(self) -> None:
        """Build the RoPE table on the weights' device and dtype (after loading)."""
        weight = self.model.embed_tokens.weight
        self.rotary = RotaryEmbedding(self.hf_config, self.max_positions, weight.dtype, weight.device)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """input_ids, positions ``[T]``; kv_cache ``[num_blocks, layers, 2, block_size, kv_heads, head_dim]``.

        Returns the final hidden states ``[T, hidden]`` (after the last norm).
        """
        assert self.rotary is not None, "init_rotary() must run after loading weights"
        if self.kernels is not None:
            return self._forward_kernels(input_ids, positions, kv_cache, meta)
        cos, sin = self.rotary.lookup(positions)
        hidden = self.model.embed_tokens(input_ids)
        for index, layer in enumerate(self.model.layers):
            hidden = layer(hidden, cos, sin, kv_cache[:, index], meta)
        return self.model.norm(hidden)

    def _forward_kernels(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """The same forward with packed projections and fused kernels (bf16 on CPU): per layer one
        q|k|v GEMM, RoPE + KV store, attention, o GEMM, residual add + norm, gate|up GEMM, SiLU * up,
        down GEMM, residual add + the next norm. The residual stream is updated in place."""
        assert self.rotary is not None
        kernels, layers, eps = self.kernels, self.model.layers, self.config.rms_norm_eps
        residual = self.model.embed_tokens(input_ids)
        if self._one_call_decode(meta, input_ids.shape[0]):
            return self._decode_layers(residual, positions, kv_cache, meta)
        hidden = kernels.add_rmsnorm(residual, None, layers[0].input_layernorm.weight, eps)
        for index, layer in enumerate(layers):
            attn = layer.self_attn
            qkv = attn.qkv_proj(hidden)
            out = attn.backend.forward_fused(
                index, kv_cache[:, index], qkv, positions, self.rotary.cos, self.rotary.sin, meta, kernels
            )
            post_norm = layer.post_attention_layernorm.weight
            hidden = kernels.add_rmsnorm(residual, attn.o_proj(out), post_norm, eps)
            mlp = layer.mlp
            down = mlp.down_proj(kernels.silu_mul(mlp.gate_up_proj(hidden)))
            norm = layers[index + 1].input_layernorm if index + 1 < len(layers) else self.model.norm
            hidden = kernels.add_rmsnorm(residual, down, norm.weight, eps)
        return hidden

    def _one_call_decode(self, meta: AttentionMetadata, num_tokens: int) -> bool:
        """Whether ``decode_layers`` runs the step: 1-``KERNEL_MAX_ROWS`` decode tokens on the mirror."""
        only_decodes = meta.num_decode_tokens == num_tokens <= KERNEL_MAX_ROWS and not meta.prefills
        return only_decodes and meta.decode_mirror is not None and self.decode_weights is not None

    def _decode_layers(
        self,
        residual: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """All layers of a small decode step in one C++ call (engine/csrc/bf16_kernels.cpp,
        ``decode_layers``): the same arithmetic as the per-layer kernel calls, one parallel region."""
        assert self.rotary is not None and meta.decode_mirror is not None
        assert meta.decode_positions is not None
        config, attn = self.config, self.model.layers[0].self_attn
        qkv_width = (config.num_heads + 2 * config.num_kv_heads) * config.head_dim
        return self.kernels.decode_layers(
            residual, self.decode_weights, qkv_width, config.intermediate_size, config.num_heads,
            config.num_kv_heads, config.rms_norm_eps, attn.backend.scale, self.rotary.cos, self.rotary.sin,
            meta.decode_positions, kv_cache, meta.slot_block_ids, meta.slot_offsets, meta.decode_mirror,
        )  # fmt: skip

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[N, hidden]`` -> ``[N, vocab]`` float32."""
        return self.lm_head(hidden).float()
