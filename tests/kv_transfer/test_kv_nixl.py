"""NIXL (UCX) backend between two processes."""

from __future__ import annotations

import os

import pytest

from kv_transfer import NixlConfig
from tests.kv_transfer.transport_scenarios import TIMEOUT_S, Scenarios

pytest.importorskip("nixl._api")  # installed in .venv; a missing install fails loudly in CI's import check

pytestmark = pytest.mark.integration


class TestNixl(Scenarios):
    config = NixlConfig(timeout_s=TIMEOUT_S)


def test_net_devices_restrict_ucx_and_lo_moves_bytes(monkeypatch) -> None:
    """``net_devices: lo`` with UCX limited to TCP: the bytes cross the loopback device, identical; an
    unknown device makes the agent fail at creation, so the setting does reach UCX."""
    from kv_transfer import TransferStatus, block_digests
    from tests.kv_transfer.peer_process import PeerProcess
    from tests.kv_transfer.transport_scenarios import LAYOUT, make_handle, new_decoder

    monkeypatch.setenv("UCX_NET_DEVICES", "unset-by-the-transport")  # it writes the variable; undone after
    monkeypatch.setenv("UCX_TLS", "tcp")  # no shared memory / CMA in this process: the device matters
    config = NixlConfig(timeout_s=TIMEOUT_S, net_devices="lo")
    new_decoder(config, "decode-env").transport.close()
    assert os.environ["UCX_NET_DEVICES"] == "lo"
    peer = PeerProcess.start(config, "prefill-lo", LAYOUT, 16, seed=5)
    try:
        decoder = new_decoder(config, "decode-lo")
        try:
            transfer = decoder.transport.read_blocks(make_handle(peer, [3, 4, 9]), [10, 11, 2])
            assert transfer.wait() is TransferStatus.DONE, transfer.error
            assert block_digests(decoder.pool, [10, 11, 2]) == peer.digests([3, 4, 9])
        finally:
            decoder.transport.close()
    finally:
        peer.stop()
    with pytest.raises(Exception, match="NIXL_ERR_BACKEND"):
        new_decoder(NixlConfig(timeout_s=TIMEOUT_S, net_devices="no-such-device0"), "decode-bogus")
