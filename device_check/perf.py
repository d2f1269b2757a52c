"""Parts 2 and 3 of the device check: an 8B-shaped random bf16 model's decode step and 2,048-token
prefill against this run's own ceilings (device-to-device copy bandwidth, bf16 matmul rate).

Decode floor = (bytes of every weight the step reads + bytes of K/V the batch reads) / copy bandwidth,
the copy counted as bytes read plus written (METHOD.md). Prefill fraction = the forward's matmul and
attention FLOPs per second / the measured 8192^3 bf16 matmul rate. Targets (issue 17): decode <= 1.3x
the floor at batch 32 with CUDA graphs; prefill >= 50 % of the matmul peak.
"""

from __future__ import annotations

import statistics

import torch

from engine.attention import AttentionMetadata, PrefillChunk, build_decode_mask, make_attention_backend
from engine.cuda_graphs import CUDAGraphDecoder
from engine.model import CausalLM
from engine.model_config import ModelConfig

BLOCK_SIZE = 16
DECODE_BATCHES = (1, 32, 128)
PREFILL_TOKENS = 2048
DEVICE = "cuda"  # a module constant so a CPU dry run of the model code can set it


def time_ms(fn, repeats: int = 20, warmup: int = 3) -> float:
    """Median milliseconds of ``fn()`` by CUDA events, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Bytes per second of a 4 GiB device-to-device copy, counting bytes read plus written."""
    source = torch.randn(2**30, device="cuda")  # 4 GiB float32
    target = torch.empty_like(source)
    milliseconds = time_ms(lambda: target.copy_(source), repeats=10)
    return 2 * source.numel() * 4 / (milliseconds / 1e3)


def matmul_peak() -> float:
    """FLOP/s of an 8192^3 bf16 matrix product on random data (two operand sets, rotated)."""
    size = 8192
    sets = [
        (
            torch.randn(size, size, device="cuda", dtype=torch.bfloat16),
            torch.randn(size, size, device="cuda", dtype=torch.bfloat16),
        )
        for _ in range(2)
    ]
    state = {"i": 0}

    def product() -> None:
        a, b = sets[state["i"] % 2]
        state["i"] += 1
        torch.mm(a, b)

    return 2 * size**3 / (time_ms(product, repeats=10) / 1e3)


def llama_8b_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        tie_word_embeddings=False,
    )


def build_random_model(hf_config, max_positions: int) -> tuple[CausalLM, ModelConfig]:
    """The model in bf16 on CUDA with N(0, 0.02) weights and unit norms (no checkpoint)."""
    config = ModelConfig.from_hf_config(hf_config)
    device = torch.device(DEVICE)
    backend = make_attention_backend(
        "auto", device, config.num_heads, config.num_kv_heads, config.head_dim, BLOCK_SIZE
    )
    with torch.device("meta"):
        model = CausalLM(config, hf_config, backend, max_positions)
    model = model.to_empty(device=device).to(torch.bfloat16)
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.fill_(1.0)
            else:
                parameter.normal_(0.0, 0.02, generator=generator)
    model.init_rotary()
    model.eval()
    num_params = sum(p.numel() for p in model.parameters())
    print(f"8B-shaped model: backend {backend.name}, {num_params / 1e9:.2f} B params", flush=True)
    return model, config


def kv_pool(config: ModelConfig, num_blocks: int) -> torch.Tensor:
    shape = (num_blocks, config.num_layers, 2, BLOCK_SIZE, config.num_kv_heads, config.head_dim)
    return torch.randn(shape, device=DEVICE, dtype=torch.bfloat16)  # random, never zeros (METHOD.md)


def decode_meta(
    batch: int, context: int, blocks_per_seq: int, vocab_size: int
) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    """Sequence i owns blocks [i * blocks_per_seq, ...); every row decodes position ``context - 1``."""
    device = torch.device(DEVICE)
    tables = torch.arange(batch * blocks_per_seq, device=device).view(batch, blocks_per_seq)
    positions = torch.full((batch,), context - 1, dtype=torch.long, device=device)
    rows = torch.arange(batch, device=device)
    meta = AttentionMetadata(
        slot_block_ids=tables[rows, positions // BLOCK_SIZE],
        slot_offsets=positions % BLOCK_SIZE,
        num_decode_tokens=batch,
        decode_mask=build_decode_mask(positions + 1, blocks_per_seq * BLOCK_SIZE),
        prefills=[],
        decode_block_tables=tables,
        decode_context_lens=(positions + 1).to(torch.int32),
    )
    input_ids = torch.randint(0, vocab_size, (batch,), device=device)
    return input_ids, positions, meta


def weight_bytes(model: CausalLM) -> int:
    """Bytes a decode step reads: every weight but the embedding table (one row per token)."""
    embed = model.model.embed_tokens.weight
    return sum(p.numel() * p.element_size() for p in model.parameters() if p is not embed)


def _time_decode(model, graphs, pool, batch: int, context: int, blocks_per_seq: int) -> tuple[float, float]:
    """Median ms of one decode step (forward + logits), eager and replayed from the CUDA graph."""
    input_ids, positions, meta = decode_meta(batch, context, blocks_per_seq, model.config.vocab_size)

    def eager() -> None:
        model.compute_logits(model(input_ids, positions, pool, meta))

    def graphed() -> None:
        model.compute_logits(graphs.replay(input_ids, positions, meta))

    with torch.inference_mode():
        return time_ms(eager), time_ms(graphed)


def _decode_rows(model, config, context: int, bandwidth: float) -> list[str]:
    blocks_per_seq = -(-context // BLOCK_SIZE)
    pool = kv_pool(config, max(DECODE_BATCHES) * blocks_per_seq)
    graphs = CUDAGraphDecoder(model, pool, BLOCK_SIZE, blocks_per_seq, list(DECODE_BATCHES))
    graphs.capture()
    kv_bytes_per_token = config.num_layers * 2 * config.num_kv_heads * config.head_dim * 2
    lines = []
    for batch in DECODE_BATCHES:
        eager_ms, graph_ms = _time_decode(model, graphs, pool, batch, context, blocks_per_seq)
        floor_ms = (weight_bytes(model) + batch * context * kv_bytes_per_token) / bandwidth * 1e3
        verdict = "" if batch != 32 else (" MET" if graph_ms <= 1.3 * floor_ms else " MISSED (target 1.3x)")
        lines.append(
            f"decode batch {batch:3d} ctx {context}: floor {floor_ms:.2f} ms; "
            f"eager {eager_ms:.2f} ms ({eager_ms / floor_ms:.2f}x), "
            f"graphs {graph_ms:.2f} ms ({graph_ms / floor_ms:.2f}x){verdict}"
        )
        print(lines[-1], flush=True)
    return lines


def run_decode(context: int) -> list[str]:
    bandwidth = copy_bandwidth()
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write)", flush=True)
    model, config = build_random_model(llama_8b_config(), max_positions=max(context, PREFILL_TOKENS) + 16)
    lines = [f"copy bandwidth {bandwidth / 1e12:.2f} TB/s", *_decode_rows(model, config, context, bandwidth)]
    del model
    torch.cuda.empty_cache()
    return lines


def prefill_flops(config: ModelConfig, num_tokens: int) -> float:
    """Matmul FLOPs of the layers (q/k/v/o, MLP) plus causal attention (QK^T and PV), lm_head excluded."""
    hidden, kv_dim = config.hidden_size, config.num_kv_heads * config.head_dim
    per_token = 2 * (2 * hidden * hidden + 2 * hidden * kv_dim + 3 * hidden * config.intermediate_size)
    attention = 2 * 2 * (num_tokens * (num_tokens + 1) / 2) * config.num_heads * config.head_dim
    return config.num_layers * (per_token * num_tokens + attention)


def run_prefill() -> list[str]:
    peak = matmul_peak()
    print(f"bf16 matmul peak {peak / 1e12:.0f} TFLOP/s (8192^3, random)", flush=True)
    model, config = build_random_model(llama_8b_config(), max_positions=PREFILL_TOKENS + 16)
    num_blocks = PREFILL_TOKENS // BLOCK_SIZE
    pool = kv_pool(config, num_blocks)
    device = torch.device(DEVICE)
    positions = torch.arange(PREFILL_TOKENS, device=device)
    table = torch.arange(num_blocks, device=device)
    chunk = PrefillChunk(
        token_start=0, num_tokens=PREFILL_TOKENS, context_start=0, block_table=table, mask=None
    )
    meta = AttentionMetadata(
        slot_block_ids=table[positions // BLOCK_SIZE],
        slot_offsets=positions % BLOCK_SIZE,
        num_decode_tokens=0,
        decode_mask=None,
        prefills=[chunk],
    )
    input_ids = torch.randint(0, config.vocab_size, (PREFILL_TOKENS,), device=device)
    with torch.inference_mode():
        milliseconds = time_ms(lambda: model(input_ids, positions, pool, meta), repeats=10)
    achieved = prefill_flops(config, PREFILL_TOKENS) / (milliseconds / 1e3)
    fraction = achieved / peak
    verdict = "MET" if fraction >= 0.5 else "MISSED (target 50 %)"
    return [
        f"bf16 matmul peak {peak / 1e12:.0f} TFLOP/s",
        f"prefill {PREFILL_TOKENS} tokens: {milliseconds:.1f} ms, {achieved / 1e12:.0f} TFLOP/s = "
        f"{100 * fraction:.0f} % of peak {verdict}",
    ]
