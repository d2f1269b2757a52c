"""shm backend between two processes, plus its segment hygiene (no leaked /dev/shm files)."""

from __future__ import annotations

import os

import pytest

from kv_transfer import ShmConfig, TransportConfig, make_transport
from tests.kv_transfer.peer_process import PeerProcess
from tests.kv_transfer.transport_scenarios import LAYOUT, TIMEOUT_S, Scenarios, kv_files

PREFIX = f"pdtest-{os.getpid()}-"
CONFIG = TransportConfig(backend="shm", timeout_s=TIMEOUT_S, shm=ShmConfig(segment_prefix=PREFIX))

pytestmark = pytest.mark.integration


class TestShm(Scenarios):
    config = CONFIG


def test_killed_owner_segment_is_reaped() -> None:
    peer = PeerProcess.start(CONFIG, "prefill-orphan", LAYOUT, 4, seed=3)
    assert any("prefill-orphan" in name for name in kv_files(PREFIX))
    peer.kill()  # SIGKILL: the peer's own cleanup never runs
    assert any("prefill-orphan" in name for name in kv_files(PREFIX))
    transport = make_transport(CONFIG, "reaper")
    transport.allocate_pool((1, 2, 2, 16, 4, 32), LAYOUT_DTYPE)  # allocate_pool reaps dead owners' files
    assert not any("prefill-orphan" in name for name in kv_files(PREFIX))
    transport.close()


def test_no_segments_left() -> None:
    """Runs last in this module: every segment created above is gone."""
    assert kv_files(PREFIX) == []


LAYOUT_DTYPE = __import__("torch").float32
