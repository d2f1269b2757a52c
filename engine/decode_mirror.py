"""DecodeMirror: a contiguous copy of the decode batch's KV, laid out for attention.

Why: decode attention on CPU is bound by moving K/V. Gathering every sequence's blocks from the
block-contiguous pool each step copies the whole context of the batch per layer, and the gathered
``[B, S, kv_heads, head_dim]`` order is slow for SDPA. The mirror keeps, per decoding sequence, one
row ``[kv_heads, capacity, head_dim]`` per layer for K and V; a sequence's context is copied from the
pool once when it starts decoding, and each step appends only the new token (which is also written to
the pool: the pool stays the source of truth that transfers and the prefix cache read).

Rows are compact: the decode batch in row order is rows ``0..B-1``. A sequence that stops decoding
(finished, preempted, or not scheduled this step) frees its row and the last row moves into the hole.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch

from engine.sequence import Sequence

_GROWTH = 2


class DecodeMirror:
    """``tensor``: ``[num_layers, 2, rows, kv_heads, capacity, head_dim]``."""

    def __init__(self, kv_cache: torch.Tensor, max_bytes: int) -> None:
        self.kv_cache = kv_cache  # [num_blocks, layers, 2, block_size, kv_heads, head_dim]
        _, self.num_layers, _, self.block_size, self.num_kv_heads, self.head_dim = kv_cache.shape
        self.max_bytes = max_bytes
        self.tensor = kv_cache.new_zeros((self.num_layers, 2, 0, self.num_kv_heads, 0, self.head_dim))
        self.rows: list[Sequence] = []  # rows[r] is the sequence mirrored in row r
        self.lengths: list[int] = []  # tokens of rows[r] already mirrored

    def fits(self, num_rows: int, context_len: int) -> bool:
        """Query: would a mirror of this size stay within the byte budget."""
        per_token = self.num_layers * 2 * self.num_kv_heads * self.head_dim * self.kv_cache.element_size()
        return num_rows * context_len * per_token <= self.max_bytes

    def clear(self) -> None:
        """Forget every row (e.g. when a step's decode batch does not fit the budget)."""
        self.rows, self.lengths = [], []

    def prepare(self, seqs: Seq[Sequence], context_lens: Seq[int]) -> list[Sequence]:
        """Make rows hold ``seqs``' context minus the new token; returns the decode order (row order).

        ``context_lens[i]``: tokens of ``seqs[i]`` including the one computed this step.
        """
        wanted = {id(seq): length for seq, length in zip(seqs, context_lens, strict=True)}
        self._drop_rows_not_in(wanted)
        self._ensure_size(len(seqs), max(context_lens))
        present = {id(seq) for seq in self.rows}
        for seq in seqs:
            if id(seq) not in present:
                self.rows.append(seq)
                self.lengths.append(0)
        for row, seq in enumerate(self.rows):
            if self.lengths[row] != wanted[id(seq)] - 1:
                self._fill(row, seq, wanted[id(seq)] - 1)
            self.lengths[row] = wanted[id(seq)]  # the new token is written by attention this step
        return list(self.rows)

    def _drop_rows_not_in(self, wanted: dict[int, int]) -> None:
        row = 0
        while row < len(self.rows):
            if id(self.rows[row]) in wanted:
                row += 1
                continue
            last = len(self.rows) - 1
            if row != last:  # move the last row into the hole
                self.tensor[:, :, row] = self.tensor[:, :, last]
                self.rows[row], self.lengths[row] = self.rows[last], self.lengths[last]
            self.rows.pop()
            self.lengths.pop()

    def _ensure_size(self, num_rows: int, context_len: int) -> None:
        _, _, rows, _, capacity, _ = self.tensor.shape
        if num_rows <= rows and context_len <= capacity:
            return
        new_rows = max(rows, num_rows) if num_rows <= rows else max(num_rows, rows * _GROWTH)
        new_capacity = capacity if context_len <= capacity else max(context_len, capacity * _GROWTH)
        new_capacity = -(-new_capacity // self.block_size) * self.block_size
        grown = self.tensor.new_zeros(
            (self.num_layers, 2, new_rows, self.num_kv_heads, new_capacity, self.head_dim)
        )
        grown[:, :, :rows, :, :capacity] = self.tensor
        self.tensor = grown

    def _fill(self, row: int, seq: Sequence, num_tokens: int) -> None:
        """Copy ``seq``'s first ``num_tokens`` tokens of KV, all layers, from the pool into ``row``."""
        if num_tokens == 0:
            return
        num_blocks = -(-num_tokens // self.block_size)
        blocks = torch.tensor(seq.block_ids[:num_blocks], dtype=torch.long, device=self.kv_cache.device)
        gathered = self.kv_cache.index_select(0, blocks)  # [n, layers, 2, block_size, kv_heads, head_dim]
        # -> [layers, 2, kv_heads, n * block_size, head_dim]
        gathered = gathered.permute(1, 2, 4, 0, 3, 5).reshape(
            self.num_layers, 2, self.num_kv_heads, num_blocks * self.block_size, self.head_dim
        )
        self.tensor[:, :, row, :, :num_tokens] = gathered[:, :, :, :num_tokens]
