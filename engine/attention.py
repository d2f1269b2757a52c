"""Attention over the paged KV cache: per-step metadata and the torch (SDPA) backend.

One step's batch is flattened to ``T`` tokens: first ``num_decode_tokens`` decode tokens (one per
decoding sequence), then the prefill chunks, each a contiguous run of tokens of one sequence.
Each layer writes the new tokens' K/V into their slots, then attends:

- decode tokens as ONE batched SDPA over a padded ``[B, kv_heads, S, head_dim]`` context masked by
  context length: read from the ``DecodeMirror`` (a contiguous copy of the batch's KV, see
  decode_mirror.py) or, without it, gathered from the sequences' blocks; the query heads that share a
  KV head are laid out as that KV head's query rows (GQA without repeating K/V);
- each prefill chunk with one SDPA over its gathered context (causal within the chunk), or straight
  over the chunk's own K/V when nothing precedes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass
class PrefillChunk:
    """One sequence's run of new tokens in the flattened batch."""

    token_start: int  # index of the chunk's first token in the flattened batch
    num_tokens: int  # n: new tokens in this chunk
    context_start: int  # tokens of this sequence already in the cache before the chunk
    block_table: torch.Tensor  # [num_blocks] int64: the blocks holding positions [0, context_start + n)
    mask: torch.Tensor | None  # [1, 1, n, context_start + n] bool, None when context_start == 0 (causal)


@dataclass
class AttentionMetadata:
    """Everything attention needs for one step, built once and shared by all layers."""

    slot_block_ids: torch.Tensor  # [T] int64: block that receives each new token's K/V
    slot_offsets: torch.Tensor  # [T] int64: offset of that token inside its block
    num_decode_tokens: int  # B: the first B tokens are single-token decodes, one per sequence
    decode_mask: torch.Tensor | None  # [B, 1, 1, S] bool: key slot is in context
    prefills: list[PrefillChunk]
    decode_block_tables: torch.Tensor | None = None  # [B, max_blocks] int64 padded with block 0 (gather path)
    decode_mirror: torch.Tensor | None = None  # [layers, 2, rows, kv_heads, capacity, head_dim] (mirror path)
    decode_positions: torch.Tensor | None = None  # [B] int64: position of each decode token (mirror path)
    decode_context_lens: torch.Tensor | None = None  # [B] int32: context incl. the new token (gather path)
    # [T] bool, CUDA graphs only: True for a padding row, whose slot write must leave the cache as it was
    slot_is_padding: torch.Tensor | None = None


def build_prefill_mask(context_start: int, num_tokens: int, device: torch.device) -> torch.Tensor | None:
    """``[1, 1, n, context_start + n]`` bool: query ``i`` (at ``context_start + i``) sees keys up to it."""
    if context_start == 0:
        return None
    query_positions = torch.arange(context_start, context_start + num_tokens, device=device)
    key_positions = torch.arange(context_start + num_tokens, device=device)
    return (key_positions[None, :] <= query_positions[:, None])[None, None]


def build_decode_mask(context_lens: torch.Tensor, num_key_slots: int) -> torch.Tensor:
    """``[B, 1, 1, num_key_slots]`` bool from context_lens ``[B]``: key slot ``j`` is used iff ``j < len``."""
    key_positions = torch.arange(num_key_slots, device=context_lens.device)
    return (key_positions[None, :] < context_lens[:, None])[:, None, None, :]


BACKEND_NAMES = ("auto", "torch", "flash_attn", "triton")


def make_attention_backend(
    choice: str,
    device: torch.device,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
) -> TorchAttention:
    """The attention backend for ``EngineConfig.attention_backend`` (``choice``) on ``device``.

    ``auto``: on CUDA flash-attn when it imports, else the Triton paged kernel when Triton imports and
    the shapes suit it (power-of-two head_dim and block_size), else torch SDPA; off CUDA always torch.
    Naming ``flash_attn`` or ``triton`` where it cannot run raises ``ValueError``.
    """
    from engine.flash_attention import flash_attn_available, make_flash_attention
    from engine.triton_attention import TritonAttention, triton_supported

    if choice not in BACKEND_NAMES:
        raise ValueError(f"attention_backend {choice!r}: expected one of {BACKEND_NAMES}")
    scale = head_dim**-0.5
    is_cuda = device.type == "cuda"
    if choice == "flash_attn" or (choice == "auto" and is_cuda and flash_attn_available(device)):
        if not flash_attn_available(device):
            raise ValueError("attention_backend='flash_attn' needs flash-attn importable on CUDA")
        return make_flash_attention(num_heads, num_kv_heads, head_dim, scale, block_size)
    has_triton = triton_supported(device, head_dim, block_size)
    if choice == "triton" or (choice == "auto" and is_cuda and has_triton):
        if not has_triton:
            raise ValueError(
                "attention_backend='triton' needs Triton on CUDA and power-of-two head_dim and block_size"
            )
        return TritonAttention(num_heads, num_kv_heads, head_dim, scale)
    return TorchAttention(num_heads, num_kv_heads, head_dim, scale)


class TorchAttention:
    """Paged attention with ``scaled_dot_product_attention``; runs on CPU and CUDA."""

    name = "torch"
    uses_decode_mirror = True  # decode reads the DecodeMirror when the runner provides one

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.group_size = num_heads // num_kv_heads

    @staticmethod
    def write_kv(
        layer_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, meta: AttentionMetadata
    ) -> None:
        """Store new K/V; ``layer_cache`` is the ``[num_blocks, 2, block_size, kv_heads, head_dim]`` view."""
        # Advanced indices on dims 0 and 2 (split by a slice) select [T, 2, kv_heads, head_dim].
        new = torch.stack((key, value), dim=1)
        if meta.slot_is_padding is not None:
            # A padded (CUDA-graph) row points at a slot no real row writes; it writes back what is there.
            old = layer_cache[meta.slot_block_ids, :, meta.slot_offsets]
            new = torch.where(meta.slot_is_padding[:, None, None, None], old, new)
        layer_cache[meta.slot_block_ids, :, meta.slot_offsets] = new

    def forward(
        self,
        layer: int,
        layer_cache: torch.Tensor,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """query ``[T, heads, head_dim]``, key/value ``[T, kv_heads, head_dim]``; returns like query."""
        self.write_kv(layer_cache, key, value, meta)
        num_decodes = meta.num_decode_tokens
        if num_decodes:
            decoded = self._decode_any(
                layer, layer_cache, query[:num_decodes], key[:num_decodes], value[:num_decodes], meta
            )
            if num_decodes == len(query):
                return decoded
        output = torch.empty_like(query)
        if num_decodes:
            output[:num_decodes] = decoded
        for chunk in meta.prefills:
            end = chunk.token_start + chunk.num_tokens
            output[chunk.token_start : end] = self._prefill(
                layer_cache,
                query[chunk.token_start : end],
                key[chunk.token_start : end],
                value[chunk.token_start : end],
                chunk,
            )
        return output

    def forward_fused(
        self,
        layer: int,
        layer_cache: torch.Tensor,
        qkv: torch.Tensor,
        positions: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        meta: AttentionMetadata,
        kernels: Any,
    ) -> torch.Tensor:
        """``forward`` for the bf16 CPU kernels: ``qkv`` ``[T, (heads + 2 kv_heads) * head_dim]`` from the
        fused projection; RoPE (``cos``/``sin``: the whole ``[positions, head_dim]`` tables), the K/V
        writes (pool and mirror) and mirror decode attention run in C++, the rest as ``forward``.
        Returns ``[T, heads * head_dim]``."""
        num_decodes, mirror = meta.num_decode_tokens, meta.decode_mirror
        mirror_layer = mirror[layer] if mirror is not None else qkv.new_empty(0)
        heads, kv_heads, dim = self.num_heads, self.num_kv_heads, self.head_dim
        kernels.rope_store(
            qkv, cos, sin, positions, heads, kv_heads, layer_cache, meta.slot_block_ids, meta.slot_offsets,
            mirror_layer, num_decodes if mirror is not None else 0,
        )
        num_tokens = qkv.shape[0]
        query = qkv[:, : heads * dim].view(num_tokens, heads, dim)
        decoded = None
        if num_decodes and mirror is not None:
            assert meta.decode_positions is not None
            positions_b = meta.decode_positions
            decoded = kernels.decode_attention(qkv, mirror_layer, positions_b, heads, kv_heads, self.scale)
        elif num_decodes:
            decoded = self._decode(layer_cache, query[:num_decodes], meta).reshape(num_decodes, heads * dim)
        if decoded is not None and num_decodes == num_tokens:
            return decoded
        key = qkv[:, heads * dim : (heads + kv_heads) * dim].view(num_tokens, kv_heads, dim)
        value = qkv[:, (heads + kv_heads) * dim :].view(num_tokens, kv_heads, dim)
        output = qkv.new_empty(num_tokens, heads * dim)
        if decoded is not None:
            output[:num_decodes] = decoded
        for chunk in meta.prefills:
            end = chunk.token_start + chunk.num_tokens
            output[chunk.token_start : end] = self._prefill(
                layer_cache, query[chunk.token_start : end], key[chunk.token_start : end],
                value[chunk.token_start : end], chunk,
            ).reshape(chunk.num_tokens, heads * dim)
        return output

    def _decode_any(
        self,
        layer: int,
        layer_cache: torch.Tensor,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        if meta.decode_mirror is None:
            return self._decode(layer_cache, query, meta)
        assert meta.decode_positions is not None and meta.decode_mask is not None
        batch, context = query.shape[0], meta.decode_mask.shape[-1]
        mirror = meta.decode_mirror[layer]  # [2, rows, kv_heads, capacity, head_dim]
        rows = torch.arange(batch, device=query.device)
        # Append this step's token: mirror[kv, b, :, position_b] <- key/value[b] ([B, kv_heads, head_dim])
        mirror[0][rows, :, meta.decode_positions] = key
        mirror[1][rows, :, meta.decode_positions] = value
        keys, values = mirror[0, :batch, :, :context], mirror[1, :batch, :, :context]
        return self.attend_decode(query, keys, values, meta)

    def _decode(
        self, layer_cache: torch.Tensor, query: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """Gather path: the batch's blocks copied into ``[B, kv_heads, M * block_size, head_dim]``."""
        assert meta.decode_block_tables is not None
        batch = meta.decode_block_tables.shape[0]
        flat = meta.decode_block_tables.flatten()
        # index_select over whole blocks ([block_size, kv_heads, head_dim] runs) is the fast gather.
        keys = layer_cache[:, 0].index_select(0, flat).view(batch, -1, self.num_kv_heads, self.head_dim)
        values = layer_cache[:, 1].index_select(0, flat).view(batch, -1, self.num_kv_heads, self.head_dim)
        return self.attend_decode(query, keys.transpose(1, 2), values.transpose(1, 2), meta)

    def attend_decode(
        self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """query ``[B, heads, head_dim]``; keys/values ``[B, kv_heads, S, head_dim]``."""
        batch = query.shape[0]
        # GQA: the group's query heads become the KV head's query rows: [B, kv_heads, group, head_dim]
        grouped = query.view(batch, self.num_kv_heads, self.group_size, self.head_dim)
        out = F.scaled_dot_product_attention(
            grouped, keys, values, attn_mask=meta.decode_mask, scale=self.scale
        )
        return out.reshape(batch, self.num_heads, self.head_dim)

    def _prefill(
        self,
        layer_cache: torch.Tensor,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        chunk: PrefillChunk,
    ) -> torch.Tensor:
        query_t = query.transpose(0, 1).unsqueeze(0)  # [1, heads, n, head_dim]
        if chunk.context_start == 0:
            # Nothing cached before the chunk: attend over its own K/V, causal.
            keys = key.transpose(0, 1).unsqueeze(0)  # [1, kv_heads, n, head_dim]
            values = value.transpose(0, 1).unsqueeze(0)
            out = F.scaled_dot_product_attention(
                query_t, keys, values, is_causal=True, scale=self.scale, enable_gqa=True
            )
        else:
            context_len = chunk.context_start + chunk.num_tokens
            # [num_blocks, block_size, kv_heads, head_dim] -> [1, kv_heads, context_len, head_dim]
            keys = layer_cache[:, 0].index_select(0, chunk.block_table).flatten(0, 1)[:context_len]
            values = layer_cache[:, 1].index_select(0, chunk.block_table).flatten(0, 1)[:context_len]
            keys, values = keys.transpose(0, 1)[None], values.transpose(0, 1)[None]
            out = F.scaled_dot_product_attention(
                query_t, keys, values, attn_mask=chunk.mask, scale=self.scale, enable_gqa=True
            )
        return out[0].transpose(0, 1)  # [n, heads, head_dim]
