"""The generated gRPC modules must be what `make protos` produces from protos/*.proto today."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# proto -> whether it declares a service (only then is a *_pb2_grpc module generated), as in `make protos`
PROTOS = {"protos/pdserve.proto": True, "protos/pdserve_wire.proto": False}


def test_generated_modules_are_fresh(tmp_path: Path) -> None:
    for proto, has_service in PROTOS.items():
        grpc_out = [f"--grpc_python_out={tmp_path}"] if has_service else []
        subprocess.run(
            [sys.executable, "-m", "grpc_tools.protoc", "-I", ".", f"--python_out={tmp_path}",
             f"--pyi_out={tmp_path}", *grpc_out, proto],
            cwd=ROOT,
            check=True,
            capture_output=True,
            timeout=120,
        )
    generated = sorted(p.relative_to(tmp_path) for p in (tmp_path / "protos").iterdir())
    committed = sorted(p.relative_to(ROOT) for p in (ROOT / "protos").glob("*_pb2*.py*"))
    assert generated == committed, "generated and committed modules differ in name (run `make protos`)"
    stale = [str(p) for p in generated if (tmp_path / p).read_bytes() != (ROOT / p).read_bytes()]
    assert not stale, f"stale generated modules (run `make protos`): {stale}"
