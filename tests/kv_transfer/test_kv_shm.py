"""shm backend between two processes, plus its segment hygiene (no leaked /dev/shm files)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

from kv_transfer import ShmConfig, make_transport
from tests.kv_transfer.peer_process import PeerProcess
from tests.kv_transfer.transport_scenarios import LAYOUT, TIMEOUT_S, Scenarios, kv_files

PREFIX = f"pdtest-{os.getpid()}-"
CONFIG = ShmConfig(timeout_s=TIMEOUT_S, segment_prefix=PREFIX)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module", autouse=True)
def no_segments_left() -> Iterator[None]:
    """After the module's last test, whichever ran last: every segment its tests created is gone (closed
    transports unlinked theirs; a SIGKILLed owner's file was reaped by a reader or by allocate_pool)."""
    yield
    assert kv_files(PREFIX) == []


class TestShm(Scenarios):
    config = CONFIG


def test_killed_owner_segment_is_reaped() -> None:
    peer = PeerProcess.start(CONFIG, "prefill-orphan", LAYOUT, 4, seed=3)
    assert any("prefill-orphan" in name for name in kv_files(PREFIX))
    peer.kill()  # SIGKILL: the peer's own cleanup never runs
    assert any("prefill-orphan" in name for name in kv_files(PREFIX))
    transport = make_transport(CONFIG, "reaper")
    transport.allocate_pool((1, 2, 2, 16, 4, 32), torch.float32)  # allocate_pool reaps dead owners' files
    assert not any("prefill-orphan" in name for name in kv_files(PREFIX))
    transport.close()
