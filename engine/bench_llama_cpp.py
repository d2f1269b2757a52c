"""llama.cpp as the second peer of ``python -m engine.bench``: its ``llama-batched-bench`` on the same GGUF.

``bench/peers/build_llama_cpp.sh`` builds the binary from the sources vendored in the ``llama-cpp-python``
sdist (a bench step, never part of ``make test``). ``engine.bench --llama-bench PATH`` then runs it for the
table's own rows, with the same thread count:

- ``prefill N tok``: one sequence of N random tokens (``-npp N -ntg 1 -npl 1``), its ``S_PP`` (prompt
  tokens / prompt-processing time);
- ``decode batch B``: B sequences, each with its own ``decode_prompt_len``-token prompt, then
  ``decode_tokens`` steps of one token per sequence (``-npp L -ntg T -npl B``, no shared prompt), its
  ``S_TG`` (B * T / decode time): decode only, as the engine bench's time(N) - time(1) is.

llama.cpp runs the GGUF's own quantized weights (Q4_1 for SmolLM2), pdserve and transformers the
dequantized ones in the serving dtype: the figures compare systems, not kernels on equal weights.
Each cell is the median over ``repeats`` runs of the binary (one model load each).

Otherwise llama.cpp runs with its defaults, as its users run it: weight repacking on, which on a CPU
with AMX puts Q4_1 weights in ggml's AMX buffer (its fastest CPU kernels here). Only where that path
dies of SIGILL (stock ggml built by GCC 12 loses the AMX tile config's stores, so the first tile
instruction faults; ``bench/peers/build_llama_cpp.sh`` patches that) does it fall back to
``--no-repack``, and the bench header says which ran (``probe_repack``).
"""

from __future__ import annotations

import json
import signal
import statistics
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.bench import BenchSettings

_KV_PAD = 256  # llama.cpp rounds contexts up to 256 tokens


@dataclass(frozen=True)
class BatchedBenchRow:
    """One line of ``llama-batched-bench --output-format jsonl``."""

    prompt_tokens: int  # pp
    new_tokens: int  # tg
    num_sequences: int  # pl
    prefill_tokens_per_s: float  # speed_pp
    decode_tokens_per_s: float  # speed_tg

    @classmethod
    def from_json(cls, line: str) -> BatchedBenchRow:
        row = json.loads(line)
        return cls(row["pp"], row["tg"], row["pl"], row["speed_pp"], row["speed_tg"])


def parse_jsonl(output: str) -> list[BatchedBenchRow]:
    """The result rows of a jsonl run (its other log lines are skipped)."""
    return [BatchedBenchRow.from_json(line) for line in output.splitlines() if line.startswith('{"n_kv_max"')]


def _context_for(num_sequences: int, prompt_tokens: int, new_tokens: int) -> int:
    needed = num_sequences * (prompt_tokens + new_tokens)
    return -(-needed // _KV_PAD) * _KV_PAD


@dataclass(frozen=True)
class LlamaBatchedBench:
    """``llama-batched-bench`` at ``binary`` on ``gguf`` with ``threads`` threads (prompt and decode)."""

    binary: Path
    gguf: Path
    threads: int
    timeout_s: float = 600.0
    repack: bool = True  # llama.cpp's default; False passes --no-repack (see probe_repack)

    def run(
        self, prompt_lens: tuple[int, ...], new_tokens: int, batches: tuple[int, ...]
    ) -> list[BatchedBenchRow]:
        """One run of the binary over the cross product of prompt lengths and batch sizes."""
        context = max(_context_for(b, p, new_tokens) for b in batches for p in prompt_lens)
        command = [
            str(self.binary), "-m", str(self.gguf), "-c", str(context), "-b", "2048", "-ub", "512",
            "-t", str(self.threads), "-tb", str(self.threads),
            "-npp", ",".join(map(str, prompt_lens)), "-ntg", str(new_tokens),
            "-npl", ",".join(map(str, batches)),
            "--output-format", "jsonl",
        ]  # fmt: skip
        if not self.repack:
            command.append("--no-repack")
        done = subprocess.run(command, capture_output=True, text=True, timeout=self.timeout_s, check=False)
        rows = parse_jsonl(done.stdout + done.stderr)  # results go through llama.cpp's log
        if done.returncode != 0 or len(rows) != len(prompt_lens) * len(batches):
            tail = (done.stderr or done.stdout)[-2000:]
            raise RuntimeError(
                f"llama-batched-bench failed (exit {done.returncode}, {len(rows)} rows): {tail}"
            )
        return rows

    def measure(
        self,
        prefill_lens: tuple[int, ...],
        decode_prompt_len: int,
        decode_tokens: int,
        batches: tuple[int, ...],
        repeats: int,
    ) -> dict[str, float]:
        """tokens/s per ``engine.bench`` row (``prefill N tok``, ``decode batch B``), median of repeats."""
        samples: dict[str, list[float]] = {}
        for _ in range(repeats):
            for row in self.run(prefill_lens, 1, (1,)) if prefill_lens else []:
                samples.setdefault(f"prefill {row.prompt_tokens} tok", []).append(row.prefill_tokens_per_s)
            for row in self.run((decode_prompt_len,), decode_tokens, batches) if batches else []:
                samples.setdefault(f"decode batch {row.num_sequences}", []).append(row.decode_tokens_per_s)
        return {name: statistics.median(values) for name, values in samples.items()}

    def probe_repack(self) -> bool:
        """Whether llama.cpp's default (repacked weights: AMX for Q4_1 on an AMX CPU) runs here: one tiny
        run with it; False only when that run dies of SIGILL (an unpatched ggml AMX build)."""
        command = [
            str(self.binary), "-m", str(self.gguf), "-c", str(_KV_PAD), "-t", str(self.threads),
            "-npp", "32", "-ntg", "2", "-npl", "1", "--output-format", "jsonl",
        ]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, timeout=self.timeout_s, check=False)
        return done.returncode not in (-signal.SIGILL, 128 + signal.SIGILL)


def repack_note(repack: bool) -> str:
    """How the llama.cpp column ran, for the bench header."""
    if repack:
        return "llama.cpp defaults (repacked weights: AMX where the CPU has it)"
    return "--no-repack (the repacked/AMX path died of SIGILL: unpatched ggml AMX build)"


def llama_cpp_column(
    model: str, binary: str, threads: int, settings: BenchSettings
) -> tuple[dict[str, float], str]:
    """``engine.bench``'s llama.cpp column: ``binary`` on the GGUF behind ``model`` (a GGUF file, a directory
    holding one, or a model id that resolves to one), for the rows of ``settings``; and ``repack_note``."""
    from engine.builtin import resolve_model_path
    from engine.gguf import find_gguf_file

    gguf = find_gguf_file(resolve_model_path(model))
    if gguf is None:
        raise ValueError(f"--llama-bench needs a GGUF checkpoint; {model!r} has none")
    bench = LlamaBatchedBench(Path(binary), Path(gguf), threads)
    if not bench.probe_repack():
        bench = LlamaBatchedBench(Path(binary), Path(gguf), threads, repack=False)
    figures = bench.measure(
        settings.prefill_lens,
        settings.decode_prompt_len,
        settings.decode_tokens,
        settings.batches,
        settings.repeats,
    )
    return figures, repack_note(bench.repack)
