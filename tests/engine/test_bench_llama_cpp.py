"""engine.bench_llama_cpp: the jsonl rows of llama-batched-bench are read into the engine bench's rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.bench_llama_cpp import LlamaBatchedBench, parse_jsonl


def _line(pl: int, speed_tg: float) -> str:
    """A result line with the keys and order of tools/batched-bench's jsonl format."""
    row = {
        "n_kv_max": 6144, "n_batch": 2048, "n_ubatch": 512, "flash_attn": -1, "is_pp_shared": 0,
        "n_gpu_layers": -1, "n_threads": 2, "n_threads_batch": 2, "pp": 128, "tg": 64, "pl": pl,
        "n_kv": pl * 192, "t_pp": 0.1 * pl, "speed_pp": 1280.0, "t_tg": pl * 64 / speed_tg,
        "speed_tg": speed_tg, "t": 1.0, "speed": 1.0,
    }  # fmt: skip
    return json.dumps(row)


# result lines among llama.cpp's log lines
OUTPUT = "\n".join(
    ["main: n_kv_max = 6144, n_batch = 2048", _line(1, 100.0), _line(32, 200.0), "llama_perf: total 14 s"]
)


def test_parse_jsonl_reads_result_rows_only() -> None:
    rows = parse_jsonl(OUTPUT)
    assert [(r.prompt_tokens, r.new_tokens, r.num_sequences) for r in rows] == [(128, 64, 1), (128, 64, 32)]
    assert [r.decode_tokens_per_s for r in rows] == [100.0, 200.0]
    assert rows[0].prefill_tokens_per_s == 1280.0


def test_failing_binary_raises_with_its_output(tmp_path: Path) -> None:
    fake = tmp_path / "llama-batched-bench"
    fake.write_text("#!/bin/sh\necho 'error: unable to load model' >&2\nexit 1\n")
    fake.chmod(0o755)
    bench = LlamaBatchedBench(fake, tmp_path / "m.gguf", threads=1)
    with pytest.raises(RuntimeError, match="unable to load model"):
        bench.run((128,), 64, (1,))


@pytest.mark.parametrize(("dies_of_sigill", "expected"), [(True, False), (False, True)])
def test_probe_repack_falls_back_only_on_sigill(tmp_path: Path, dies_of_sigill: bool, expected: bool) -> None:
    """llama.cpp's default (repacked weights) unless it dies of SIGILL (an unpatched ggml AMX build)."""
    fake = tmp_path / "llama-batched-bench"
    body = "kill -ILL $$" if dies_of_sigill else "echo 'error: unable to load model' >&2; exit 1"
    fake.write_text(f'#!/bin/sh\ncase "$*" in *--no-repack*) exit 0;; esac\n{body}\n')
    fake.chmod(0o755)
    assert LlamaBatchedBench(fake, tmp_path / "m.gguf", threads=1).probe_repack() is expected
