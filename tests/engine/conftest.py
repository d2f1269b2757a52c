"""Engine tests run torch on one thread: the models are tiny, and on a shared 2-core machine a second
intra-op thread mostly spins waiting for a busy core (measured 4x slower under load)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
