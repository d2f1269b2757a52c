"""The real model through the cluster: SmolLM2-135M-Instruct configs, chat requests, and the
transformers reference (greedy ``generate`` on the same dequantized GGUF weights, float32), computed
once per test session whichever module asks first."""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from typing import Any

from cluster.config import ClusterConfig, config_from_dict
from engine.builtin import SMOLLM2_MODEL_ID
from protos import pdserve_pb2 as pb

CHAT_PROMPTS = (
    "What is the capital of France?",
    "Name three primary colors.",
    "Write a haiku about the sea.",
    "What is 2 + 2?",
    "Give me a synonym for happy.",
    "Why is the sky blue?",
    "List two uses of a paperclip.",
    "Translate 'good morning' to Spanish.",
)
NEW_TOKENS = 64
BLOCK_SIZE = 16


def smollm2_config(changes: dict[str, Any] | None = None) -> ClusterConfig:
    """SmolLM2 in float32 (the exactness dtype; the embedded default serves bfloat16), 1 prefill + 1
    decode on fractional CPUs, one torch thread each, a 64 MiB KV pool (1,456 tokens), a free port."""
    pool = {"num_cpus": 0.25, "torch_threads": 1}
    base = config_from_dict(
        {
            "engine": {
                "model": SMOLLM2_MODEL_ID,
                "dtype": "float32",
                "kv_cache_bytes": 64 * 2**20,
                "max_num_batched_tokens": 1024,
            },
            "lease_s": 20.0,
            "prefill": dict(pool),
            "decode": dict(pool),
            "grpc": {"port": 0},
            "http": {"port": 0},
        }
    )
    return base.override(changes) if changes else base


def chat_request(
    messages: Sequence[tuple[str, str]], max_tokens: int = NEW_TOKENS, tenant: str = ""
) -> pb.GenerateRequest:
    conversation = pb.ChatMessages(messages=[pb.ChatMessage(role=r, content=c) for r, c in messages])
    return pb.GenerateRequest(messages=conversation, max_tokens=max_tokens, tenant_id=tenant)


@cache
def smollm2_tokenizer() -> Any:
    from engine.tokenizer import load_tokenizer

    return load_tokenizer(SMOLLM2_MODEL_ID)


def chat_prompt_ids(text: str) -> list[int]:
    return smollm2_tokenizer().encode_chat([{"role": "user", "content": text}])


@cache
def reference_chat_greedy() -> tuple[tuple[int, ...], ...]:
    """transformers ``generate`` of every ``CHAT_PROMPTS`` entry, greedy, ``NEW_TOKENS`` at most,
    stopping at EOS (``<|im_end|>``, the template's end of turn) as the engine does; float32."""
    import torch
    from transformers import GenerationConfig

    from tests.smollm2_reference import smollm2_hf_float32

    model = smollm2_hf_float32()
    eos = smollm2_tokenizer().eos_token_id
    config = GenerationConfig(
        max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=eos, pad_token_id=eos
    )
    answers = []
    with torch.inference_mode():
        for text in CHAT_PROMPTS:
            prompt = chat_prompt_ids(text)
            input_ids = torch.tensor([prompt])
            mask = torch.ones_like(input_ids)
            out = model.generate(input_ids, attention_mask=mask, generation_config=config)
            answers.append(tuple(out[0, len(prompt) :].tolist()))
    return tuple(answers)


def assert_matches_reference(index: int, tokens: list[int], finish: str, max_tokens: int) -> None:
    """The cluster's greedy tokens are transformers' up to where the cluster stopped, and it stopped
    for the same reason: EOS where transformers emitted it, or ``max_tokens``."""
    expected = reference_chat_greedy()[index][:max_tokens]
    assert tokens == list(expected[: len(tokens)]), f"prompt {index}: {tokens} != {list(expected)}"
    if finish == "length":
        assert len(tokens) == max_tokens, f"prompt {index}: {finish} after {len(tokens)}"
    else:
        assert finish == "eos", f"prompt {index}: {finish}"
        assert list(expected) == tokens, f"prompt {index}: eos at {len(tokens)}, transformers {len(expected)}"
