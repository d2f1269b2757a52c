"""The shared data folder the tests read: ``../shared`` beside the repository root, never an absolute path.

A test that needs a file from it fails, naming the path it looked for, when the file is missing: a
clean clone with ``../shared`` beside it runs every such test, and a missing folder is an error to fix,
not a silent skip.
"""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def shared_path(relative: str) -> Path:
    """``../shared/<relative>`` (not checked; see ``require_shared``)."""
    return SHARED / relative


def require_shared(relative: str) -> Path:
    """``../shared/<relative>``; fails the calling test with a clear message when it is not there."""
    path = shared_path(relative)
    if not path.exists():
        pytest.fail(
            f"{path} is missing: the tests need the shared data folder at {SHARED} "
            f"(../shared beside the repository root {REPO})",
            pytrace=False,
        )
    return path
