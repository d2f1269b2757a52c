"""flash-attn backend (CUDA only). UNTESTED on the development machines (no GPU, no flash-attn):
selected only when ``flash_attn`` imports and the device is CUDA; everything else uses ``TorchAttention``.

flash-attn 2's paged kernels want pages of >= 256 tokens in a per-layer layout; our pool is
block-contiguous with small blocks (see docs/engine.md), so this backend gathers a sequence's blocks
like the torch backend and hands contiguous K/V to flash-attn's variable-length / KV-cache kernels.
"""

from __future__ import annotations

import torch

from engine.attention import AttentionMetadata, PrefillChunk, TorchAttention


def flash_attn_available(device: torch.device) -> bool:
    """True when flash-attn imports and ``device`` is CUDA."""
    if device.type != "cuda":
        return False
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


class FlashAttention(TorchAttention):
    """``TorchAttention`` with flash-attn kernels for the decode batch and the prefill chunks."""

    name = "flash_attn"
    uses_decode_mirror = False

    def _decode(
        self, layer_cache: torch.Tensor, query: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        from flash_attn import flash_attn_with_kvcache

        assert meta.decode_block_tables is not None and meta.decode_mask is not None
        tables = meta.decode_block_tables
        keys = layer_cache[:, 0][tables].flatten(1, 2)  # [B, S, kv_heads, head_dim]
        values = layer_cache[:, 1][tables].flatten(1, 2)
        context_lens = meta.decode_mask[:, 0, 0, :].sum(-1).to(torch.int32)  # [B]
        out = flash_attn_with_kvcache(
            query.unsqueeze(1), keys, values, cache_seqlens=context_lens, softmax_scale=self.scale
        )
        return out.squeeze(1)

    def _prefill(
        self,
        layer_cache: torch.Tensor,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        chunk: PrefillChunk,
    ) -> torch.Tensor:
        from flash_attn import flash_attn_func

        context_len = chunk.context_start + chunk.num_tokens
        if chunk.context_start:
            key = layer_cache[:, 0][chunk.block_table].flatten(0, 1)[:context_len]
            value = layer_cache[:, 1][chunk.block_table].flatten(0, 1)[:context_len]
        # causal=True aligns the chunk's queries to the end of the context (bottom-right), as needed.
        out = flash_attn_func(query[None], key[None], value[None], causal=True, softmax_scale=self.scale)
        return out[0]


def make_flash_attention(num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> FlashAttention:
    """The flash-attn backend (call only when ``flash_attn_available``)."""
    return FlashAttention(num_heads, num_kv_heads, head_dim, scale)
