"""Acceptance 2: a save_pretrained checkpoint (with tokenizer) loads from its directory, same tokens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.model_config import UnsupportedModelError
from engine.tokenizer import ByteTokenizer
from tests.engine.engine_helpers import (
    VOCAB,
    assert_pool_empty,
    build_model,
    greedy,
    hf_greedy,
    logits_of,
    run_to_completion,
    tokens_of,
)

TEXT = "the quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun"


def _tokenizer():
    """A small word-level HF tokenizer built in memory (nothing downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted(set(TEXT.split()))
    vocab = {"<unk>": 0, "<eos>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>")


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_saved_checkpoint_loads_and_matches(tmp_path: Path, name: str) -> None:
    model = build_model(name, seed=3)
    model.save_pretrained(tmp_path, max_shard_size="100KB")  # sharded safetensors
    _tokenizer().save_pretrained(tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    engine = LLMEngine(EngineConfig(model=str(tmp_path), kv_cache_bytes=2**20))
    prompt = engine.tokenizer.encode(TEXT)
    assert engine.tokenizer.decode(prompt) == TEXT
    engine.add_request("r", prompt, greedy(32, return_logits=True))
    outputs = run_to_completion(engine)["r"]
    reference = hf_greedy(model, prompt, 32)
    assert tokens_of(outputs) == reference.token_ids
    assert (logits_of(outputs) - reference.logits).abs().max().item() <= 1e-4
    assert engine.layout_fingerprint().startswith(tmp_path.name + "@")
    assert_pool_empty(engine)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_checkpoint_runs_close_to_transformers(tmp_path: Path, dtype: str) -> None:
    """Half precision: prefill and 8 decode steps, each step's logits close to transformers' forward over
    the same tokens in the same dtype (token-exactness is not expected at this precision)."""
    model = build_model("llama", seed=3, dtype=dtype)
    model.save_pretrained(tmp_path)
    engine = LLMEngine(
        EngineConfig(model=str(tmp_path), dtype=dtype, kv_cache_bytes=2**20), tokenizer=ByteTokenizer()
    )
    assert engine.kv_cache.dtype == getattr(torch, dtype)
    prompt = list(range(3, 60))
    engine.add_request("r", prompt, greedy(8, return_logits=True))
    outputs = run_to_completion(engine)["r"]
    ours = logits_of(outputs)  # [8, vocab]
    with torch.inference_mode():
        full = torch.tensor([prompt + tokens_of(outputs)])
        theirs = model(full).logits[0, len(prompt) - 1 : -1].float()
    assert (ours - theirs).abs().max().item() <= 0.05 * theirs.abs().max().item()
    assert_pool_empty(engine)


def test_unsupported_architecture_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    )
    with pytest.raises(UnsupportedModelError, match="unsupported architecture"):
        LLMEngine(EngineConfig(model=str(tmp_path)))


def test_missing_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        LLMEngine(EngineConfig(model=str(tmp_path / "nope")))


def test_vocab_is_checked() -> None:
    engine = LLMEngine(EngineConfig(kv_cache_bytes=2**20), hf_model=build_model("llama"))
    with pytest.raises(ValueError, match="prompt_token_ids"):
        engine.add_request("r", [VOCAB], greedy(1))
    assert_pool_empty(engine)
