"""DecodeMirror against the pool it copies: rows hold exactly the pool's KV after joins, growth, row moves
and appended tokens; a long join reallocates once; growth stays within the byte budget."""

from __future__ import annotations

import torch

from engine.decode_mirror import DecodeMirror, block_runs
from engine.sampling import SamplingParams
from engine.sequence import Sequence

LAYERS, BLOCK, KV_HEADS, DIM = 2, 4, 2, 8


def _pool(num_blocks: int = 64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(num_blocks, LAYERS, 2, BLOCK, KV_HEADS, DIM, generator=generator)


def _seq(name: str, block_ids: list[int]) -> Sequence:
    return Sequence(name, [0], 1, SamplingParams(), 0, block_ids=block_ids)


def _pool_kv(pool: torch.Tensor, seq: Sequence, num_tokens: int) -> torch.Tensor:
    """The reference: ``[layers, 2, kv_heads, num_tokens, dim]`` read token by token from the pool."""
    tokens = [pool[seq.block_ids[p // BLOCK], :, :, p % BLOCK] for p in range(num_tokens)]
    return torch.stack(tokens, dim=3)  # each [layers, 2, kv_heads, dim]


def _step(mirror: DecodeMirror, pool: torch.Tensor, lengths: dict[Sequence, int]) -> list[Sequence]:
    """One decode step as the model runs it: prepare, then the new token's K/V into pool and mirror."""
    seqs = list(lengths)
    order = mirror.prepare(seqs, [lengths[s] + 1 for s in seqs])
    for row, seq in enumerate(order):
        position = lengths[seq]
        new = torch.randn(LAYERS, 2, KV_HEADS, DIM)
        pool[seq.block_ids[position // BLOCK], :, :, position % BLOCK] = new
        mirror.tensor[:, :, row, :, position] = new
        lengths[seq] += 1
    for row, seq in enumerate(order):
        assert torch.equal(mirror.tensor[:, :, row, :, : lengths[seq]], _pool_kv(pool, seq, lengths[seq]))
    return order


def test_rows_equal_the_pool_through_a_long_join_moves_and_growth() -> None:
    pool = _pool()
    mirror = DecodeMirror(pool, max_bytes=2**20, zero_padding=False)
    a, b = _seq("a", [7, 3, 15, 16, 17]), _seq("b", [20, 21, 22, 23, 24])
    lengths = {a: 5, b: 6}
    for _ in range(3):
        _step(mirror, pool, lengths)
    before = mirror.num_reallocations
    # 15 blocks for 59 tokens in runs of several lengths, and 3 more blocks to grow into
    long = _seq("long", [40, 41, 42, 9, 30, 31, 2, 50, 51, 52, 53, 11, 12, 13, 60, 61, 62, 63])
    lengths[long] = 59
    for _ in range(9):  # the join, then 8 tokens across block boundaries
        _step(mirror, pool, lengths)
    assert mirror.num_reallocations == before + 1  # one reallocation for the join, none as it grows
    del lengths[a]  # a leaves: the last row moves into its hole
    assert _step(mirror, pool, lengths)[0] is long


def test_a_grown_mirror_stays_within_the_budget() -> None:
    pool = _pool()
    mirror = DecodeMirror(pool, max_bytes=0, zero_padding=True)
    per_token = mirror.bytes_per_token
    for num_rows, context in ((3, 40), (5, 90), (2, 250)):
        mirror.clear()
        mirror.max_bytes = num_rows * context * per_token  # exactly what fits() allows
        seqs = [_seq(f"s{i}", list(range(64))) for i in range(num_rows)]
        mirror.prepare(seqs, [context] * num_rows)
        _, _, rows, _, capacity, _ = mirror.tensor.shape
        assert rows >= num_rows and capacity >= context and capacity % BLOCK == 0
        assert rows * capacity * per_token <= num_rows * (context + BLOCK - 1) * per_token


def test_block_runs() -> None:
    assert block_runs([4, 5, 6, 1, 9, 10]) == [(0, 4, 3), (3, 1, 1), (4, 9, 2)]
    assert block_runs([]) == []
