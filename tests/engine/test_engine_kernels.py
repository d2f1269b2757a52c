"""The bf16 CPU kernels (engine/csrc/bf16_kernels.cpp) against torch references, and the engine's
kernel path against its torch path. Skipped, with the reason, on a CPU without AVX512-BF16 (the
kernels are never used there: the engine takes the torch path)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import engine.cpu_linear as cpu_linear
from engine.attention import build_decode_mask
from engine.cpu_linear import PackedLinear, load_kernels, pack_weight, unpack_weight
from engine.model import RMSNorm
from engine.rope import apply_rotary
from tests.engine.engine_helpers import make_engine, run_to_completion

kernels = load_kernels()
pytestmark = pytest.mark.skipif(kernels is None, reason="no AVX512-BF16 on this CPU (or no compiler)")

BF16_ULP = 2.0**-8  # relative spacing of bf16 values: one rounding of the output


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 33])
@pytest.mark.parametrize(("out_features", "in_features"), [(160, 64), (200, 96), (24, 1536)])
def test_packed_linear_matches_float32_reference(rows: int, out_features: int, in_features: int) -> None:
    """Kernel rows (<= 4) and oneDNN rows (> 4): within one bf16 rounding of the float32 product
    (the kernel accumulates in float32 and rounds once); out_features not a multiple of 16 included."""
    weight, bias = _randn(out_features, in_features, seed=1), _randn(out_features, seed=2)
    x = _randn(rows, in_features, seed=3)
    layer = PackedLinear([weight[:10], weight[10:]], [bias[:10], bias[10:]], kernels)
    assert torch.equal(layer.weight, weight)
    reference = x.float() @ weight.float().t()
    product = layer(x) - bias  # the kernel's own rounding, then the bias add's
    scale = reference.abs().max().item()
    assert (product.float() - reference).abs().max().item() <= 3 * BF16_ULP * scale


def test_pack_roundtrip_pads_rows() -> None:
    weight = _randn(37, 10)
    packed = pack_weight(weight)
    assert packed.shape == (3, 5, 32)
    assert torch.equal(unpack_weight(packed, 37), weight)


@pytest.mark.parametrize("with_delta", [False, True])
def test_add_rmsnorm_is_transformers_rmsnorm(with_delta: bool) -> None:
    residual, delta = _randn(5, 576, seed=4) * 3, _randn(5, 576, seed=5)
    norm = RMSNorm(576, 1e-5)
    norm.weight.data = _randn(576, seed=6).float().to(torch.bfloat16)
    expected_residual = residual + delta if with_delta else residual.clone()
    expected = norm(expected_residual)
    out = kernels.add_rmsnorm(residual, delta if with_delta else None, norm.weight.data, 1e-5)
    assert torch.equal(residual, expected_residual)  # updated in place, rounded as torch's add
    # only the float32 sum of squares is ordered differently: at most one bf16 step apart
    assert _max_diff(out, expected) <= BF16_ULP * expected.float().abs().max().item()


def test_silu_mul_is_torch_silu_times_up() -> None:
    gate_up = _randn(3, 2 * 1536, seed=7) * 4
    expected = F.silu(gate_up[:, :1536]) * gate_up[:, 1536:]
    out = kernels.silu_mul(gate_up)
    assert _max_diff(out, expected) <= BF16_ULP * expected.float().abs().max().item()


def _rope_tables(positions: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    freqs = torch.arange(positions).float()[:, None] * inv_freq[None]
    table = torch.cat((freqs, freqs), dim=-1)
    return table.cos().to(torch.bfloat16), table.sin().to(torch.bfloat16)


def test_rope_store_rotates_and_writes_pool_and_mirror() -> None:
    heads, kv_heads, dim, tokens = 6, 2, 64, 5
    cos, sin = _rope_tables(64, dim)
    positions = torch.tensor([3, 17, 40, 0, 63])
    qkv = _randn(tokens, (heads + 2 * kv_heads) * dim, seed=8)
    q = qkv[:, : heads * dim].reshape(tokens, heads, dim)
    k = qkv[:, heads * dim : (heads + kv_heads) * dim].reshape(tokens, kv_heads, dim)
    v = qkv[:, (heads + kv_heads) * dim :].reshape(tokens, kv_heads, dim).clone()
    expected_q, expected_k = (apply_rotary(x, cos[positions, None], sin[positions, None]) for x in (q, k))
    pool = torch.zeros(8, 3, 2, 16, kv_heads, dim, dtype=torch.bfloat16)  # [blocks, layers, 2, block, kv, D]
    mirror = torch.zeros(3, 2, 4, kv_heads, 64, dim, dtype=torch.bfloat16)  # [layers, 2, rows, kv, cap, D]
    blocks, offsets = torch.tensor([1, 2, 5, 7, 0]), positions % 16
    kernels.rope_store(qkv, cos, sin, positions, heads, kv_heads, pool[:, 1], blocks, offsets, mirror[1], 3)
    q_width = heads * dim
    assert torch.equal(qkv[:, :q_width].reshape(tokens, heads, dim), expected_q)
    assert torch.equal(qkv[:, q_width : q_width + kv_heads * dim].reshape(tokens, kv_heads, dim), expected_k)
    assert torch.equal(pool[blocks, 1, 0, offsets], expected_k)
    assert torch.equal(pool[blocks, 1, 1, offsets], v)
    rows = torch.arange(3)
    assert torch.equal(mirror[1, 0, rows, :, positions[:3]], expected_k[:3])
    assert torch.equal(mirror[1, 1, rows, :, positions[:3]], v[:3])
    assert pool[:, (0, 2)].abs().sum() == 0 and mirror[(0, 2),].abs().sum() == 0  # other layers untouched


@pytest.mark.parametrize("lengths", [[1, 5, 33], [200, 17, 64]])
def test_decode_attention_matches_sdpa(lengths: list[int]) -> None:
    heads, kv_heads, dim, capacity = 9, 3, 64, 256
    batch = len(lengths)
    qkv = _randn(batch, (heads + 2 * kv_heads) * dim, seed=9)
    mirror = _randn(2, batch, kv_heads, capacity, dim, seed=10)
    positions = torch.tensor(lengths) - 1
    out = kernels.decode_attention(qkv, mirror, positions, heads, kv_heads, dim**-0.5)
    context = max(lengths)
    query = qkv[:, : heads * dim].float().view(batch, kv_heads, heads // kv_heads, dim)
    expected = F.scaled_dot_product_attention(
        query,
        mirror[0, :, :, :context].float(),
        mirror[1, :, :, :context].float(),
        attn_mask=build_decode_mask(positions + 1, context),
        scale=dim**-0.5,
    ).reshape(batch, heads * dim)
    torch.testing.assert_close(out.float(), expected, rtol=BF16_ULP, atol=1e-3)


@pytest.mark.parametrize("decode_mirror_bytes", [0, 64 * 2**20])
def test_engine_kernel_path_matches_torch_path_first_token_and_logits(
    decode_mirror_bytes: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The built-in model in bf16, kernels vs torch path (prefill chunks, mixed steps, decode on the
    mirror and on the gather path): first tokens equal, logits of every step within the bf16 noise
    both paths have against float32 while their tokens agree."""
    from engine.sampling import SamplingParams

    def run() -> dict[str, list]:
        engine = make_engine(
            None, dtype="bfloat16", max_num_batched_tokens=48, decode_mirror_bytes=decode_mirror_bytes
        )
        params = SamplingParams(max_tokens=6, ignore_eos=True, return_logits=True)
        prompts = [[(7 * i + j) % 250 for j in range(20 + 9 * i)] for i in range(5)]
        for i, prompt in enumerate(prompts):
            engine.add_request(f"r{i}", prompt, params)
        return {"kernels": engine.model.kernels is not None, "outputs": run_to_completion(engine)}

    fast = run()
    monkeypatch.setattr(cpu_linear, "kernels_apply", lambda model, dtype: False)
    slow = run()
    assert fast["kernels"] and not slow["kernels"]
    for request_id, outputs in slow["outputs"].items():
        ours = fast["outputs"][request_id]
        assert ours[0].new_token_ids == outputs[0].new_token_ids
        for mine, theirs in zip(ours, outputs, strict=True):
            if mine.new_token_ids != theirs.new_token_ids:
                break  # a near-tie went the other way: later steps see other tokens
            assert (mine.logits[0] - theirs.logits[0]).abs().max().item() < 0.5


def test_one_call_decode_step_is_the_per_layer_kernels_bit_for_bit(monkeypatch: pytest.MonkeyPatch) -> None:
    """``decode_layers`` (every layer of a 1-4 token decode step in one C++ call) against the same
    kernels called layer by layer: the same tokens, logits and KV pool bytes, and it did run."""
    from engine.sampling import SamplingParams

    def run(one_call: bool) -> tuple[dict[str, list], torch.Tensor, int]:
        engine = make_engine(
            None, dtype="bfloat16", decode_mirror_bytes=16 * 2**20, enable_prefix_caching=False
        )
        model = engine.model
        assert model.decode_weights is not None
        if not one_call:
            model.decode_weights = None
        calls = []
        original = model._decode_layers
        monkeypatch.setattr(model, "_decode_layers", lambda *args: calls.append(1) or original(*args))
        params = SamplingParams(max_tokens=5, ignore_eos=True, return_logits=True)
        for i in range(4):  # decode batches 4, 3, 2, 1 as the requests finish
            engine.add_request(f"r{i}", [(5 * i + j) % 250 for j in range(9 + 11 * i)], params)
            params = SamplingParams(max_tokens=5 + 2 * (i + 1), ignore_eos=True, return_logits=True)
        return run_to_completion(engine), engine.kv_cache.clone(), len(calls)

    (fast, fast_pool, fast_calls), (slow, slow_pool, slow_calls) = run(True), run(False)
    assert fast_calls >= 10 and slow_calls == 0
    assert torch.equal(fast_pool, slow_pool)
    for request_id, outputs in slow.items():
        ours = fast[request_id]
        assert [o.new_token_ids for o in ours] == [o.new_token_ids for o in outputs]
        assert all(torch.equal(a.logits[0], b.logits[0]) for a, b in zip(ours, outputs, strict=True))
