"""Request traces: loaders for the public traces and deterministic prompt synthesis.

Two formats are recognised by content (not by file name):

- **Mooncake JSONL** (kvcache-ai/Mooncake FAST'25 traces): one JSON object per line with
  ``timestamp`` (milliseconds), ``input_length``, ``output_length`` and ``hash_ids`` (one id per
  512-token block; the ids are chained prefix hashes, so an id recurs only after the same prefix).
- **Azure CSV** (Azure LLM inference traces 2023): header ``TIMESTAMP,ContextTokens,GeneratedTokens``
  with wall-clock timestamps; they are made relative to the first row.
- **AIBrix prefix-share JSONL** (vllm-project/aibrix workload generator): one JSON object per line
  with ``timestamp`` (ms) and ``requests``, a list of ``{"prompt", "Prompt Length", "Output Length"}``.
  The prompts are text; :func:`_aibrix_hash_ids` cuts each into blocks of ``AIBRIX_BLOCK_TOKENS``
  tokens' worth of characters (one fixed characters-per-token ratio for the whole file, so that
  prompts sharing a text prefix share their leading blocks) and numbers each distinct chained text
  prefix, as Mooncake's ``hash_ids`` do. No tokenizer is involved: block boundaries are approximate
  (~4.9 characters a token in the file), the sharing structure is exact.

Traces carry no token ids. :func:`synthesize_prompt` makes them: one deterministic pseudo-random
block of tokens per hash id (so requests sharing hash ids share a token prefix, across processes and
machines), and for records without hash ids tokens drawn from the request's own index.

Torch-free (the router and the benchmark driver import it).
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path

MOONCAKE_BLOCK_TOKENS = 512  # tokens per hash id in the Mooncake traces
AIBRIX_BLOCK_TOKENS = 16  # tokens per hash id made for AIBrix prompts (the engine's block size)
AZURE_HEADER = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
_EPOCH = datetime(1970, 1, 1)


@dataclass(frozen=True)
class TraceRecord:
    """One request of a trace.

    Attributes:
        timestamp_s: arrival time in seconds from the trace's start (Mooncake: ``timestamp / 1000``;
            Azure: seconds since the first row).
        input_length: prompt length in tokens.
        output_length: generated length in tokens.
        hash_ids: Mooncake's per-512-token-block prefix ids, or ``None`` when the trace has none.
        index: the record's position in the file (0-based); seeds per-request synthetic tokens.
    """

    timestamp_s: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...] | None
    index: int = 0


class TraceFormatError(ValueError):
    """A trace file that is neither valid Mooncake JSONL nor valid Azure CSV."""


def load_trace(path: str | Path) -> list[TraceRecord]:
    """Load a Mooncake JSONL or Azure CSV trace, detected from the file's first non-empty line.

    Records keep file order. Raises :class:`TraceFormatError` (a ``ValueError``) naming the file
    and line on an unknown format or a malformed record, ``FileNotFoundError`` if it does not exist.
    """
    path = Path(path)
    with path.open("r", encoding="utf-8", newline="") as handle:
        lines = handle.read().splitlines()
    first = next((line.strip() for line in lines if line.strip()), None)
    if first is None:
        raise TraceFormatError(f"{path}: empty trace file")
    if first.startswith("{") and '"requests"' in first:
        return _load_aibrix(path, lines)
    if first.startswith("{"):
        return _load_mooncake(path, lines)
    header = tuple(cell.strip() for cell in first.lstrip("\ufeff").split(","))
    if header[: len(AZURE_HEADER)] == AZURE_HEADER:
        return _load_azure(path, lines)
    raise TraceFormatError(
        f"{path}: unknown trace format (expected Mooncake JSONL with timestamp/input_length/"
        f"output_length/hash_ids, or Azure CSV with header {','.join(AZURE_HEADER)}); "
        f"first line starts {first[:80]!r}"
    )


def _require_int(path: Path, line_number: int, obj: dict, key: str) -> int:
    if key not in obj:
        raise TraceFormatError(f"{path}:{line_number}: missing field {key!r}")
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise TraceFormatError(f"{path}:{line_number}: field {key!r} must be an integer, got {value!r}")
    if value < 0:
        raise TraceFormatError(f"{path}:{line_number}: field {key!r} must be >= 0, got {value!r}")
    return int(value)


def _load_mooncake(path: Path, lines: list[str]) -> list[TraceRecord]:
    records: list[TraceRecord] = []
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as error:
            raise TraceFormatError(f"{path}:{line_number}: invalid JSON ({error.msg})") from None
        if not isinstance(obj, dict):
            raise TraceFormatError(f"{path}:{line_number}: expected a JSON object, got {type(obj).__name__}")
        timestamp_ms = _require_int(path, line_number, obj, "timestamp")
        input_length = _require_int(path, line_number, obj, "input_length")
        output_length = _require_int(path, line_number, obj, "output_length")
        raw_ids = obj.get("hash_ids")
        hash_ids: tuple[int, ...] | None = None
        if raw_ids is not None:
            if not isinstance(raw_ids, list) or not all(
                isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in raw_ids
            ):
                raise TraceFormatError(
                    f"{path}:{line_number}: field 'hash_ids' must be a list of non-negative integers"
                )
            hash_ids = tuple(raw_ids)
        records.append(
            TraceRecord(timestamp_ms / 1000.0, input_length, output_length, hash_ids, len(records))
        )
    return records


def trace_block_tokens(path: str | Path) -> int:
    """Tokens per hash id of the trace's format (AIBrix: ``AIBRIX_BLOCK_TOKENS``; else Mooncake's)."""
    with Path(path).open("r", encoding="utf-8") as handle:
        first = next((line.strip() for line in handle if line.strip()), "")
    return AIBRIX_BLOCK_TOKENS if first.startswith("{") and '"requests"' in first else MOONCAKE_BLOCK_TOKENS


def _aibrix_hash_ids(
    prompt: str, num_tokens: int, chars_per_block: float, ids: dict[bytes, int]
) -> tuple[int, ...]:
    """Block ids of a text prompt: block ``i`` is characters ``[i*c, (i+1)*c)``; its id numbers the
    chained BLAKE2b of the text up to its end (first seen, first numbered), so ids are shared exactly
    by prompts sharing that text prefix. The last, partial block of text gets an id too; blocks the
    token count asks for beyond the text get fresh ids."""
    num_blocks = max(1, -(-num_tokens // AIBRIX_BLOCK_TOKENS))
    digest = hashlib.blake2b(b"pdserve/aibrix-blocks/v1", digest_size=16)
    block_ids = []
    for index in range(num_blocks):
        chunk = prompt[round(index * chars_per_block) : round((index + 1) * chars_per_block)]
        if not chunk:  # past the text: unique to this prompt
            digest.update(b"\x00" + str(index).encode() + b"|" + prompt.encode("utf-8"))
        digest.update(chunk.encode("utf-8"))
        key = digest.copy().digest()
        block_ids.append(ids.setdefault(key, len(ids)))
    return tuple(block_ids)


def _load_aibrix(path: Path, lines: list[str]) -> list[TraceRecord]:
    rows: list[tuple[float, str, int, int]] = []
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            timestamp_s = float(obj["timestamp"]) / 1000.0
            for request in obj["requests"]:
                rows.append((timestamp_s, str(request["prompt"]), int(request["Prompt Length"]),
                             int(request["Output Length"])))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            raise TraceFormatError(f"{path}:{line_number}: bad AIBrix record ({error})") from None
    total_chars = sum(len(prompt) for _, prompt, _, _ in rows)
    total_tokens = sum(tokens for _, _, tokens, _ in rows)
    if not rows or total_tokens <= 0:
        raise TraceFormatError(f"{path}: no AIBrix requests with tokens")
    chars_per_block = total_chars / total_tokens * AIBRIX_BLOCK_TOKENS
    ids: dict[bytes, int] = {}
    return [
        TraceRecord(stamp, tokens, output, _aibrix_hash_ids(prompt, tokens, chars_per_block, ids), index)
        for index, (stamp, prompt, tokens, output) in enumerate(rows)
    ]


def _parse_azure_time(text: str) -> float:
    """Seconds since the epoch of ``2023-11-16 18:15:46.6805900`` (any number of fraction digits)."""
    whole, _, fraction = text.strip().partition(".")
    # Naive arithmetic (no local time zone, no DST): only differences between rows are used.
    seconds = (datetime.strptime(whole, "%Y-%m-%d %H:%M:%S") - _EPOCH).total_seconds()
    if fraction:
        if not fraction.isdigit():
            raise ValueError(f"bad fractional seconds {fraction!r}")
        seconds += int(fraction) / 10 ** len(fraction)
    return seconds


def _load_azure(path: Path, lines: list[str]) -> list[TraceRecord]:
    records: list[TraceRecord] = []
    first_time: float | None = None
    reader = csv.reader(lines)
    next(reader)  # header, checked by the caller
    for line_number, row in enumerate(reader, start=2):
        if not row or not any(cell.strip() for cell in row):
            continue
        if len(row) < len(AZURE_HEADER):
            raise TraceFormatError(f"{path}:{line_number}: expected 3 columns, got {len(row)}")
        try:
            arrival = _parse_azure_time(row[0])
            context_tokens = int(row[1])
            generated_tokens = int(row[2])
        except ValueError as error:
            raise TraceFormatError(f"{path}:{line_number}: bad row {row!r} ({error})") from None
        if context_tokens < 0 or generated_tokens < 0:
            raise TraceFormatError(f"{path}:{line_number}: negative token count in {row!r}")
        if first_time is None:
            first_time = arrival
        records.append(
            TraceRecord(arrival - first_time, context_tokens, generated_tokens, None, len(records))
        )
    return records


def _block_rng(seed: int, kind: bytes, key: int) -> random.Random:
    """A PRNG seeded from ``(seed, kind, key)`` through BLAKE2b: identical in every process."""
    digest = hashlib.blake2b(
        b"pdserve/trace-tokens/v1|" + kind + b"|" + str(seed).encode() + b"|" + str(key).encode(),
        digest_size=16,
    ).digest()
    return random.Random(int.from_bytes(digest, "little"))


def _random_tokens(rng: random.Random, num_tokens: int, vocab_size: int) -> list[int]:
    # choices() over a range is ~3x faster than a randrange() loop and just as deterministic.
    return rng.choices(range(vocab_size), k=num_tokens)


@lru_cache(maxsize=4096)
def _hash_id_block(seed: int, hash_id: int, num_tokens: int, vocab_size: int) -> tuple[int, ...]:
    """The token block of one hash id (cached: popular ids such as Mooncake's id 0 recur a lot)."""
    return tuple(_random_tokens(_block_rng(seed, b"hash-id", hash_id), num_tokens, vocab_size))


def synthesize_prompt(
    record: TraceRecord,
    block_tokens: int = MOONCAKE_BLOCK_TOKENS,
    *,
    vocab_size: int,
    scale: float = 1.0,
    seed: int = 0,
) -> list[int]:
    """Deterministic pseudo-random prompt token ids for a trace record.

    With ``hash_ids``: each hash id becomes its own block of ``max(1, round(block_tokens * scale))``
    tokens, drawn from a PRNG keyed by ``(seed, hash_id)`` only, so two records that share leading
    hash ids share exactly that token prefix (at any scale). The prompt is
    ``round(input_length * scale)`` tokens (at least 1 when ``input_length > 0``): the last hash id's
    block is cut to fit, and if the trace lists fewer ids than the length needs, the rest is filled
    with per-request tokens.

    Without ``hash_ids``: ``round(input_length * scale)`` tokens drawn from a PRNG keyed by
    ``(seed, record.index)``, so different requests do not share prefixes.

    Token ids lie in ``[0, vocab_size)``.
    """
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    if block_tokens <= 0:
        raise ValueError(f"block_tokens must be positive, got {block_tokens}")
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    num_tokens = round(record.input_length * scale)
    if record.input_length > 0:
        num_tokens = max(1, num_tokens)
    tokens: list[int] = []
    if record.hash_ids:
        tokens_per_id = max(1, round(block_tokens * scale))
        for hash_id in record.hash_ids:
            if len(tokens) >= num_tokens:
                break
            take = min(tokens_per_id, num_tokens - len(tokens))
            # Always draw the whole block and cut it, so a cut block is a prefix of the full one.
            tokens.extend(_hash_id_block(seed, hash_id, tokens_per_id, vocab_size)[:take])
    if len(tokens) < num_tokens:
        rng = _block_rng(seed, b"request", record.index)
        tokens.extend(_random_tokens(rng, num_tokens - len(tokens), vocab_size))
    return tokens
