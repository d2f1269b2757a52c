"""CUDA graphs for decode steps: captured at start for a few padded batch sizes, replayed per step.

A decode-only step of ``n`` sequences runs the graph of the smallest captured size ``>= n`` (its
"bucket"); rows ``n..bucket-1`` are padding. The graphs read fixed ("static") input buffers: token ids,
positions, slot mapping, block tables padded to ``max_blocks_per_seq`` columns, context lengths and the
decode mask; each replay copies the step's inputs into them, replays, and copies the hidden states of
the real rows out. Steps with prefill chunks, or more sequences than the largest bucket, run eagerly.

Padding rows must not change the cache: a padding row reads block 0 with context length 1 (finite
values, discarded) and "writes" slot ``(block of row 0, (position of row 0 + 1) % block_size)``, a slot
no real row writes this step (only row 0 writes row 0's current block: a block being filled is never
shared), with ``AttentionMetadata.slot_is_padding`` set so the write puts back what the slot holds.

Built only when the device is CUDA and ``EngineConfig.cuda_graph_max_batch_size > 0``; the bucket and
padding helpers are plain torch / Python (tested on CPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.attention import AttentionMetadata, build_decode_mask


def graph_batch_sizes(max_batch_size: int) -> list[int]:
    """The captured sizes: 1, 2, 4, then multiples of 8, and ``max_batch_size`` itself (vLLM's ladder)."""
    if max_batch_size <= 0:
        return []
    sizes = [size for size in (1, 2, 4) if size <= max_batch_size]
    sizes += list(range(8, max_batch_size + 1, 8))
    if sizes[-1] != max_batch_size:
        sizes.append(max_batch_size)
    return sizes


def bucket_for(num_seqs: int, batch_sizes: list[int]) -> int | None:
    """Query: the smallest captured size holding ``num_seqs`` rows; None above the largest (run eagerly)."""
    for size in batch_sizes:
        if size >= num_seqs:
            return size
    return None


@dataclass
class PaddedDecode:
    """One decode step's inputs padded to a bucket: every tensor has ``bucket`` rows."""

    input_ids: torch.Tensor  # [bucket] int64
    positions: torch.Tensor  # [bucket] int64
    slot_block_ids: torch.Tensor  # [bucket] int64
    slot_offsets: torch.Tensor  # [bucket] int64
    slot_is_padding: torch.Tensor  # [bucket] bool
    block_tables: torch.Tensor  # [bucket, max_blocks] int64, zero past each table
    context_lens: torch.Tensor  # [bucket] int32, 1 for padding rows


def pad_decode_batch(
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    block_tables: torch.Tensor,
    block_size: int,
    bucket: int,
    max_blocks: int,
) -> PaddedDecode:
    """Pad ``n`` decode rows (input_ids, positions ``[n]``, block_tables ``[n, m]``, m <= max_blocks)."""
    num_rows, num_cols = block_tables.shape
    assert 0 < num_rows <= bucket and num_cols <= max_blocks and block_size >= 2
    device = input_ids.device
    padded_tables = torch.zeros((bucket, max_blocks), dtype=torch.long, device=device)
    padded_tables[:num_rows, :num_cols] = block_tables
    rows = torch.arange(num_rows, device=device)
    slot_blocks = torch.zeros(bucket, dtype=torch.long, device=device)
    slot_blocks[:num_rows] = block_tables[rows, positions // block_size]
    slot_blocks[num_rows:] = slot_blocks[0]
    slot_offsets = torch.empty(bucket, dtype=torch.long, device=device)
    slot_offsets[:num_rows] = positions % block_size
    slot_offsets[num_rows:] = (positions[0] + 1) % block_size
    is_padding = torch.arange(bucket, device=device) >= num_rows
    context_lens = torch.ones(bucket, dtype=torch.int32, device=device)
    context_lens[:num_rows] = (positions + 1).to(torch.int32)
    return PaddedDecode(
        input_ids=_pad(input_ids, bucket),
        positions=_pad(positions, bucket),
        slot_block_ids=slot_blocks,
        slot_offsets=slot_offsets,
        slot_is_padding=is_padding,
        block_tables=padded_tables,
        context_lens=context_lens,
    )


def _pad(values: torch.Tensor, bucket: int) -> torch.Tensor:
    padded = values.new_zeros(bucket)
    padded[: len(values)] = values
    return padded


class CUDAGraphDecoder:
    """Captures ``model``'s decode forward at ``batch_sizes`` and replays it for decode-only steps."""

    def __init__(
        self,
        model: torch.nn.Module,
        kv_cache: torch.Tensor,
        block_size: int,
        max_blocks_per_seq: int,
        batch_sizes: list[int],
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache  # [num_blocks, layers, 2, block_size, kv_heads, head_dim]
        self.block_size = block_size
        self.max_blocks = max_blocks_per_seq
        self.batch_sizes = sorted(batch_sizes)
        largest, device = self.batch_sizes[-1], kv_cache.device
        self.static = PaddedDecode(
            input_ids=torch.zeros(largest, dtype=torch.long, device=device),
            positions=torch.zeros(largest, dtype=torch.long, device=device),
            slot_block_ids=torch.zeros(largest, dtype=torch.long, device=device),
            slot_offsets=torch.zeros(largest, dtype=torch.long, device=device),
            slot_is_padding=torch.ones(largest, dtype=torch.bool, device=device),  # capture writes nothing
            block_tables=torch.zeros((largest, max_blocks_per_seq), dtype=torch.long, device=device),
            context_lens=torch.ones(largest, dtype=torch.int32, device=device),
        )
        self.decode_mask = build_decode_mask(self.static.context_lens, max_blocks_per_seq * block_size)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def _meta(self, size: int) -> AttentionMetadata:
        static = self.static
        return AttentionMetadata(
            slot_block_ids=static.slot_block_ids[:size],
            slot_offsets=static.slot_offsets[:size],
            num_decode_tokens=size,
            decode_mask=self.decode_mask[:size],
            prefills=[],
            decode_block_tables=static.block_tables[:size],
            decode_context_lens=static.context_lens[:size],
            slot_is_padding=static.slot_is_padding[:size],
        )

    def _forward(self, size: int) -> torch.Tensor:
        return self.model(
            self.static.input_ids[:size], self.static.positions[:size], self.kv_cache, self._meta(size)
        )

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every size, largest first, sharing one memory pool (the largest sizes it)."""
        pool = None
        for size in reversed(self.batch_sizes):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up outside capture: lazy init, autotuning, Triton JIT
                for _ in range(2):
                    self._forward(size)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                hidden = self._forward(size)
            pool = graph.pool()
            self.graphs[size] = (graph, hidden)
        torch.cuda.synchronize()

    def can_replay(self, meta: AttentionMetadata) -> bool:
        """Query: is this step decode-only, gather-path metadata, within a bucket and the table width."""
        tables = meta.decode_block_tables
        return (
            not meta.prefills
            and tables is not None
            and meta.decode_mirror is None
            and tables.shape[1] <= self.max_blocks
            and bucket_for(meta.num_decode_tokens, self.batch_sizes) in self.graphs
        )

    def stage(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> int:
        """Copy the step's ``n`` decode rows, padded, into the static buffers; returns the bucket."""
        assert meta.decode_block_tables is not None
        size = bucket_for(len(input_ids), self.batch_sizes)
        assert size is not None
        padded = pad_decode_batch(
            input_ids, positions, meta.decode_block_tables, self.block_size, size, self.max_blocks
        )
        static = self.static
        for name in PaddedDecode.__dataclass_fields__:
            getattr(static, name)[:size].copy_(getattr(padded, name))
        self.decode_mask[:size].copy_(build_decode_mask(padded.context_lens, self.decode_mask.shape[-1]))
        return size

    def replay(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """The hidden states ``[n, hidden]`` of the step's ``n`` rows (call only when ``can_replay``)."""
        size = self.stage(input_ids, positions, meta)
        graph, hidden = self.graphs[size]
        graph.replay()
        return hidden[: len(input_ids)].clone()
