"""Unit tests (no second process): run merging, layout checks, configs, the transfer state machine."""

from __future__ import annotations

import itertools
import threading
import time

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from engine.kv_memory import DTYPES
from kv_transfer import (
    BlockRun,
    LayoutMismatchError,
    LayoutSignature,
    NixlConfig,
    ShmConfig,
    TorchDistConfig,
    TransferStatus,
    make_transport,
    merge_block_runs,
    pool_shape,
    transport_config,
)
from kv_transfer.blocks import check_pool_layout, torch_dtype, torch_dtype_name
from kv_transfer.transfer import TransferAborted, TransferState

LAYOUT = LayoutSignature("m@1", "bfloat16", block_size=4, num_layers=2, num_kv_heads=2, head_dim=8)


def test_merge_runs_needs_both_sides_consecutive() -> None:
    assert merge_block_runs([3, 4, 5, 9], [0, 1, 2, 3]) == [BlockRun(3, 0, 3), BlockRun(9, 3, 1)]
    # remote consecutive, local not: two runs
    assert merge_block_runs([3, 4], [0, 2]) == [BlockRun(3, 0, 1), BlockRun(4, 2, 1)]
    # local consecutive, remote not
    assert merge_block_runs([4, 3], [0, 1]) == [BlockRun(4, 0, 1), BlockRun(3, 1, 1)]
    assert merge_block_runs([], []) == []
    with pytest.raises(ValueError, match="differ in length"):
        merge_block_runs([1], [1, 2])


@given(st.lists(st.tuples(st.integers(0, 40), st.integers(0, 40)), max_size=60))
def test_merge_runs_expand_back_to_the_mapping(pairs: list[tuple[int, int]]) -> None:
    remote, local = [p[0] for p in pairs], [p[1] for p in pairs]
    runs = merge_block_runs(remote, local)
    expanded = [(r.remote_start + i, r.local_start + i) for r in runs for i in range(r.num_blocks)]
    assert expanded == pairs
    for left, right in itertools.pairwise(runs):  # maximal: neighbours never continue each other
        assert not (
            right.remote_start == left.remote_start + left.num_blocks
            and right.local_start == left.local_start + left.num_blocks
        )


def test_layout_mismatch_names_every_field() -> None:
    other = LayoutSignature("m@1", "float32", block_size=8, num_layers=2, num_kv_heads=2, head_dim=8)
    with pytest.raises(LayoutMismatchError, match=r"dtype.*block_size"):
        LAYOUT.check_compatible(other)


def test_check_pool_layout() -> None:
    assert check_pool_layout(torch.zeros(pool_shape(LAYOUT, 5), dtype=torch.bfloat16), LAYOUT) == 5
    with pytest.raises(ValueError, match="dtype"):
        check_pool_layout(torch.zeros(pool_shape(LAYOUT, 5), dtype=torch.float32), LAYOUT)
    with pytest.raises(ValueError, match="shape"):
        check_pool_layout(torch.zeros(5, 2, 2, 8, 2, 8, dtype=torch.bfloat16), LAYOUT)
    with pytest.raises(ValueError, match="contiguous"):
        check_pool_layout(
            torch.zeros(pool_shape(LAYOUT, 5)[::-1], dtype=torch.bfloat16).permute(5, 4, 3, 2, 1, 0), LAYOUT
        )


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: transport_config({"backend": "rdma"}), "backend"),
        (lambda: ShmConfig(timeout_s=0), "ShmConfig.timeout_s"),
        (lambda: NixlConfig(test_pull_delay_s=-1), "NixlConfig.test_pull_delay_s"),
        (lambda: ShmConfig(segment_prefix="a/b"), "ShmConfig.segment_prefix"),
        (lambda: ShmConfig(copy_chunk_bytes=0), "ShmConfig.copy_chunk_bytes"),
        (lambda: NixlConfig(ucx_backend=""), "NixlConfig.ucx_backend"),
        (lambda: NixlConfig(num_threads=-1), "NixlConfig.num_threads"),
        (lambda: NixlConfig(shm_dir="/x"), "NixlConfig.shm_dir"),  # another backend's field
        (lambda: TorchDistConfig(port_min=10, port_max=5), "TorchDistConfig.port_max"),
    ],
)
def test_config_validation_names_the_field(build, field: str) -> None:
    """pydantic names the model, then the field (or the validator's message starts with it)."""
    owner, _, name = field.rpartition(".")
    with pytest.raises(ValueError) as raised:
        build()
    assert owner in str(raised.value) and name in str(raised.value)


def test_transport_config_picks_the_backend_model() -> None:
    assert transport_config() == ShmConfig()
    config = transport_config({"backend": "nixl", "timeout_s": 5.0, "enable_progress_thread": False})
    assert config == NixlConfig(timeout_s=5.0, enable_progress_thread=False)
    assert not ShmConfig.is_cross_node and not ShmConfig.supports_gpu_memory
    assert NixlConfig.is_cross_node and TorchDistConfig.supports_gpu_memory


def test_make_transport_picks_backend_and_its_flags() -> None:
    transport = make_transport(TorchDistConfig(), "w0")
    assert type(transport).__name__ == "TorchDistTransport" and transport.backend == "torch_dist"
    assert transport.config.is_cross_node and transport.config.supports_gpu_memory
    transport.close()
    with pytest.raises(ValueError, match="worker_id"):
        make_transport(ShmConfig(), "")


def test_transfer_state_lifecycle_and_first_end_wins() -> None:
    transfer = TransferState(timeout_s=5.0)
    assert transfer.status is TransferStatus.PENDING
    assert transfer.begin() and transfer.status is TransferStatus.TRANSFERRING
    assert transfer.succeed() and not transfer.fail("late")
    assert transfer.wait() is TransferStatus.DONE and transfer.error is None


def test_transfer_state_deadline_without_waiter_and_no_writes_after() -> None:
    transfer = TransferState(timeout_s=0.01)
    transfer.begin()
    time.sleep(0.02)
    assert transfer.status is TransferStatus.FAILED and "timed out" in (transfer.error or "")
    with pytest.raises(TransferAborted), transfer.writing():
        pass
    assert not transfer.succeed()


def test_transfer_state_wait_wakes_on_completion_from_another_thread() -> None:
    transfer = TransferState(timeout_s=5.0)
    threading.Timer(0.05, transfer.succeed).start()
    started = time.monotonic()
    assert transfer.wait() is TransferStatus.DONE
    assert time.monotonic() - started < 2.0


def test_wait_timeout_fails_the_transfer() -> None:
    transfer = TransferState(timeout_s=5.0)
    assert transfer.wait(timeout=0.01) is TransferStatus.FAILED
    assert "wait() timed out" in (transfer.error or "")


def test_torch_dtype_is_the_inverse_of_torch_dtype_name_over_the_engine_dtypes() -> None:
    assert [torch_dtype_name(torch_dtype(name)) for name in DTYPES] == list(DTYPES)
    with pytest.raises(ValueError, match="unsupported KV dtype 'int8'"):
        torch_dtype("int8")
