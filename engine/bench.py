"""``python -m engine.bench``: pdserve's engine vs ``transformers`` ``generate`` on the built-in model.

Prints one side-by-side table: prefill tokens/s at 512 and 2048 prompt tokens; decode tokens/s at
batch 1, 8 and 32. Both sides run the same weights, the same prompts (equal lengths, so transformers
needs no padding), greedy, float32, on the same torch thread count. Decode time is measured the same
way on both sides: time(prompt + N new tokens) - time(prompt + 1 new token), over ``B * (N - 1)`` tokens.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from engine.builtin import build_builtin_hf_model
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling import SamplingParams


def _prompts(batch: int, length: int, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, length), generator=generator).tolist()


def _best_of(repeats: int, run: Callable[[int], float]) -> float:
    """Median of ``repeats`` timed runs (each run gets a fresh seed, so no prefix-cache hits)."""
    return statistics.median(run(seed) for seed in range(repeats))


class PdserveSide:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.counter = 0

    def generate(self, prompts: list[list[int]], new_tokens: int) -> float:
        engine = self.engine
        params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
        start = time.perf_counter()
        for prompt in prompts:
            self.counter += 1
            engine.add_request(f"bench-{self.counter}", prompt, params)
        while engine.has_unfinished_requests():
            engine.step()
        return time.perf_counter() - start


class TransformersSide:
    def __init__(self, model: torch.nn.Module) -> None:
        from transformers import GenerationConfig

        self.model = model
        self.config = GenerationConfig(do_sample=False, eos_token_id=None, pad_token_id=0)

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], new_tokens: int) -> float:
        input_ids = torch.tensor(prompts)
        start = time.perf_counter()
        self.model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            generation_config=self.config,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
        )
        return time.perf_counter() - start


def measure(side: PdserveSide | TransformersSide, args: argparse.Namespace) -> dict[str, float]:
    """tokens/s for each table row."""
    results = {}
    for length in (512, 2048):
        seconds = _best_of(args.repeats, lambda seed, n=length: side.generate(_prompts(1, n, 100 + seed), 1))
        results[f"prefill {length} tok"] = length / seconds
    for batch in (1, 8, 32):

        def decode(seed: int, b: int = batch) -> float:
            prompts = _prompts(b, args.decode_prompt_len, 1000 + seed)
            return side.generate(prompts, args.decode_tokens) - side.generate(prompts, 1)

        seconds = _best_of(args.repeats, decode)
        results[f"decode batch {batch}"] = batch * (args.decode_tokens - 1) / seconds
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decode-prompt-len", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=64)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    engine = LLMEngine(EngineConfig(kv_cache_bytes=512 * 2**20, max_num_batched_tokens=2048, max_num_seqs=64))
    hf_model = build_builtin_hf_model()
    side_ours, side_hf = PdserveSide(engine), TransformersSide(hf_model)
    side_ours.generate(_prompts(2, 64, 7), 4)  # warm-up both
    side_hf.generate(_prompts(2, 64, 7), 4)
    ours, theirs = measure(side_ours, args), measure(side_hf, args)
    print(
        f"engine bench: built-in model {engine.layout_fingerprint()}, float32, torch threads "
        f"{torch.get_num_threads()}, decode = {args.decode_prompt_len}-token prompts + "
        f"{args.decode_tokens} new tokens, median of {args.repeats}"
    )
    print(f"| {'tokens/s':<18} | {'pdserve':>10} | {'transformers':>12} | {'ratio':>6} |")
    print(f"|{'-' * 20}|{'-' * 12}|{'-' * 14}|{'-' * 8}|")
    for row, value in ours.items():
        print(f"| {row:<18} | {value:>10.0f} | {theirs[row]:>12.0f} | {value / theirs[row]:>5.2f}x |")


if __name__ == "__main__":
    main()
