"""ModelRunner: turns a scheduled step into tensors, runs the model over the paged cache, returns logits."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.attention import AttentionMetadata, PrefillChunk, build_decode_mask, build_prefill_mask
from engine.cuda_graphs import CUDAGraphDecoder, graph_batch_sizes
from engine.decode_mirror import DecodeMirror
from engine.model import CausalLM
from engine.scheduler import ScheduledSequence
from engine.sequence import Sequence


@dataclass
class ModelInput:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # [S] int64: last token of each sequence that samples this step
    sampling_seqs: list[Sequence]  # the S sequences, in logits row order


class ModelRunner:
    """Runs one step of ``CausalLM`` for a batch mixing decode tokens and prefill chunks."""

    def __init__(
        self,
        model: CausalLM,
        kv_cache: torch.Tensor,
        block_size: int,
        device: torch.device,
        decode_mirror_bytes: int = 0,
        cuda_graph_max_batch_size: int = 0,
        max_model_len: int = 0,
    ) -> None:
        """``decode_mirror_bytes``: budget of the contiguous decode copy (0 turns it off).
        ``cuda_graph_max_batch_size`` > 0 on CUDA: capture decode graphs now for sequences of up to
        ``max_model_len`` tokens (engine/cuda_graphs.py); ignored off CUDA."""
        self.model = model
        self.kv_cache = kv_cache  # [num_blocks, layers, 2, block_size, kv_heads, head_dim]
        self.block_size = block_size
        self.device = device
        self.graphs: CUDAGraphDecoder | None = None
        if device.type == "cuda" and cuda_graph_max_batch_size > 0 and max_model_len > 0:
            max_blocks = -(-max_model_len // block_size)
            sizes = graph_batch_sizes(cuda_graph_max_batch_size)
            self.graphs = CUDAGraphDecoder(model, kv_cache, block_size, max_blocks, sizes)
            self.graphs.capture()
        backend = model.model.layers[0].self_attn.backend
        use_mirror = decode_mirror_bytes > 0 and getattr(backend, "uses_decode_mirror", False)
        use_mirror = use_mirror and self.graphs is None  # graphs replay the gather path (fixed shapes)
        # the bf16 kernels read a mirror row only up to its length; torch SDPA also reads masked padding
        zero_padding = getattr(model, "kernels", None) is None
        self.mirror = DecodeMirror(kv_cache, decode_mirror_bytes, zero_padding) if use_mirror else None

    @torch.inference_mode()
    def execute(self, scheduled: list[ScheduledSequence]) -> tuple[torch.Tensor, list[Sequence]]:
        """Logits ``[S, vocab]`` float32 for the sequences that complete this step, and those sequences."""
        model_input = self.prepare(scheduled)
        if self.graphs is not None and self.graphs.can_replay(model_input.meta):
            hidden = self.graphs.replay(model_input.input_ids, model_input.positions, model_input.meta)
        else:
            hidden = self.model(model_input.input_ids, model_input.positions, self.kv_cache, model_input.meta)
        logits = self.model.compute_logits(hidden[model_input.logits_indices])
        return logits, model_input.sampling_seqs

    def prepare(self, scheduled: list[ScheduledSequence]) -> ModelInput:
        """Flatten the step: single-token items first (one batched decode attention), then chunks."""
        decodes = [item for item in scheduled if item.num_tokens == 1]
        chunks = [item for item in scheduled if item.num_tokens > 1]
        ids: list[torch.Tensor] = []
        positions: list[torch.Tensor] = []
        slot_blocks: list[torch.Tensor] = []
        logits_indices: list[int] = []
        sampling_seqs: list[Sequence] = []
        meta = AttentionMetadata(
            slot_block_ids=torch.empty(0),
            slot_offsets=torch.empty(0),
            num_decode_tokens=len(decodes),
            decode_mask=None,
            prefills=[],
        )
        if decodes:
            decodes = self._prepare_decodes(decodes, meta, ids, positions, slot_blocks)
            for row, item in enumerate(decodes):
                if item.completes_sequence:
                    logits_indices.append(row)
                    sampling_seqs.append(item.seq)
        token_start = len(decodes)
        for item in chunks:
            meta.prefills.append(self._prepare_chunk(item, token_start, ids, positions, slot_blocks))
            token_start += item.num_tokens
            if item.completes_sequence:
                logits_indices.append(token_start - 1)
                sampling_seqs.append(item.seq)
        position_tensor = torch.cat(positions)
        meta.slot_block_ids = torch.cat(slot_blocks)
        meta.slot_offsets = position_tensor % self.block_size
        return ModelInput(
            input_ids=torch.cat(ids),
            positions=position_tensor,
            meta=meta,
            logits_indices=torch.tensor(logits_indices, dtype=torch.long, device=self.device),
            sampling_seqs=sampling_seqs,
        )

    def _prepare_decodes(
        self,
        decodes: list[ScheduledSequence],
        meta: AttentionMetadata,
        ids: list[torch.Tensor],
        positions: list[torch.Tensor],
        slot_blocks: list[torch.Tensor],
    ) -> list[ScheduledSequence]:
        """Fill the decode part of ``meta``; returns the decode items in batch order."""
        context_lens = [item.seq.num_computed_tokens + 1 for item in decodes]  # including the new token
        max_context = max(context_lens)
        mirror = self.mirror
        use_mirror = mirror is not None and mirror.fits(len(decodes), max_context)
        if use_mirror:
            assert mirror is not None
            by_seq = {id(item.seq): item for item in decodes}
            decodes = [by_seq[id(seq)] for seq in mirror.prepare([d.seq for d in decodes], context_lens)]
            meta.decode_mirror = mirror.tensor
        elif mirror is not None:
            mirror.clear()
        size, device = self.block_size, self.device
        token_ids, token_positions, blocks = [], [], []
        for item in decodes:
            seq = item.seq
            position = seq.num_computed_tokens
            token_ids.append(seq.token_ids[position])
            token_positions.append(position)
            blocks.append(seq.block_ids[position // size])
        position_tensor = torch.tensor(token_positions, dtype=torch.long, device=device)
        ids.append(torch.tensor(token_ids, dtype=torch.long, device=device))
        positions.append(position_tensor)
        slot_blocks.append(torch.tensor(blocks, dtype=torch.long, device=device))
        if use_mirror:
            meta.decode_positions = position_tensor
            meta.decode_mask = build_decode_mask(position_tensor + 1, max_context)
        else:
            max_blocks = max(len(item.seq.block_ids) for item in decodes)
            tables = [item.seq.block_ids + [0] * (max_blocks - len(item.seq.block_ids)) for item in decodes]
            meta.decode_block_tables = torch.tensor(
                tables, dtype=torch.long, device=device
            )  # [B, max_blocks]
            meta.decode_mask = build_decode_mask(position_tensor + 1, max_blocks * size)  # padding is masked
            meta.decode_context_lens = (position_tensor + 1).to(torch.int32)
        return decodes

    def _prepare_chunk(
        self,
        item: ScheduledSequence,
        token_start: int,
        ids: list[torch.Tensor],
        positions: list[torch.Tensor],
        slot_blocks: list[torch.Tensor],
    ) -> PrefillChunk:
        seq, start, count = item.seq, item.seq.num_computed_tokens, item.num_tokens
        device = self.device
        chunk_positions = torch.arange(start, start + count, dtype=torch.long, device=device)
        num_blocks = -(-(start + count) // self.block_size)
        block_table = torch.tensor(seq.block_ids[:num_blocks], dtype=torch.long, device=device)
        ids.append(torch.tensor(seq.token_ids[start : start + count], dtype=torch.long, device=device))
        positions.append(chunk_positions)
        slot_blocks.append(block_table[chunk_positions // self.block_size])
        return PrefillChunk(
            token_start=token_start,
            num_tokens=count,
            context_start=start,
            block_table=block_table,
            mask=build_prefill_mask(start, count, device),
        )
