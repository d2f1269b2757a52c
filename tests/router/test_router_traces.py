"""Trace loaders and prompt synthesis (router/traces.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from router.traces import TraceFormatError, TraceRecord, load_trace, synthesize_prompt
from tests.shared_data import require_shared

MOONCAKE = "data/mooncake/conversation_trace.jsonl"  # under ../shared


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_mooncake_jsonl_fields_and_ms_timestamps(tmp_path: Path) -> None:
    lines = [
        {"timestamp": 0, "input_length": 1000, "output_length": 5, "hash_ids": [0, 1]},
        {"timestamp": 2500, "input_length": 600, "output_length": 7, "hash_ids": [0, 2]},
    ]
    path = write(tmp_path, "t.jsonl", "\n".join(json.dumps(x) for x in lines) + "\n\n")
    records = load_trace(path)
    assert records == [
        TraceRecord(0.0, 1000, 5, (0, 1), 0),
        TraceRecord(2.5, 600, 7, (0, 2), 1),
    ]


def test_azure_csv_relative_timestamps(tmp_path: Path) -> None:
    text = (
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:15:46.6805900,374,44\n"
        "2023-11-16 18:15:50.9951690,396,109\n"
        "2023-11-16 18:16:46.5,10,1\n"
    )
    records = load_trace(write(tmp_path, "t.csv", text))
    assert [r.input_length for r in records] == [374, 396, 10]
    assert [r.output_length for r in records] == [44, 109, 1]
    assert all(r.hash_ids is None for r in records)
    assert records[0].timestamp_s == 0.0
    assert records[1].timestamp_s == pytest.approx(50.9951690 - 46.6805900, abs=1e-6)
    assert records[2].timestamp_s == pytest.approx(60 + 46.5 - 46.6805900, abs=1e-6)
    assert [r.index for r in records] == [0, 1, 2]


@pytest.mark.parametrize(
    ("name", "text", "fragment"),
    [
        ("empty.jsonl", "\n\n", "empty trace"),
        ("x.txt", "hello,world\n1,2\n", "unknown trace format"),
        ("bad.jsonl", '{"timestamp": 0, "input_length": 5, "output_length": 1}\n{oops\n', ":2: invalid JSON"),
        ("miss.jsonl", '{"timestamp": 0, "output_length": 1}\n', "missing field 'input_length'"),
        ("neg.jsonl", '{"timestamp": 0, "input_length": -3, "output_length": 1}\n', "must be >= 0"),
        (
            "ids.jsonl",
            '{"timestamp": 0, "input_length": 3, "output_length": 1, "hash_ids": "ab"}\n',
            "hash_ids",
        ),
        ("bad.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.1,x,3\n", ":2: bad row"),
        ("short.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.1,3\n", "3 columns"),
    ],
)
def test_bad_files_raise_clear_errors(tmp_path: Path, name: str, text: str, fragment: str) -> None:
    path = write(tmp_path, name, text)
    with pytest.raises(TraceFormatError) as info:
        load_trace(path)
    assert fragment in str(info.value)
    assert str(path) in str(info.value)


def test_missing_file_raises_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_trace(tmp_path / "nope.jsonl")


def test_shared_hash_ids_give_exactly_the_shared_prefix() -> None:
    a = TraceRecord(0.0, 3 * 512, 1, (0, 1, 2), 0)
    b = TraceRecord(0.0, 3 * 512 - 100, 1, (0, 1, 9), 1)
    tokens_a = synthesize_prompt(a, vocab_size=1000)
    tokens_b = synthesize_prompt(b, vocab_size=1000)
    assert len(tokens_a) == 3 * 512 and len(tokens_b) == 3 * 512 - 100
    assert tokens_a[: 2 * 512] == tokens_b[: 2 * 512]
    assert tokens_a[2 * 512 : 2 * 512 + 64] != tokens_b[2 * 512 : 2 * 512 + 64]
    assert all(0 <= t < 1000 for t in tokens_a + tokens_b)


def test_scaled_lengths_keep_the_sharing() -> None:
    scale = 1 / 16  # 512 tokens per hash id -> 32
    a = TraceRecord(0.0, 1000, 1, (4, 5), 0)
    b = TraceRecord(0.0, 800, 1, (4, 6), 1)
    tokens_a = synthesize_prompt(a, vocab_size=50_000, scale=scale)
    tokens_b = synthesize_prompt(b, vocab_size=50_000, scale=scale)
    assert len(tokens_a) == round(1000 * scale) and len(tokens_b) == round(800 * scale)
    assert tokens_a[:32] == tokens_b[:32]
    assert tokens_a[32:50] != tokens_b[32:50]


def test_cut_last_block_is_a_prefix_of_the_full_block() -> None:
    full = synthesize_prompt(TraceRecord(0.0, 1024, 1, (7, 8), 0), vocab_size=500)
    cut = synthesize_prompt(TraceRecord(0.0, 700, 1, (7, 8), 3), vocab_size=500)
    assert cut == full[:700]


def test_records_without_hash_ids_get_distinct_per_request_tokens() -> None:
    a = TraceRecord(0.0, 200, 1, None, 0)
    b = TraceRecord(0.0, 200, 1, None, 1)
    tokens_a = synthesize_prompt(a, vocab_size=32_000)
    assert tokens_a == synthesize_prompt(a, vocab_size=32_000)
    assert tokens_a[:16] != synthesize_prompt(b, vocab_size=32_000)[:16]
    assert tokens_a[:16] != synthesize_prompt(a, vocab_size=32_000, seed=1)[:16]
    assert len(synthesize_prompt(TraceRecord(0.0, 3, 1, None, 0), vocab_size=9, scale=0.01)) == 1


def test_too_few_hash_ids_are_padded_with_request_tokens() -> None:
    tokens = synthesize_prompt(TraceRecord(0.0, 600, 1, (3,), 0), vocab_size=1000)
    assert len(tokens) == 600
    assert tokens[:512] == synthesize_prompt(TraceRecord(0.0, 512, 1, (3,), 5), vocab_size=1000)


def test_synthesis_is_identical_in_another_process() -> None:
    code = (
        "from router.traces import TraceRecord, synthesize_prompt;"
        "print(synthesize_prompt(TraceRecord(0.0, 40, 1, (11, 12), 0), 16, vocab_size=777, seed=3))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    here = synthesize_prompt(TraceRecord(0.0, 40, 1, (11, 12), 0), 16, vocab_size=777, seed=3)
    assert out.strip() == str(here)


def test_bad_synthesis_arguments() -> None:
    record = TraceRecord(0.0, 10, 1, None, 0)
    bad = ({"vocab_size": 0}, {"vocab_size": 10, "scale": 0.0}, {"vocab_size": 10, "block_tokens": 0})
    for kwargs in bad:
        with pytest.raises(ValueError):
            synthesize_prompt(record, **kwargs)


def test_real_mooncake_trace_loads() -> None:
    records = load_trace(require_shared(MOONCAKE))
    assert len(records) == 12_031
    assert records[0].hash_ids is not None and records[0].hash_ids[0] == 0
    assert all(r.hash_ids is not None and len(r.hash_ids) == -(-r.input_length // 512) for r in records)
