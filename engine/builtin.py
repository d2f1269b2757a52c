"""The built-in model: a small Llama-shaped decoder with fixed-seed weights and a byte tokenizer.

It is the embedded default of the whole product (``pdserve serve`` with no model) and what the tests
and benchmarks run, so nothing ever needs a checkpoint or a download. ``initializer_range`` is large
(0.15 rather than 0.02) so logits are spread out and greedy argmax has no near-ties: token-exactness
tests against ``transformers`` then do not flip on float rounding.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import LlamaConfig, PreTrainedModel

BUILTIN_MODEL_ID = "pdserve-builtin-tiny"
BUILTIN_SEED = 1234
BYTE_VOCAB = 256
BOS_TOKEN_ID = 256
EOS_TOKEN_ID = 257
PAD_TOKEN_ID = 258
BUILTIN_VOCAB_SIZE = 320  # 256 bytes + BOS/EOS/PAD, padded to a multiple of 64


def builtin_hf_config() -> LlamaConfig:
    """The built-in model's ``transformers`` config (Llama, GQA 8 query heads on 4 KV heads)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=BUILTIN_VOCAB_SIZE,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        initializer_range=0.15,
        rms_norm_eps=1e-6,
        bos_token_id=BOS_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID,
        pad_token_id=PAD_TOKEN_ID,
        tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"],
    )


def build_builtin_hf_model(dtype: str = "float32") -> PreTrainedModel:
    """The built-in model as a ``transformers`` model: same weights on every machine and every call."""
    return build_seeded_hf_model(builtin_hf_config(), BUILTIN_SEED, dtype)


def build_seeded_hf_model(hf_config: object, seed: int, dtype: str = "float32") -> PreTrainedModel:
    """A ``transformers`` causal LM from a config, weights from ``seed`` (global RNG left untouched)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    model = model.to(getattr(torch, dtype))
    model.eval()
    return model
