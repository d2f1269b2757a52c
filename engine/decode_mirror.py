"""DecodeMirror: a contiguous copy of the decode batch's KV, laid out for attention.

Why: decode attention on CPU is bound by moving K/V. Gathering every sequence's blocks from the
block-contiguous pool each step copies the whole context of the batch per layer, and the gathered
``[B, S, kv_heads, head_dim]`` order is slow for SDPA. The mirror keeps, per decoding sequence, one
row ``[kv_heads, capacity, head_dim]`` per layer for K and V; a sequence's context is copied from the
pool once when it starts decoding, and each step appends only the new token (which is also written to
the pool: the pool stays the source of truth that transfers and the prefix cache read).

Rows are compact: the decode batch in row order is rows ``0..B-1``. A sequence that stops decoding
(finished, preempted, or not scheduled this step) frees its row and the last row moves into the hole.

Growth: when the batch needs more rows or a longer row than the tensor has, a new tensor is made with
headroom (rows, and capacity plus at least 1/8, rounded up to powers of two; within ``max_bytes`` where
that is possible), so a long sequence joining costs one reallocation, not one per block it then grows
by, and sized by the batch now (an old, larger row count is not kept). Only the rows' tokens are
copied, never the padding. With ``zero_padding=False`` (every reader stops at a row's length, as the
bf16 CPU kernels do) the new tensor is left uninitialised, so memory the batch does not use is never
touched: a fresh page costs a fault, in this VM ~2 ms of wall time per MiB, and zeroing whole grown
tensors (8 rows x 1,744 then x 3,488 tokens, ~1 GB) stalled a decode replica ~2 s when a 1,743-token
prompt joined (docs/benchmarks.md, "Decode: a long prompt joining"). The torch SDPA reader also reads
masked slots past a row's length, which must hold finite numbers: it asks for ``zero_padding=True``.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch

from engine.sequence import Sequence


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def block_runs(block_ids: Seq[int]) -> list[tuple[int, int, int]]:
    """``(index, first block id, count)`` per run of consecutive block ids (each run is one view)."""
    runs: list[tuple[int, int, int]] = []
    for index, block_id in enumerate(block_ids):
        if runs and runs[-1][1] + runs[-1][2] == block_id:
            start, first, count = runs[-1]
            runs[-1] = (start, first, count + 1)
        else:
            runs.append((index, block_id, 1))
    return runs


class DecodeMirror:
    """``tensor``: ``[num_layers, 2, rows, kv_heads, capacity, head_dim]``."""

    def __init__(self, kv_cache: torch.Tensor, max_bytes: int, zero_padding: bool = True) -> None:
        """``zero_padding``: new memory is zeroed (readers read masked slots past a row's length);
        False leaves it uninitialised (every reader stops at the row's length)."""
        self.kv_cache = kv_cache  # [num_blocks, layers, 2, block_size, kv_heads, head_dim]
        _, self.num_layers, _, self.block_size, self.num_kv_heads, self.head_dim = kv_cache.shape
        self.max_bytes = max_bytes
        self.zero_padding = zero_padding
        per_layer = 2 * self.num_kv_heads * self.head_dim * kv_cache.element_size()
        self.bytes_per_token = self.num_layers * per_layer
        self.tensor = kv_cache.new_zeros((self.num_layers, 2, 0, self.num_kv_heads, 0, self.head_dim))
        self.rows: list[Sequence] = []  # rows[r] is the sequence mirrored in row r
        self.lengths: list[int] = []  # tokens of rows[r] already mirrored
        self.num_reallocations = 0

    def fits(self, num_rows: int, context_len: int) -> bool:
        """Query: would a mirror of this size stay within the byte budget."""
        return num_rows * context_len * self.bytes_per_token <= self.max_bytes

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
            if row != last:  # move the last row (its tokens, not its padding) into the hole
                length = self.lengths[last]
                self.tensor[:, :, row, :, :length] = self.tensor[:, :, last, :, :length]
                self.rows[row], self.lengths[row] = self.rows[last], self.lengths[last]
            self.rows.pop()
            self.lengths.pop()

    def _ensure_size(self, num_rows: int, context_len: int) -> None:
        _, _, rows, _, capacity, _ = self.tensor.shape
        if num_rows <= rows and context_len <= capacity:
            return
        new_rows, new_capacity = self._grown_shape(num_rows, context_len)
        shape = (self.num_layers, 2, new_rows, self.num_kv_heads, new_capacity, self.head_dim)
        grown = self.tensor.new_zeros(shape) if self.zero_padding else self.tensor.new_empty(shape)
        for row, length in enumerate(self.lengths):
            grown[:, :, row, :, :length] = self.tensor[:, :, row, :, :length]
        self.tensor = grown
        self.num_reallocations += 1

    def _grown_shape(self, num_rows: int, context_len: int) -> tuple[int, int]:
        """Rows and capacity (a multiple of the block size) for at least ``num_rows`` x ``context_len``:
        powers of two (capacity for at least 1/8 more tokens) when that stays within ``max_bytes``,
        else less headroom (rows first)."""
        size = self.block_size
        capacity = -(-_pow2_at_least(context_len + max(context_len // 8, size)) // size) * size
        exact = -(-context_len // size) * size
        for shape in ((_pow2_at_least(num_rows), capacity), (num_rows, capacity), (num_rows, exact)):
            if shape[0] * shape[1] * self.bytes_per_token <= self.max_bytes:
                return shape
        return num_rows, exact  # over the budget only by the block rounding (``fits`` held)

    def _fill(self, row: int, seq: Sequence, num_tokens: int) -> None:
        """Copy ``seq``'s first ``num_tokens`` tokens of KV, all layers, from the pool into ``row``.

        Whole blocks are copied (the last one's tail lies past the row's length: finite pool values),
        one view per run of consecutive block ids: no gathered temporary."""
        if num_tokens == 0:
            return
        size = self.block_size
        num_blocks = -(-num_tokens // size)
        # [layers, 2, kv_heads, num_blocks, block_size, head_dim] view of the row
        target = self.tensor[:, :, row, :, : num_blocks * size].unflatten(3, (num_blocks, size))
        for index, first, count in block_runs(seq.block_ids[:num_blocks]):
            source = self.kv_cache[first : first + count]  # [count, layers, 2, block_size, kv_heads, dim]
            target[:, :, :, index : index + count].copy_(source.permute(1, 2, 4, 0, 3, 5))
