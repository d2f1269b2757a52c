"""Two-process scenarios every backend must pass; each test_kv_<backend>.py subclasses ``Scenarios``.

The serving peer is a spawned process (``peer_process``) with a pool of seeded random bytes; this test
process is the decode side. Byte identity is checked by SHA-256 digests computed on both sides.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Iterator

import pytest
import torch

from kv_transfer import (
    KVHandle,
    KVTransport,
    LayoutMismatchError,
    LayoutSignature,
    TransferStatus,
    TransportConfig,
    block_digests,
    make_transport,
    pool_shape,
)
from tests.kv_transfer.peer_process import PeerProcess, fill_random

# 32 KiB blocks: 2 layers x K,V x 16 tokens x 4 heads x 32 dims x 4 bytes
LAYOUT = LayoutSignature("test-model@0", "float32", block_size=16, num_layers=2, num_kv_heads=4, head_dim=32)
NUM_REMOTE_BLOCKS = 256  # 8 MiB: big enough that a 0.1 ms timeout always fires first
NUM_LOCAL_BLOCKS = 256
TIMEOUT_S = 5.0


def make_handle(peer: PeerProcess, block_ids: list[int], request_id: str = "req") -> KVHandle:
    return KVHandle(
        request_id, peer.endpoint, tuple(block_ids), len(block_ids) * LAYOUT.block_size, time.time() + 60
    )


def kv_files(prefix: str) -> list[str]:
    return sorted(name for name in os.listdir("/dev/shm") if name.startswith(prefix))


@dataclasses.dataclass
class Decoder:
    transport: KVTransport
    pool: torch.Tensor


def new_decoder(config: TransportConfig, worker_id: str) -> Decoder:
    transport = make_transport(config, worker_id)
    pool = transport.allocate_pool(pool_shape(LAYOUT, NUM_LOCAL_BLOCKS), torch.float32)
    fill_random(pool, seed=999)  # nonzero garbage, so a missed block cannot pass by accident
    transport.register(pool, LAYOUT)
    return Decoder(transport, pool)


class Scenarios:
    """Subclasses set ``config`` (a TransportConfig whose shm prefix is unique to the module)."""

    config: TransportConfig

    @pytest.fixture(scope="class")
    @classmethod
    def peer(cls) -> Iterator[PeerProcess]:
        peer = PeerProcess.start(cls.config, "prefill-main", LAYOUT, NUM_REMOTE_BLOCKS, seed=1)
        yield peer
        peer.stop()

    @pytest.fixture(scope="class")
    @classmethod
    def decoder(cls, peer: PeerProcess) -> Iterator[Decoder]:
        threads_before = set(threading.enumerate())
        decoder = new_decoder(cls.config, "decode-main")
        yield decoder
        decoder.transport.close()
        decoder.transport.close()  # idempotent
        leaked = [t for t in threading.enumerate() if t not in threads_before and t.is_alive()]
        assert not leaked, f"threads left after close(): {leaked}"

    def _read_and_compare(
        self, peer: PeerProcess, decoder: Decoder, remote: list[int], local: list[int]
    ) -> None:
        transfer = decoder.transport.read_blocks(make_handle(peer, remote), local)
        assert transfer.wait() is TransferStatus.DONE, transfer.error
        assert transfer.status is TransferStatus.DONE and transfer.error is None
        assert block_digests(decoder.pool, local) == peer.digests(remote)

    # -- acceptance 1: byte identity ------------------------------------------------------------------
    def test_one_block(self, peer: PeerProcess, decoder: Decoder) -> None:
        self._read_and_compare(peer, decoder, [7], [200])

    def test_scattered_blocks(self, peer: PeerProcess, decoder: Decoder) -> None:
        generator = torch.Generator().manual_seed(5)
        remote = torch.randperm(NUM_REMOTE_BLOCKS, generator=generator)[:40].tolist()
        local = torch.randperm(NUM_LOCAL_BLOCKS, generator=generator)[:40].tolist()
        remote[10:20] = list(range(100, 110))  # a run that merges on both sides
        local[10:20] = list(range(30, 40))
        self._read_and_compare(peer, decoder, remote, local)

    def test_all_blocks(self, peer: PeerProcess, decoder: Decoder) -> None:
        self._read_and_compare(peer, decoder, list(range(NUM_REMOTE_BLOCKS)), list(range(NUM_LOCAL_BLOCKS)))

    def test_many_concurrent_reads(self, peer: PeerProcess, decoder: Decoder) -> None:
        transfers = []
        for i in range(16):
            remote, local = [i, 100 + i, 200 + i], [3 * i, 3 * i + 1, 3 * i + 2]
            transfers.append(
                (decoder.transport.read_blocks(make_handle(peer, remote, f"r{i}"), local), remote, local)
            )
        for transfer, remote, local in transfers:
            assert transfer.wait() is TransferStatus.DONE, transfer.error
            assert block_digests(decoder.pool, local) == peer.digests(remote)

    # -- layout and argument checks (before any byte moves) -------------------------------------------
    @pytest.mark.parametrize(
        "change", [{"block_size": 8}, {"dtype": "bfloat16"}, {"num_kv_heads": 8}, {"model_id": "other@1"}]
    )
    def test_layout_mismatch_refused(self, peer: PeerProcess, decoder: Decoder, change: dict) -> None:
        other = dataclasses.replace(LAYOUT, **change)
        handle = dataclasses.replace(
            make_handle(peer, [1, 2]), endpoint=dataclasses.replace(peer.endpoint, layout=other)
        )
        before = block_digests(decoder.pool, [0, 1])
        with pytest.raises(LayoutMismatchError, match=next(iter(change))):
            decoder.transport.read_blocks(handle, [0, 1])
        assert block_digests(decoder.pool, [0, 1]) == before

    def test_bad_block_ids_refused(self, peer: PeerProcess, decoder: Decoder) -> None:
        with pytest.raises(ValueError, match="out of range"):
            decoder.transport.read_blocks(make_handle(peer, [NUM_REMOTE_BLOCKS]), [0])
        with pytest.raises(ValueError, match="local block ids"):
            decoder.transport.read_blocks(make_handle(peer, [1, 2]), [0])

    def test_expired_lease_fails_without_reading(self, peer: PeerProcess, decoder: Decoder) -> None:
        before = block_digests(decoder.pool, [70])
        handle = dataclasses.replace(make_handle(peer, [3]), lease_expires_at=time.time() - 1.0)
        transfer = decoder.transport.read_blocks(handle, [70])
        assert transfer.wait() is TransferStatus.FAILED and "lease" in (transfer.error or "")
        assert block_digests(decoder.pool, [70]) == before

    # -- faults ---------------------------------------------------------------------------------------
    def test_timeout_ends_failed(self, peer: PeerProcess) -> None:
        decoder = new_decoder(self.config.model_copy(update={"timeout_s": 1e-4}), "decode-timeout")
        try:
            all_ids = list(range(NUM_REMOTE_BLOCKS))
            transfer = decoder.transport.read_blocks(make_handle(peer, all_ids), all_ids)
            status = transfer.wait()
            assert status is TransferStatus.FAILED, f"{transfer} did not time out"
            assert "timed out" in (transfer.error or "")
        finally:
            decoder.transport.close()

    def test_stalled_peer_never_hangs(self, peer: PeerProcess) -> None:
        """A peer that stops running (SIGSTOP): one-sided backends may still finish (then the bytes are
        right); two-sided ones end FAILED at the deadline. Either way wait() returns by the deadline."""
        decoder = new_decoder(self.config.model_copy(update={"timeout_s": 1.0}), "decode-stalled")
        ids = list(range(64))
        expected = peer.digests(ids)
        peer.pause()
        try:
            started = time.monotonic()
            transfer = decoder.transport.read_blocks(make_handle(peer, ids), ids)
            status = transfer.wait()
            assert time.monotonic() - started < 1.0 + 1.5
            if status is TransferStatus.FAILED:
                assert "timed out" in (transfer.error or ""), transfer.error
            else:
                assert block_digests(decoder.pool, ids) == expected
        finally:
            peer.resume()
            decoder.transport.close()
        # the peer serves correctly again afterwards
        check = new_decoder(self.config, "decode-after-stall")
        try:
            transfer = check.transport.read_blocks(make_handle(peer, ids[:8]), ids[:8])
            assert transfer.wait() is TransferStatus.DONE, transfer.error
            assert block_digests(check.pool, ids[:8]) == expected[:8]
        finally:
            check.transport.close()

    def test_peer_restart_is_rehandshaked(self, decoder: Decoder) -> None:
        first = PeerProcess.start(self.config, "prefill-restart", LAYOUT, NUM_REMOTE_BLOCKS, seed=11)
        ids = [5, 6, 50]
        self._read_and_compare(first, decoder, ids, [60, 61, 62])
        old_handle = make_handle(first, ids)
        first.stop()
        second = PeerProcess.start(self.config, "prefill-restart", LAYOUT, NUM_REMOTE_BLOCKS, seed=12)
        try:
            assert second.endpoint.incarnation != first.endpoint.incarnation
            # the old incarnation is gone: never served by a stale mapping/agent, and no hang
            started = time.monotonic()
            stale = decoder.transport.read_blocks(old_handle, [63, 64, 65])
            assert stale.wait() is TransferStatus.FAILED, "read through a stale endpoint succeeded"
            assert time.monotonic() - started < TIMEOUT_S + 2
            self._read_and_compare(second, decoder, ids, [60, 61, 62])
            assert second.digests(ids) != first_digests_differ_guard(ids)
            assert decoder.transport.peer_incarnations()["prefill-restart"] == second.endpoint.incarnation
        finally:
            second.stop()

    def test_peer_killed_mid_transfer(self, decoder: Decoder) -> None:
        peer = PeerProcess.start(self.config, "prefill-killed", LAYOUT, NUM_REMOTE_BLOCKS, seed=21)
        all_ids = list(range(NUM_REMOTE_BLOCKS))
        expected = peer.digests(all_ids)
        handle = make_handle(peer, all_ids)
        peer.pause()  # a backend that needs the peer's CPU is now certainly mid-transfer when it dies
        transfer = decoder.transport.read_blocks(handle, all_ids)
        time.sleep(0.2)
        peer.kill()
        started = time.monotonic()
        status = transfer.wait()
        assert time.monotonic() - started < TIMEOUT_S + 2
        # the kill may land after the last byte: then the bytes must be right; otherwise FAILED
        if status is TransferStatus.DONE:
            assert block_digests(decoder.pool, all_ids) == expected
        # once the peer is certainly dead, every read fails within the timeout
        started = time.monotonic()
        after = decoder.transport.read_blocks(make_handle(peer, all_ids[:4]), all_ids[:4])
        assert after.wait() is TransferStatus.FAILED, "read from a dead peer succeeded"
        assert time.monotonic() - started < TIMEOUT_S + 2


def first_digests_differ_guard(ids: list[int]) -> list[str]:
    """Digests of the first incarnation's blocks (seed 11), computed here: the restart must change them."""
    pool = torch.empty(pool_shape(LAYOUT, NUM_REMOTE_BLOCKS), dtype=torch.float32)
    fill_random(pool, seed=11)
    return block_digests(pool, ids)
