"""The generated gRPC modules must be what `make protos` produces from protos/*.proto today."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTOS = ["protos/pdserve.proto", "protos/pdserve_wire.proto"]


def test_generated_modules_are_fresh(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I",
            ".",
            f"--python_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            *PROTOS,
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=120,
    )
    generated = sorted(p.relative_to(tmp_path) for p in (tmp_path / "protos").iterdir())
    assert len(generated) == 3 * len(PROTOS)
    stale = [str(p) for p in generated if (tmp_path / p).read_bytes() != (ROOT / p).read_bytes()]
    assert not stale, f"stale generated modules (run `make protos`): {stale}"
