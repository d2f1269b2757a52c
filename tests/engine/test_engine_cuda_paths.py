"""The CUDA code paths, checked on CPU: modules import without CUDA or Triton, backend selection, the
CUDA-graph bucket and padding logic (the padded forward run eagerly), the Triton kernel's torch
reference against the torch backend, and ``make device-check`` refusing without a GPU."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.attention import (
    AttentionMetadata,
    PrefillChunk,
    TorchAttention,
    build_decode_mask,
    make_attention_backend,
)
from engine.cuda_graphs import CUDAGraphDecoder, bucket_for, graph_batch_sizes, pad_decode_batch
from engine.flash_attention import FlashAttention
from engine.triton_attention import HAS_TRITON, TritonAttention, paged_decode_reference, triton_supported

ROOT = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")


def test_cuda_modules_import_without_cuda_or_triton() -> None:
    import device_check.exactness
    import device_check.nixl_pull
    import device_check.perf  # noqa: F401

    assert HAS_TRITON == (importlib.util.find_spec("triton") is not None)
    assert not triton_supported(CPU, 64, 16)  # never off CUDA, whatever is installed
    assert triton_supported(torch.device("cuda"), 96, 16) is False  # head_dim not a power of two


def test_backend_selection_on_cpu() -> None:
    backend = make_attention_backend("auto", CPU, 8, 2, 64, 16)
    assert type(backend) is TorchAttention
    assert type(make_attention_backend("torch", CPU, 8, 2, 64, 16)) is TorchAttention
    for choice in ("triton", "flash_attn"):
        with pytest.raises(ValueError, match=choice):
            make_attention_backend(choice, CPU, 8, 2, 64, 16)
    with pytest.raises(ValueError, match="expected one of"):
        make_attention_backend("xformers", CPU, 8, 2, 64, 16)


def test_flash_attn_paged_only_for_256_multiples() -> None:
    assert FlashAttention(8, 2, 64, 0.125, block_size=256).is_paged
    assert not FlashAttention(8, 2, 64, 0.125, block_size=16).is_paged


def test_engine_on_cpu_uses_torch_and_no_graphs() -> None:
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine

    engine = LLMEngine(EngineConfig(kv_cache_bytes=2**20, cuda_graph_max_batch_size=8))
    assert engine.model.model.layers[0].self_attn.backend.name == "torch"
    assert engine.runner.graphs is None


def test_graph_batch_sizes_and_buckets() -> None:
    assert graph_batch_sizes(0) == []
    assert graph_batch_sizes(1) == [1]
    assert graph_batch_sizes(4) == [1, 2, 4]
    assert graph_batch_sizes(20) == [1, 2, 4, 8, 16, 20]
    sizes = graph_batch_sizes(128)
    assert sizes[:4] == [1, 2, 4, 8] and sizes[-1] == 128 and len(sizes) == 19
    assert [bucket_for(n, sizes) for n in (1, 3, 5, 9, 127, 128)] == [1, 4, 8, 16, 128, 128]
    assert bucket_for(129, sizes) is None


def test_pad_decode_batch() -> None:
    block_size = 4
    tables = torch.tensor([[5, 6, 0], [7, 8, 9]])  # row 0 has 2 blocks (padded with 0), row 1 has 3
    positions = torch.tensor([7, 9])  # row 0: block 6 offset 3 (last slot); row 1: block 9 offset 1
    padded = pad_decode_batch(torch.tensor([11, 12]), positions, tables, block_size, bucket=4, max_blocks=5)
    assert padded.input_ids.tolist() == [11, 12, 0, 0]
    assert padded.block_tables.shape == (4, 5) and padded.block_tables[:2, :3].tolist() == tables.tolist()
    assert padded.block_tables[2:].abs().sum() == 0 and padded.block_tables[:, 3:].abs().sum() == 0
    assert padded.slot_block_ids.tolist() == [6, 9, 6, 6]
    assert padded.slot_offsets.tolist() == [3, 1, 0, 0]  # padding: row 0's block, (7 + 1) % 4
    assert padded.slot_is_padding.tolist() == [False, False, True, True]
    assert padded.context_lens.tolist() == [8, 10, 1, 1]
    real = set(zip(padded.slot_block_ids[:2].tolist(), padded.slot_offsets[:2].tolist(), strict=True))
    assert (6, 0) not in real  # the padding slot is written by no real row


def _random_decode_case(seed: int, num_kv_heads: int, group: int, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    num_blocks, block_size, head_dim, batch = 24, 4, 16, 5
    layer_cache = torch.randn((num_blocks, 2, block_size, num_kv_heads, head_dim), generator=generator).to(
        dtype
    )
    lens = torch.tensor([1, 4, 5, 13, 9])
    max_blocks = -(-int(lens.max()) // block_size)
    tables = torch.stack([torch.randperm(num_blocks, generator=generator)[:max_blocks] for _ in range(batch)])
    query = torch.randn((batch, num_kv_heads * group, head_dim), generator=generator).to(dtype)
    return query, layer_cache, tables, lens


@pytest.mark.parametrize(("num_kv_heads", "group"), [(2, 2), (1, 3), (4, 1)], ids=["gqa2", "gqa3", "mha"])
def test_paged_decode_reference_matches_torch_backend(num_kv_heads: int, group: int) -> None:
    query, layer_cache, tables, lens = _random_decode_case(0, num_kv_heads, group)
    head_dim, block_size = query.shape[-1], layer_cache.shape[2]
    backend = TorchAttention(num_kv_heads * group, num_kv_heads, head_dim, head_dim**-0.5)
    meta = AttentionMetadata(
        slot_block_ids=torch.empty(0),
        slot_offsets=torch.empty(0),
        num_decode_tokens=len(query),
        decode_mask=build_decode_mask(lens, tables.shape[1] * block_size),
        prefills=[],
        decode_block_tables=tables,
    )
    expected = backend._decode(layer_cache, query, meta)
    actual = paged_decode_reference(query, layer_cache, tables, lens, head_dim**-0.5)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_triton_backend_prefill_matches_torch_on_cpu() -> None:
    """The Triton backend's prefill is torch (K/V repeated per query head): it runs on CPU too."""
    generator = torch.Generator().manual_seed(2)
    num_tokens, heads, kv_heads, head_dim = 9, 8, 2, 16
    query = torch.randn((num_tokens, heads, head_dim), generator=generator)
    key, value = (torch.randn((num_tokens, kv_heads, head_dim), generator=generator) for _ in range(2))
    chunk = PrefillChunk(0, num_tokens, 0, torch.zeros(1, dtype=torch.long), None)
    args = (torch.empty(0), query, key, value, chunk)
    expected = TorchAttention(heads, kv_heads, head_dim, 0.25)._prefill(*args)
    torch.testing.assert_close(TritonAttention(heads, kv_heads, head_dim, 0.25)._prefill(*args), expected)


def test_paged_decode_reference_bf16_close() -> None:
    query, layer_cache, tables, lens = _random_decode_case(1, 2, 4, dtype=torch.bfloat16)
    scale = query.shape[-1] ** -0.5
    exact = paged_decode_reference(query.double(), layer_cache.double(), tables, lens, scale)
    actual = paged_decode_reference(query, layer_cache, tables, lens, scale)
    error = (actual.double() - exact).norm() / exact.norm()
    assert error < 1e-2


def test_padded_decode_forward_matches_eager_and_leaves_cache() -> None:
    """What a graph replays, run eagerly on CPU: the real rows' hidden states equal the unpadded
    forward's, and padding rows change no slot of the pool."""
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine

    engine = LLMEngine(EngineConfig(kv_cache_bytes=2**20, decode_mirror_bytes=0))
    model, block_size = engine.model, engine.config.block_size
    pool = torch.randn(engine.kv_cache.shape, generator=torch.Generator().manual_seed(5))
    positions = torch.tensor([20, 47, 31])  # context lens 21, 48, 32; row 0 writes block 3 offset 4
    tables = torch.tensor([[3, 4, 0], [5, 6, 7], [8, 9, 0]])
    input_ids = torch.tensor([65, 66, 67])
    rows = torch.arange(3)
    meta = AttentionMetadata(
        slot_block_ids=tables[rows, positions // block_size],
        slot_offsets=positions % block_size,
        num_decode_tokens=3,
        decode_mask=build_decode_mask(positions + 1, tables.shape[1] * block_size),
        prefills=[],
        decode_block_tables=tables,
        decode_context_lens=(positions + 1).to(torch.int32),
    )
    original, eager_pool = pool.clone(), pool.clone()
    with torch.inference_mode():
        expected = model(input_ids, positions, eager_pool, meta)
        decoder = CUDAGraphDecoder(model, pool, block_size, max_blocks_per_seq=6, batch_sizes=[1, 8])
        size = decoder.stage(input_ids, positions, meta)
        actual = decoder._forward(size)[:3]
    assert size == 8
    # To float32 rounding: the GEMMs' blocking depends on the batch size (8 rows against 3), and CI saw
    # 1.6e-5 on a written K value; a wrong slot or row differs by O(1)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
    # The real rows wrote the same K/V (to that rounding) ...
    torch.testing.assert_close(pool, eager_pool, rtol=1e-4, atol=1e-4)
    # ... and every other slot, the padding rows' slot (block 3, offset 5) included, is untouched.
    written = torch.zeros(pool.shape[0], block_size, dtype=torch.bool)
    written[meta.slot_block_ids, meta.slot_offsets] = True
    by_slot = (0, 3, 1, 2, 4, 5)  # [num_blocks, block_size, layers, 2, kv_heads, head_dim]
    assert torch.equal(pool.permute(by_slot)[~written], original.permute(by_slot)[~written])


def test_device_check_refuses_without_cuda() -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    check = "import runpy, sys; runpy.run_module('device_check', run_name='__main__')"
    result = subprocess.run(
        [sys.executable, "-c", check], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert (
        "device-check needs a CUDA GPU; torch.cuda.is_available() is False on this machine" in result.stderr
    )


def test_device_check_imports_no_ray_and_make_target_exists() -> None:
    code = (
        "import sys; import device_check.__main__, device_check.perf, device_check.nixl_pull, "
        "device_check.exactness; assert not [m for m in sys.modules if m.split('.')[0] in ('ray', 'cluster')]"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)
    dry_run = subprocess.run(
        ["make", "-n", "device-check"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert dry_run.returncode == 0 and "-m device_check" in dry_run.stdout
