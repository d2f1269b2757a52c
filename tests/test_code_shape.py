"""The code's shape as STYLE.md and ARCHITECTURE.md state it, checked on the source (no imports run).

- No function or method is longer than 60 lines.
- The dependency arrows go one way: cluster -> {router, prefill_worker, decode_worker} -> worker_common ->
  {engine, kv_transfer}; kv_transfer uses only engine's torch-free KV memory math; router only the
  torch-free block hash and KV memory modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = (
    "engine",
    "prefill_worker",
    "decode_worker",
    "worker_common",
    "kv_transfer",
    "router",
    "cluster",
    "capacity",
)
MAX_FUNCTION_LINES = 60

# package -> top-level project packages (or "pkg.module" entries) it may import
ALLOWED_IMPORTS: dict[str, set[str]] = {
    "engine": {"engine"},
    "kv_transfer": {"kv_transfer", "engine.kv_memory"},
    "router": {"router", "engine.block_hash", "engine.kv_memory", "engine.prefix_summary"},
    "worker_common": {"worker_common", "engine", "kv_transfer"},
    "prefill_worker": {"prefill_worker", "worker_common", "engine", "kv_transfer"},
    "decode_worker": {"decode_worker", "worker_common", "engine", "kv_transfer"},
    # capacity drives the real router, scheduler rules and autoscaling policies (torch-free, Ray-free);
    # only capacity.calibrate imports the engine (lazily) to time it
    "capacity": {"capacity", "engine.kv_memory", "engine.scheduling_rules", "engine.prefix_summary", "router",
                 "cluster.autoscaling", "cluster.bench", "cluster.config", "engine.config",
                 "engine.llm_engine", "engine.sampling"},
}
PROJECT = set(PACKAGES) | {"protos"}


def _sources(package: str) -> list[Path]:
    folder = ROOT / package
    return sorted(path for path in folder.rglob("*.py") if "_pb2" not in path.name) if folder.is_dir() else []


def _all_sources() -> list[Path]:
    return [path for package in PACKAGES for path in _sources(package)]


def test_sources_found() -> None:
    assert len(_all_sources()) > 50  # the scan below must not pass by finding nothing


def test_no_function_longer_than_60_lines() -> None:
    too_long = []
    for path in _all_sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                num_lines = node.end_lineno - node.lineno + 1
                if num_lines > MAX_FUNCTION_LINES:
                    too_long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({num_lines} lines)")
    assert not too_long, "functions over 60 lines:\n" + "\n".join(too_long)


def _imported_modules(path: Path) -> set[str]:
    modules: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.add(node.module)
    return {module for module in modules if module.split(".")[0] in PROJECT}


def _is_allowed(module: str, allowed: set[str]) -> bool:
    return any(module == entry or module.startswith(entry + ".") for entry in allowed)


@pytest.mark.parametrize("package", sorted(ALLOWED_IMPORTS))
def test_dependency_arrows(package: str) -> None:
    allowed = ALLOWED_IMPORTS[package]
    wrong = [
        f"{path.relative_to(ROOT)} imports {module}"
        for path in _sources(package)
        for module in sorted(_imported_modules(path))
        if not _is_allowed(module, allowed)
    ]
    assert not wrong, "imports against the arrows:\n" + "\n".join(wrong)
