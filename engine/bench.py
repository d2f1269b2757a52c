"""``python -m engine.bench``: pdserve's engine vs ``transformers`` ``generate`` on the same weights.

``--model`` names the checkpoint (default: the random built-in model; ``smollm2-135m-instruct``, a GGUF
file or a Hugging Face directory load the same weights on both sides: transformers reads a GGUF with
``from_pretrained(dir, gguf_file=...)``, dequantized like the engine), ``--dtype`` the serving dtype.

Prints one side-by-side table: prefill tokens/s at 512 and 2048 prompt tokens; decode tokens/s at
batch 1, 8 and 32. Both sides run the same weights, the same prompts (equal lengths, so transformers
needs no padding), greedy, the same dtype, on the same torch thread count, the two sides interleaved run by
run. Decode time is measured the same way on both sides: time(prompt + N new tokens) - time(prompt +
1 new token) on other prompts of the same length (no prefix-cache hit), over ``B * (N - 1)`` tokens.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import click
import torch

from engine.attention import AttentionMetadata, build_decode_mask
from engine.bench_llama_cpp import llama_cpp_column
from engine.builtin import BUILTIN_MODEL_ID, build_builtin_hf_model, resolve_model_path
from engine.config import EngineConfig
from engine.cpu_linear import PackedLinear, TransposedLinear
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


@dataclass(frozen=True)
class BenchSettings:
    """What one run measures: the command line's options but ``--threads`` (defaults live on the options)."""

    repeats: int
    decode_prompt_len: int
    decode_tokens: int
    clock: str
    breakdown_batch: int
    prefill_lens: tuple[int, ...] = (512, 2048)
    batches: tuple[int, ...] = (1, 8, 32)


def measure(sides: tuple[Side, Side], args: BenchSettings) -> dict[str, tuple[float, float]]:
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

    for length in args.prefill_lens:
        row(
            f"prefill {length} tok",
            length,
            lambda side, seed, n=length: side.generate(_prompts(1, n, seed), 1),
        )
    for batch in args.batches:

        def decode(side: Side, seed: int, b: int = batch) -> float:
            # Different prompts for the two runs: the second must not hit the first's prefix cache.
            full = side.generate(_prompts(b, args.decode_prompt_len, 1000 + seed), args.decode_tokens)
            return full - side.generate(_prompts(b, args.decode_prompt_len, 2000 + seed), 1)

        row(f"decode batch {batch}", batch * (args.decode_tokens - 1), decode)
    return results


# Where a decode step's time goes, by operator (self CPU time from torch.profiler).
_CATEGORIES = {
    "matmul (weights)": ("aten::mm", "aten::addmm", "pdserve_cpu::gemm", "mkldnn::_linear_pointwise"),
    "attention kernel": (
        "aten::_scaled_dot_product_flash_attention_for_cpu",
        "pdserve_cpu::decode_attention",
    ),
    "KV cache copies": (
        "aten::cat",
        "aten::index_put_",
        "aten::_index_put_impl_",
        "aten::index_select",
        "aten::copy_",
    ),
}
OTHER_OPS = "other torch ops"
UNTRACKED = "Python and framework"


def load_transformers_model(model: str, dtype: str) -> torch.nn.Module:
    """The transformers peer on the engine's weights: the built-in model, a GGUF file (dequantized by
    transformers' own GGUF loader) or a Hugging Face directory, in ``dtype``."""
    import os

    from transformers import AutoModelForCausalLM

    from engine.gguf import find_gguf_file

    if model == BUILTIN_MODEL_ID:
        return build_builtin_hf_model(dtype)
    path = resolve_model_path(model)
    gguf_file = find_gguf_file(path)
    torch_dtype = getattr(torch, dtype)
    if gguf_file is not None:
        directory, name = os.path.split(gguf_file)
        hf_model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
        hf_model = hf_model.to(torch_dtype)  # dequantized to float32 first, as the engine does
    else:
        hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, local_files_only=True)
    return hf_model.eval()


def categorize(op_self_ms: dict[str, float], wall_ms: float) -> dict[str, float]:
    """Operator self times (ms) -> the breakdown's rows; the time no operator accounts for is the rest."""
    rows = {name: 0.0 for name in (*_CATEGORIES, OTHER_OPS, UNTRACKED)}
    for op, ms in op_self_ms.items():
        row = next((name for name, ops in _CATEGORIES.items() if op in ops), OTHER_OPS)
        rows[row] += ms
    rows[UNTRACKED] = wall_ms - sum(op_self_ms.values())
    return rows


class _ForwardMarks:
    """Forward hooks on a side's model: each forward runs inside a ``record_function`` range, and
    whether it was a prefill forward (more tokens than sequences) is noted, in call order."""

    def __init__(self, model: torch.nn.Module, batch: int) -> None:
        self.batch = batch
        self.is_prefill: list[bool] = []
        self._open: list[Any] = []
        self._handles = [
            model.register_forward_pre_hook(self._enter, with_kwargs=True),
            model.register_forward_hook(self._exit, with_kwargs=True),
        ]

    def _enter(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        input_ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        self.is_prefill.append(input_ids.numel() > self.batch)
        marker = torch.profiler.record_function(f"bench::forward{len(self.is_prefill) - 1}")
        marker.__enter__()
        self._open.append(marker)

    def _exit(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        self._open.pop().__exit__(None, None, None)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _model_of(side: Side) -> torch.nn.Module:
    return side.engine.runner.model if isinstance(side, PdserveSide) else side.model


def step_breakdown(side: Side, batch: int, prompt_len: int, new_tokens: int) -> dict[str, float]:
    """Per decode step ms by category, over the decode steps of one run (from the end of its last
    prefill forward to its last operator), profiled with torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    marks = _ForwardMarks(_model_of(side), batch)
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            side.generate(_prompts(batch, prompt_len, 3000), new_tokens)
    finally:
        marks.remove()
    events = prof.events()
    forwards = {event.name: event for event in events if event.name.startswith("bench::forward")}
    last_prefill = max(i for i, prefill in enumerate(marks.is_prefill) if prefill)
    cut = forwards[f"bench::forward{last_prefill}"].time_range.end
    num_steps = len(marks.is_prefill) - 1 - last_prefill  # decode forwards after the cut
    op_self_ms: dict[str, float] = defaultdict(float)
    end = cut
    for event in events:
        if event.time_range.start >= cut and not event.name.startswith("bench::"):
            op_self_ms[event.name] += event.self_cpu_time_total / 1e3
            end = max(end, event.time_range.end)
    rows = categorize(op_self_ms, wall_ms=(end - cut) / 1e3)
    return {row: ms / num_steps for row, ms in rows.items()}


def print_breakdown(sides: tuple[Side, Side], args: BenchSettings) -> None:
    ours, theirs = (
        step_breakdown(side, args.breakdown_batch, args.decode_prompt_len, args.decode_tokens)
        for side in sides
    )
    print(
        f"\nms per decode step at batch {args.breakdown_batch} (torch.profiler self CPU time, so the "
        "profiler's own cost is in every row):"
    )
    print(f"| {'ms per step':<22} | {'pdserve':>8} | {'transformers':>12} |")
    print(f"|{'-' * 24}|{'-' * 10}|{'-' * 14}|")
    for row in ours:
        print(f"| {row:<22} | {ours[row]:>8.2f} | {theirs[row]:>12.2f} |")
    total_ours, total_theirs = sum(ours.values()), sum(theirs.values())
    print(f"| {'total':<22} | {total_ours:>8.2f} | {total_theirs:>12.2f} |")
    print(
        f"the weight matmuls, the same GEMMs on both sides, take {ours['matmul (weights)']:.2f} ms "
        f"(pdserve) / {theirs['matmul (weights)']:.2f} ms (transformers) of a profiled step (the 3x "
        "budget is the kernel floor's, from the unprofiled table)."
    )


def _median_ms(run: Callable[[], Any], repeats: int = 21) -> float:
    """Median of ``repeats`` calls (after two warm-up calls), in ms: the statistic of the main table."""
    run(), run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


_PROJECTIONS = (torch.nn.Linear, TransposedLinear, PackedLinear)


@torch.inference_mode()
def kernel_floor(engine: LLMEngine, batch: int, context: int) -> dict[str, float]:
    """The big kernels of one batch-``batch`` decode step, each kind run back to back with nothing
    around it (median ms of 21 runs).

    - ``weight matmuls``: every projection (and the lm_head) on a ``[batch, in]`` input, through the
      model's own modules; ``weight matmuls, oneDNN packed``: the same products with oneDNN's packed
      weights (what inductor's freezing uses on CPU), so the floor does not rest on our GEMM choice;
    - ``attention``: the engine's decode attention over ``context``-token K/V, one tensor per layer
      as in the mirror; ``KV read``: one plain read of that K/V, the least any attention kernel does.

    No norms, RoPE, KV writes, sampling, scheduling or Python between them: a step built from these
    kernels is slower than their sum.
    """
    model = engine.runner.model
    config = model.config
    generator = torch.Generator().manual_seed(0)
    projections = [m for m in model.modules() if isinstance(m, _PROJECTIONS)]
    dtype = next(model.parameters()).dtype  # the serving dtype (bfloat16 weights take bfloat16 inputs)
    inputs = [torch.randn(batch, m.weight.shape[1], generator=generator).to(dtype) for m in projections]

    def matmuls() -> None:
        for module, x in zip(projections, inputs, strict=True):
            module(x)

    packed = [torch.ops.mkldnn._reorder_linear_weight(m.weight.contiguous(), batch) for m in projections]

    def packed_matmuls() -> None:
        for weight, x in zip(packed, inputs, strict=True):
            torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")

    backend = model.model.layers[0].self_attn.backend
    kv_shape = (batch, config.num_kv_heads, context, config.head_dim)
    caches = [
        tuple(torch.randn(kv_shape, generator=generator).to(dtype) for _ in "kv")
        for _ in range(config.num_layers)
    ]
    query = torch.randn(batch, config.num_heads, config.head_dim, generator=generator).to(dtype)
    meta = AttentionMetadata(
        slot_block_ids=torch.empty(0),
        slot_offsets=torch.empty(0),
        num_decode_tokens=batch,
        decode_mask=build_decode_mask(torch.full((batch,), context), context),
        prefills=[],
    )

    def attention() -> None:
        for keys, values in caches:
            backend.attend_decode(query, keys, values, meta)

    def read_kv() -> None:  # what any attention kernel must at least do: read every K and V once
        for keys, values in caches:
            keys.sum(), values.sum()

    return {
        "projections": float(len(projections)),
        "weight matmuls": _median_ms(matmuls),
        "weight matmuls, oneDNN packed": _median_ms(packed_matmuls),
        "attention": _median_ms(attention),
        "KV read": _median_ms(read_kv),
    }


def print_kernel_floor(engine: LLMEngine, theirs_tokens_per_s: float, args: BenchSettings) -> None:
    batch, context = 32, args.decode_prompt_len + args.decode_tokens // 2
    floor = kernel_floor(engine, batch, context)
    matmul_ms, attention_ms, read_ms = floor["weight matmuls"], floor["attention"], floor["KV read"]
    fastest_matmul_ms = min(matmul_ms, floor["weight matmuls, oneDNN packed"])
    theirs_ms = batch / theirs_tokens_per_s * 1e3
    print(
        f"\nkernel floor at batch {batch}, {context}-token contexts (median of 21 runs, nothing else "
        f"in the step): {int(floor['projections'])} weight matmuls {matmul_ms:.2f} ms (oneDNN packed: "
        f"{floor['weight matmuls, oneDNN packed']:.2f} ms), decode attention {attention_ms:.2f} ms, "
        f"reading that K/V once {read_ms:.2f} ms."
    )
    print(
        f"transformers' decode step is {theirs_ms:.2f} ms, so 3x needs {theirs_ms / 3:.2f} ms. A step of "
        f"only our matmuls and attention would be {theirs_ms / (matmul_ms + attention_ms):.2f}x; of only "
        f"the fastest matmuls and an attention as fast as reading the K/V once, "
        f"{theirs_ms / (fastest_matmul_ms + read_ms):.2f}x."
    )


def _set_omp_wait_policy(policy: str | None) -> None:
    """Re-execute this bench with ``OMP_WAIT_POLICY=policy`` when it differs: libgomp reads it once,
    when torch loads it, so it cannot change in a running process."""
    if policy is None or os.environ.get("OMP_WAIT_POLICY", "").lower() == policy:
        return
    os.environ["OMP_WAIT_POLICY"] = policy
    os.execv(sys.executable, [sys.executable, "-m", "engine.bench", *sys.argv[1:]])


def _int_list(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, ...]:
    try:
        numbers = tuple(int(part) for part in value.split(",") if part.strip())
    except ValueError:
        raise click.BadParameter(f"comma-separated integers, got {value!r}") from None
    if any(number <= 0 for number in numbers):
        raise click.BadParameter(f"every number must be > 0, got {value!r}")
    return numbers


@click.command(help="pdserve's engine vs transformers generate on the same weights (one table).")
@click.option(
    "--model",
    default=BUILTIN_MODEL_ID,
    show_default=True,
    help="model id (smollm2-135m-instruct), a .gguf file or a Hugging Face directory",
)
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True)
@click.option("--threads", type=int, default=None, help="torch threads (default: torch's)")
@click.option("--repeats", type=int, default=3, show_default=True)
@click.option("--decode-prompt-len", type=int, default=128, show_default=True)
@click.option("--decode-tokens", type=int, default=64, show_default=True)
@click.option("--batches", default="1,8,32", show_default=True, callback=_int_list, help="decode batch sizes")
@click.option(
    "--prefill-lens", default="512,2048", show_default=True, callback=_int_list, help="prefill prompt lengths"
)
@click.option(
    "--clock",
    type=click.Choice(sorted(_CLOCKS)),
    default="wall",
    show_default=True,
    help="wall: elapsed time; cpu: this process's CPU time (steadier on a shared machine, 1 thread)",
)
@click.option(
    "--breakdown-batch",
    type=int,
    default=32,
    show_default=True,
    help="also profile one decode run per side at this batch and print where a step goes (0: off)",
)
@click.option(
    "--llama-bench",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="llama-batched-bench binary (bench/peers/build_llama_cpp.sh): llama.cpp on the same GGUF, a column",
)
@click.option(
    "--omp-wait",
    type=click.Choice(["active", "passive"]),
    default=None,
    help="OpenMP threads' wait policy (OMP_WAIT_POLICY; the bench re-executes itself to set it). passive: "
    "on a machine with more runnable jobs than cores, torch's spinning threads otherwise slow every "
    "parallel region (docs/benchmarks.md, engine section)",
)
def main(
    model: str, dtype: str, threads: int | None, llama_bench: str | None, omp_wait: str | None, **options: Any
) -> None:
    _set_omp_wait_policy(omp_wait)
    if threads:
        torch.set_num_threads(threads)
    args = BenchSettings(**options)
    config = EngineConfig(
        model=model, dtype=dtype, kv_cache_bytes=512 * 2**20, max_num_batched_tokens=2048, max_num_seqs=64
    )
    engine = LLMEngine(config)
    hf_model = load_transformers_model(model, dtype)
    sides = (PdserveSide(engine, _CLOCKS[args.clock]), TransformersSide(hf_model, _CLOCKS[args.clock]))
    for side in sides:
        side.generate(_prompts(2, 64, 7), 4)  # warm-up
    results = measure(sides, args)
    llama, llama_note = {}, ""
    if llama_bench is not None:
        llama, llama_note = llama_cpp_column(model, llama_bench, torch.get_num_threads(), args)
    print(
        f"engine bench: {model} {engine.layout_fingerprint()}, {dtype}, torch threads "
        f"{torch.get_num_threads()}, {args.clock} clock, decode = {args.decode_prompt_len}-token prompts"
        f" + {args.decode_tokens} new tokens, median of {args.repeats} (sides interleaved)"
        + (f", llama.cpp: the GGUF's quantized weights, same threads, run after; {llama_note}" * bool(llama))
    )
    print(
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset: active spin)')}, load average "
        f"{' / '.join(f'{x:.1f}' for x in os.getloadavg())} at the end, bf16 CPU kernels "
        f"{'on' if engine.runner.model.kernels is not None else 'off'}"
    )
    peer = f" {'llama.cpp':>10} | {'vs llama':>8} |" if llama else ""
    print(f"| {'tokens/s':<18} | {'pdserve':>10} | {'transformers':>12} | {'ratio':>6} |" + peer)
    print(f"|{'-' * 20}|{'-' * 12}|{'-' * 14}|{'-' * 8}|" + (f"{'-' * 12}|{'-' * 10}|" if llama else ""))
    for name, (ours, theirs) in results.items():
        peer = f" {llama[name]:>10.0f} | {ours / llama[name]:>7.2f}x |" if name in llama else ""
        print(f"| {name:<18} | {ours:>10.0f} | {theirs:>12.0f} | {ours / theirs:>5.2f}x |" + peer)
    if "decode batch 32" in results:
        print_kernel_floor(engine, results["decode batch 32"][1], args)
    if args.breakdown_batch:
        print_breakdown(sides, args)


if __name__ == "__main__":
    main(prog_name="python -m engine.bench")
