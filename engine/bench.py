"""``python -m engine.bench``: pdserve's engine vs ``transformers`` ``generate`` on the built-in model.

Prints one side-by-side table: prefill tokens/s at 512 and 2048 prompt tokens; decode tokens/s at
batch 1, 8 and 32. Both sides run the same weights, the same prompts (equal lengths, so transformers
needs no padding), greedy, float32, on the same torch thread count, the two sides interleaved run by
run. Decode time is measured the same way on both sides: time(prompt + N new tokens) - time(prompt +
1 new token) on other prompts of the same length (no prefix-cache hit), over ``B * (N - 1)`` tokens.
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


_CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


class PdserveSide:
    def __init__(self, engine: LLMEngine, clock: Callable[[], float]) -> None:
        self.engine = engine
        self.clock = clock
        self.counter = 0

    def generate(self, prompts: list[list[int]], new_tokens: int) -> float:
        engine = self.engine
        params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
        start = self.clock()
        for prompt in prompts:
            self.counter += 1
            engine.add_request(f"bench-{self.counter}", prompt, params)
        while engine.has_unfinished_requests():
            engine.step()
        return self.clock() - start


class TransformersSide:
    def __init__(self, model: torch.nn.Module, clock: Callable[[], float]) -> None:
        self.model = model
        self.clock = clock

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], new_tokens: int) -> float:
        from transformers import GenerationConfig

        config = GenerationConfig(
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
        )
        input_ids = torch.tensor(prompts)
        start = self.clock()
        self.model.generate(input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config)
        return self.clock() - start


Side = PdserveSide | TransformersSide


def measure(sides: tuple[Side, Side], args: argparse.Namespace) -> dict[str, tuple[float, float]]:
    """Per table row, tokens/s of both sides: median over repeats, the two sides interleaved run by run
    (so load from other jobs on a shared machine hits both alike); fresh prompts each repeat."""
    results: dict[str, tuple[float, float]] = {}

    def row(name: str, num_tokens: int, run: Callable[[Side, int], float]) -> None:
        times: tuple[list[float], list[float]] = ([], [])
        for seed in range(args.repeats):
            for index, side in enumerate(sides):
                times[index].append(run(side, seed))
        ours, theirs = (num_tokens / statistics.median(t) for t in times)
        results[name] = (ours, theirs)

    for length in (512, 2048):
        row(
            f"prefill {length} tok",
            length,
            lambda side, seed, n=length: side.generate(_prompts(1, n, seed), 1),
        )
    for batch in (1, 8, 32):

        def decode(side: Side, seed: int, b: int = batch) -> float:
            # Different prompts for the two runs: the second must not hit the first's prefix cache.
            full = side.generate(_prompts(b, args.decode_prompt_len, 1000 + seed), args.decode_tokens)
            return full - side.generate(_prompts(b, args.decode_prompt_len, 2000 + seed), 1)

        row(f"decode batch {batch}", batch * (args.decode_tokens - 1), decode)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decode-prompt-len", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument(
        "--clock",
        choices=sorted(_CLOCKS),
        default="wall",
        help="wall: elapsed time; cpu: this process's CPU time (steadier on a shared machine, 1 thread)",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    engine = LLMEngine(EngineConfig(kv_cache_bytes=512 * 2**20, max_num_batched_tokens=2048, max_num_seqs=64))
    hf_model = build_builtin_hf_model()
    clock = _CLOCKS[args.clock]
    sides = (PdserveSide(engine, clock), TransformersSide(hf_model, clock))
    for side in sides:
        side.generate(_prompts(2, 64, 7), 4)  # warm-up
    results = measure(sides, args)
    print(
        f"engine bench: built-in model {engine.layout_fingerprint()}, float32, torch threads "
        f"{torch.get_num_threads()}, {args.clock} clock, decode = {args.decode_prompt_len}-token prompts"
        f" + {args.decode_tokens} new tokens, median of {args.repeats} (sides interleaved)"
    )
    print(f"| {'tokens/s':<18} | {'pdserve':>10} | {'transformers':>12} | {'ratio':>6} |")
    print(f"|{'-' * 20}|{'-' * 12}|{'-' * 14}|{'-' * 8}|")
    for name, (ours, theirs) in results.items():
        print(f"| {name:<18} | {ours:>10.0f} | {theirs:>12.0f} | {ours / theirs:>5.2f}x |")


if __name__ == "__main__":
    main()
