"""Part 1 of the device check: SmolLM2-135M-Instruct on CUDA, the engine against transformers on CUDA.

float32: greedy tokens of 8 chat prompts (all in one engine batch: mixed prefill and decode, CUDA
graphs on) must equal transformers' ``generate`` token for token. bfloat16: logits of the engine's
bf16 steps against transformers' bf16 forward teacher-forced on the same tokens must stay within
``BF16_LOGITS_BOUND`` (the CPU bound of tests/engine/test_engine_gguf.py). The transformers reference is
built from the engine's own GGUF reader (bit for bit transformers' GGUF weights, a CPU test checks
that), which skips transformers' ~20 s GGUF loader.
"""

from __future__ import annotations

import os

import torch

PROMPTS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Write a haiku about the sea.",
    "What is 2 + 2?",
    "Explain what a CPU cache is in one sentence.",
    "List the first five prime numbers.",
    "Translate 'good morning' into Spanish.",
    "Why is the sky blue?",
]
NEW_TOKENS = 24
FP32_LOGITS_BOUND = 1e-4
BF16_LOGITS_BOUND = 1.5
DEVICE = "cuda"  # a module constant so a CPU dry run can set it
ENGINE_FIELDS = {"kv_cache_bytes": 256 * 2**20, "max_num_batched_tokens": 2048, "max_num_seqs": 16}


def _gguf_path(path: str | None) -> str:
    if path:
        return path
    if os.environ.get("PDSERVE_SMOLLM2_GGUF"):
        return os.environ["PDSERVE_SMOLLM2_GGUF"]
    from engine.builtin import smollm2_gguf_path

    return smollm2_gguf_path()


def _reference(path: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    from engine.gguf import load_gguf_config, read_gguf_state_dict

    hf_config = load_gguf_config(path)
    state = read_gguf_state_dict(path, hf_config)
    model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    return model.to(device=DEVICE, dtype=dtype).eval()


def _engine_run(path: str, dtype: str, prompts: list[list[int]]):
    """Greedy, stopping at EOS: per prompt (tokens, [steps, vocab] float32 logits)."""
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine
    from engine.sampling import SamplingParams

    engine = LLMEngine(EngineConfig(model=path, dtype=dtype, device=DEVICE, **ENGINE_FIELDS))
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, return_logits=True)
    for index, prompt in enumerate(prompts):
        engine.add_request(str(index), prompt, params)
    tokens: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    logits: dict[str, list[torch.Tensor]] = {str(i): [] for i in range(len(prompts))}
    while engine.has_unfinished_requests():
        for output in engine.step():
            tokens[output.request_id] += output.new_token_ids
            logits[output.request_id] += list(output.logits or [])
    return [
        (tokens[str(i)], torch.stack(logits[str(i)]).float()) for i in range(len(prompts))
    ], engine.tokenizer


def _hf_greedy(model, prompt: list[int], eos: int) -> list[int]:
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=eos, pad_token_id=eos)
    input_ids = torch.tensor([prompt], device=DEVICE)
    with torch.inference_mode():
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config)
    return out[0, len(prompt) :].tolist()  # a plain tensor without return_dict_in_generate


def _teacher_forced(model, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """transformers' logits ``[len(tokens), vocab]`` predicting each of ``tokens`` after ``prompt``."""
    ids = torch.tensor([prompt + tokens[:-1]], device=DEVICE)
    with torch.inference_mode():
        logits = model(ids).logits[0].float()
    return logits[len(prompt) - 1 :].cpu()


def _chat_prompts(tokenizer) -> list[list[int]]:
    return [tokenizer.encode_chat([{"role": "user", "content": text}]) for text in PROMPTS]


def run_exactness(gguf: str | None) -> list[str]:
    path = _gguf_path(gguf)
    from engine.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(path)
    prompts = _chat_prompts(tokenizer)
    eos = tokenizer.eos_token_id
    engine_fp32, _ = _engine_run(path, "float32", prompts)
    reference = _reference(path, torch.float32)
    same = [
        tokens == _hf_greedy(reference, prompt, eos)
        for prompt, (tokens, _) in zip(prompts, engine_fp32, strict=True)
    ]
    fp32_diff = max(
        (logits.cpu() - _teacher_forced(reference, prompt, tokens)).abs().max().item()
        for prompt, (tokens, logits) in zip(prompts, engine_fp32, strict=True)
    )
    del reference
    engine_bf16, _ = _engine_run(path, "bfloat16", prompts)
    reference = _reference(path, torch.bfloat16)
    bf16_diff = max(
        (logits.cpu() - _teacher_forced(reference, prompt, tokens)).abs().max().item()
        for prompt, (tokens, logits) in zip(prompts, engine_bf16, strict=True)
    )
    fp32_ok = all(same) and fp32_diff <= FP32_LOGITS_BOUND
    bf16_ok = bf16_diff <= BF16_LOGITS_BOUND
    return [
        f"float32: tokens identical on {sum(same)}/{len(same)} prompts ({NEW_TOKENS} new tokens or EOS), "
        f"max |logit diff| {fp32_diff:.2e} (bound {FP32_LOGITS_BOUND:g}) {'MET' if fp32_ok else 'MISSED'}",
        f"bfloat16: max |logit diff| teacher-forced {bf16_diff:.3f} (bound {BF16_LOGITS_BOUND}) "
        f"{'MET' if bf16_ok else 'MISSED'}",
    ]
