"""Shared helpers for the engine tests: small seeded models, the transformers reference, leak checks."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.builtin import build_seeded_hf_model
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.sampling import SamplingParams

VOCAB = 384


def llama_config():
    """Llama with GQA (4 query heads on 2 KV heads) and llama3 RoPE scaling."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        initializer_range=0.15,
        eos_token_id=None,
        bos_token_id=None,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 128,
        },
    )


def qwen2_config():
    """Qwen2: q/k/v bias, tied embeddings."""
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        initializer_range=0.15,
        tie_word_embeddings=True,
        eos_token_id=None,
    )


def qwen3_config():
    """Qwen3: q/k RMSNorm, explicit head_dim (q width 4 x 32 != hidden 64)."""
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=1024,
        initializer_range=0.15,
        tie_word_embeddings=False,
        eos_token_id=None,
    )


def mistral_config():
    from transformers import MistralConfig

    return MistralConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        max_position_embeddings=1024,
        sliding_window=4096,
        initializer_range=0.15,
        eos_token_id=None,
    )


MODEL_CONFIGS = {
    "llama": llama_config,
    "qwen2": qwen2_config,
    "qwen3": qwen3_config,
    "mistral": mistral_config,
}


def build_model(name: str, seed: int = 0, dtype: str = "float32"):
    return build_seeded_hf_model(MODEL_CONFIGS[name](), seed, dtype)


def make_prompts(lengths: list[int], seed: int = 0, vocab: int = VOCAB - 2) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=generator).tolist() for n in lengths]


@dataclass
class Reference:
    token_ids: list[int]
    logits: torch.Tensor  # [new_tokens, vocab] float32


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> Reference:
    """transformers generate(do_sample=False) with per-step raw logits; EOS does not stop it."""
    from transformers import GenerationConfig

    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
    )
    with torch.inference_mode():
        # An explicit all-ones mask: otherwise generate masks every prompt token equal to pad_token_id.
        input_ids = torch.tensor([prompt])
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config)
    return Reference(out.sequences[0, len(prompt) :].tolist(), torch.cat(out.logits).float())


def make_engine(hf_model=None, **overrides) -> LLMEngine:
    fields = {"kv_cache_bytes": 8 * 2**20, "max_num_batched_tokens": 1024, "max_num_seqs": 16}
    fields.update(overrides)
    return LLMEngine(EngineConfig(**fields), hf_model=hf_model)


def run_to_completion(engine: LLMEngine, max_steps: int = 100_000) -> dict[str, list[RequestOutput]]:
    """Step until idle; outputs grouped by request id."""
    outputs: dict[str, list[RequestOutput]] = {}
    for _ in range(max_steps):
        if not engine.has_unfinished_requests():
            return outputs
        for output in engine.step():
            outputs.setdefault(output.request_id, []).append(output)
    raise AssertionError("engine did not finish")


def tokens_of(outputs: list[RequestOutput]) -> list[int]:
    return [t for o in outputs for t in o.new_token_ids]


def logits_of(outputs: list[RequestOutput]) -> torch.Tensor:
    return torch.stack([logit for o in outputs for logit in (o.logits or [])])


def greedy(max_tokens: int, **kwargs) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kwargs)


def assert_pool_empty(engine: LLMEngine) -> None:
    """Leak check: no request holds a block; every block is free or cached; the pool is consistent."""
    engine.pool.check_invariants()
    stats = engine.stats()
    assert stats.num_blocks_used == 0, f"{stats.num_blocks_used} blocks still referenced"
    assert stats.num_blocks_allocatable == stats.num_blocks_total
    assert not engine.has_unfinished_requests()
    assert stats.num_running == stats.num_waiting == stats.num_pinned == 0
