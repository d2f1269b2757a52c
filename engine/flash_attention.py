"""flash-attn backend (CUDA only). UNTESTED: no machine here has had flash-attn (the lent H200 has
none either, and its wheel is too large to carry); selected only when ``flash_attn`` imports and the
device is CUDA (``engine.attention.make_attention_backend``).

Decode uses flash-attn's paged KV entry point, ``flash_attn_with_kvcache(q, k_cache, v_cache,
cache_seqlens=..., block_table=...)``, when the block size is a multiple of 256 (upstream flash-attn 2
refuses smaller pages: "Paged KV cache block size must be divisible by 256"; vLLM's fork takes 16).
Its ``k_cache``/``v_cache`` are ``[num_blocks, block_size, kv_heads, head_dim]`` per layer; the engine
passes strided views of the block-contiguous pool (``layer_cache[:, 0]``, ``layer_cache[:, 1]``):
flash-attn reads the block stride from the tensor and needs only the last dimension contiguous, so
nothing is copied. With smaller blocks (the default 16) decode gathers the batch's blocks into
contiguous ``[B, S, kv_heads, head_dim]`` K/V first, as the torch backend does.
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


PAGED_BLOCK_MULTIPLE = 256  # flash-attn 2's paged kernel needs block_size % 256 == 0


class FlashAttention(TorchAttention):
    """``TorchAttention`` with flash-attn kernels for the decode batch and the prefill chunks."""

    name = "flash_attn"
    uses_decode_mirror = False

    def __init__(
        self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, block_size: int
    ) -> None:
        super().__init__(num_heads, num_kv_heads, head_dim, scale)
        self.is_paged = block_size % PAGED_BLOCK_MULTIPLE == 0

    def _decode(
        self, layer_cache: torch.Tensor, query: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        from flash_attn import flash_attn_with_kvcache

        assert meta.decode_block_tables is not None and meta.decode_mask is not None
        tables = meta.decode_block_tables
        context_lens = meta.decode_context_lens
        if context_lens is None:
            context_lens = meta.decode_mask[:, 0, 0, :].sum(-1)
        context_lens = context_lens.to(torch.int32)  # [B]
        if self.is_paged:  # strided per-layer views of the pool: [num_blocks, block_size, kv_heads, head_dim]
            keys, values = layer_cache[:, 0], layer_cache[:, 1]
            out = flash_attn_with_kvcache(
                query.unsqueeze(1),
                keys,
                values,
                cache_seqlens=context_lens,
                block_table=tables.to(torch.int32),
                softmax_scale=self.scale,
            )
            return out.squeeze(1)
        keys = layer_cache[:, 0][tables].flatten(1, 2)  # [B, S, kv_heads, head_dim]
        values = layer_cache[:, 1][tables].flatten(1, 2)
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


def make_flash_attention(
    num_heads: int, num_kv_heads: int, head_dim: int, scale: float, block_size: int
) -> FlashAttention:
    """The flash-attn backend (call only when ``flash_attn_available``)."""
    return FlashAttention(num_heads, num_kv_heads, head_dim, scale, block_size)
