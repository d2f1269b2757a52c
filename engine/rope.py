"""Rotary position embeddings as a precomputed cos/sin table, computed exactly as ``transformers`` does."""

from __future__ import annotations

from typing import Any

import torch


class RotaryEmbedding:
    """cos/sin for every position up to the context length; ``apply`` rotates q and k in place of HF's.

    The inverse frequencies (and the attention scaling of llama3 / yarn RoPE) come from ``transformers``'
    own RoPE initialisers, so every RoPE variant it implements statically is bit-identical.
    """

    def __init__(self, hf_config: Any, max_positions: int, dtype: torch.dtype, device: torch.device) -> None:
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        hf_rope = LlamaRotaryEmbedding(hf_config)
        inv_freq = hf_rope.inv_freq.to(device=device, dtype=torch.float32)  # [head_dim / 2]
        positions = torch.arange(max_positions, device=device, dtype=torch.float32)
        freqs = positions[:, None] * inv_freq[None, :]  # [max_positions, head_dim / 2], as HF computes
        table = torch.cat((freqs, freqs), dim=-1)  # [max_positions, head_dim]
        self.cos = (table.cos() * hf_rope.attention_scaling).to(dtype)
        self.sin = (table.sin() * hf_rope.attention_scaling).to(dtype)

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``positions`` ``[T]`` -> cos, sin ``[T, 1, head_dim]`` (broadcast over heads)."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x`` ``[T, heads, head_dim]`` rotated: ``x * cos + rotate_half(x) * sin`` (HF's half-split layout)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
