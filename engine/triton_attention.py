"""Triton paged decode attention (CUDA only), and the torch reference it must match.

The kernel reads K/V straight from the block-contiguous pool (``[num_blocks, 2, block_size, kv_heads,
head_dim]`` per layer, a strided view of ``[num_blocks, layers, 2, block_size, kv_heads, head_dim]``):
no gather, no per-layer copy, any block size that is a power of two. One program per (sequence, KV
head): it holds the KV head's group of query heads (GQA: each K/V block is loaded once for the whole
group), walks the sequence's block table up to its context length, and keeps an online softmax
(running max ``m``, running sum ``l``, float32 accumulator), as flash-decoding does within a split.

Prefill chunks go through the torch SDPA path of ``TorchAttention`` (one SDPA per chunk: on CUDA it
dispatches to PyTorch's own flash / memory-efficient kernels). This module imports where Triton is
absent (``HAS_TRITON`` is then False and the backend is never selected); the kernel runs only on CUDA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.attention import AttentionMetadata, PrefillChunk, TorchAttention

try:  # Triton ships with CUDA builds of torch; the CPU build and this repo's CPU CI have none.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the machine
    triton = None
    tl = None

HAS_TRITON = triton is not None


def _is_power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


def triton_supported(device: torch.device, head_dim: int, block_size: int) -> bool:
    """Query: can the Triton decode kernel run here (CUDA, Triton importable, power-of-two shapes)."""
    return (
        HAS_TRITON and device.type == "cuda" and _is_power_of_two(head_dim) and _is_power_of_two(block_size)
    )


def paged_decode_reference(
    query: torch.Tensor,
    layer_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """What the kernel computes, in torch, block by block with the same online softmax (float32).

    query ``[B, heads, head_dim]``; layer_cache ``[num_blocks, 2, block_size, kv_heads, head_dim]``;
    block_tables ``[B, max_blocks]`` int (entries past a sequence's context are ignored);
    context_lens ``[B]`` int, each >= 1. Returns ``[B, heads, head_dim]`` in query's dtype.
    """
    batch, num_heads, head_dim = query.shape
    block_size, num_kv_heads = layer_cache.shape[2], layer_cache.shape[3]
    group = num_heads // num_kv_heads
    q = query.float().view(batch, num_kv_heads, group, head_dim) * scale
    running_max = q.new_full((batch, num_kv_heads, group), float("-inf"))
    running_sum = q.new_zeros((batch, num_kv_heads, group))
    acc = q.new_zeros((batch, num_kv_heads, group, head_dim))
    lens = context_lens.to(torch.long)
    slots = torch.arange(block_size, device=query.device)
    for index in range(block_tables.shape[1]):
        valid = (index * block_size + slots)[None, :] < lens[:, None]  # [B, block_size]
        if not bool(valid.any()):
            break
        blocks = block_tables[:, index].to(torch.long)
        keys = layer_cache[blocks, 0].float()  # [B, block_size, kv_heads, head_dim]
        values = layer_cache[blocks, 1].float()
        scores = torch.einsum("bhgd,bshd->bhgs", q, keys)
        scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
        new_max = torch.maximum(running_max, scores.amax(-1))
        safe_max = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)  # rows past len
        probs = torch.exp(scores - safe_max[..., None])
        alpha = torch.exp(running_max - safe_max)
        running_sum = running_sum * alpha + probs.sum(-1)
        acc = acc * alpha[..., None] + torch.einsum("bhgs,bshd->bhgd", probs, values)
        running_max = new_max
    out = acc / running_sum[..., None]
    return out.reshape(batch, num_heads, head_dim).to(query.dtype)


if HAS_TRITON:

    @triton.jit
    def _paged_decode_kernel(
        query_ptr,
        cache_ptr,
        tables_ptr,
        lens_ptr,
        out_ptr,
        scale,
        stride_qb,
        stride_qh,
        stride_cb,
        stride_ckv,
        stride_cs,
        stride_ch,
        stride_tb,
        stride_ob,
        stride_oh,
        GROUP: tl.constexpr,
        GROUP_PAD: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
        HEAD_DIM: tl.constexpr,
    ):
        seq = tl.program_id(0)
        kv_head = tl.program_id(1)
        context_len = tl.load(lens_ptr + seq)
        groups = tl.arange(0, GROUP_PAD)
        dims = tl.arange(0, HEAD_DIM)
        slots = tl.arange(0, BLOCK_SIZE)
        heads = kv_head * GROUP + groups
        group_ok = groups < GROUP
        q_offsets = seq * stride_qb + heads[:, None] * stride_qh + dims[None, :]
        q = tl.load(query_ptr + q_offsets, mask=group_ok[:, None], other=0.0).to(tl.float32) * scale
        running_max = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        running_sum = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
        kv_offsets = slots[:, None] * stride_cs + dims[None, :]  # [BLOCK_SIZE, HEAD_DIM]
        num_blocks = (context_len + BLOCK_SIZE - 1) // BLOCK_SIZE
        for index in range(0, num_blocks):
            block = tl.load(tables_ptr + seq * stride_tb + index).to(tl.int64)
            base = cache_ptr + block * stride_cb + kv_head * stride_ch
            keys = tl.load(base + kv_offsets).to(tl.float32)
            values = tl.load(base + stride_ckv + kv_offsets).to(tl.float32)
            scores = tl.sum(q[:, None, :] * keys[None, :, :], axis=2)  # [GROUP_PAD, BLOCK_SIZE]
            scores = tl.where(((index * BLOCK_SIZE + slots) < context_len)[None, :], scores, float("-inf"))
            new_max = tl.maximum(running_max, tl.max(scores, axis=1))  # finite: a block has a valid slot
            alpha = tl.exp(running_max - new_max)
            probs = tl.exp(scores - new_max[:, None])
            running_sum = running_sum * alpha + tl.sum(probs, axis=1)
            acc = acc * alpha[:, None] + tl.sum(probs[:, :, None] * values[None, :, :], axis=1)
            running_max = new_max
        out = acc / running_sum[:, None]
        o_offsets = seq * stride_ob + heads[:, None] * stride_oh + dims[None, :]
        tl.store(out_ptr + o_offsets, out.to(out_ptr.dtype.element_ty), mask=group_ok[:, None])


def paged_decode(
    query: torch.Tensor,
    layer_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """The Triton kernel over the same arguments as ``paged_decode_reference`` (CUDA, or the Triton
    interpreter with ``TRITON_INTERPRET=1``)."""
    assert triton is not None, "paged_decode needs Triton (check triton_supported first)"
    batch, num_heads, head_dim = query.shape
    _, _, block_size, num_kv_heads, cache_head_dim = layer_cache.shape
    assert cache_head_dim == head_dim and layer_cache.stride(-1) == 1 and query.stride(-1) == 1
    group = num_heads // num_kv_heads
    out = torch.empty_like(query)
    _paged_decode_kernel[(batch, num_kv_heads)](
        query,
        layer_cache,
        block_tables,
        context_lens,
        out,
        scale,
        query.stride(0),
        query.stride(1),
        layer_cache.stride(0),
        layer_cache.stride(1),
        layer_cache.stride(2),
        layer_cache.stride(3),
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        GROUP=group,
        GROUP_PAD=triton.next_power_of_2(group),
        BLOCK_SIZE=block_size,
        HEAD_DIM=head_dim,
    )
    return out


class TritonAttention(TorchAttention):
    """``TorchAttention`` whose decode batch runs the Triton paged kernel over the pool (CUDA)."""

    name = "triton"
    uses_decode_mirror = False  # the kernel reads the pool's blocks in place

    def _decode(
        self, layer_cache: torch.Tensor, query: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        assert meta.decode_block_tables is not None
        lens = meta.decode_context_lens
        if lens is None:  # metadata built without lengths: they are the mask's row sums
            assert meta.decode_mask is not None
            lens = meta.decode_mask[:, 0, 0, :].sum(-1).to(torch.int32)
        return paged_decode(query, layer_cache, meta.decode_block_tables, lens, self.scale)

    def _prefill(
        self,
        layer_cache: torch.Tensor,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        chunk: PrefillChunk,
    ) -> torch.Tensor:
        """A chunk with nothing before it: causal SDPA with K/V repeated to every query head, so
        PyTorch may take its flash kernel (``enable_gqa`` is not taken by every fused kernel on every
        version); chunks after cached context keep the base class's masked SDPA."""
        if chunk.context_start or self.group_size == 1:
            return super()._prefill(layer_cache, query, key, value, chunk)
        query_t = query.transpose(0, 1).unsqueeze(0)  # [1, heads, n, head_dim]
        keys = key.repeat_interleave(self.group_size, dim=1).transpose(0, 1).unsqueeze(0)
        values = value.repeat_interleave(self.group_size, dim=1).transpose(0, 1).unsqueeze(0)
        out = F.scaled_dot_product_attention(query_t, keys, values, is_causal=True, scale=self.scale)
        return out[0].transpose(0, 1)  # [n, heads, head_dim]
