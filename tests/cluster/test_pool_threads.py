"""A pool's torch threads default to its whole CPUs (at least 1), never to torch's machine-wide default."""

from __future__ import annotations

import pytest

from cluster.config import ClusterConfig, config_from_dict


def test_default_pools_run_one_torch_thread() -> None:
    config = ClusterConfig()  # 0.5 CPU per worker replica
    assert config.engine_for("prefill").num_threads == 1
    assert config.engine_for("decode").num_threads == 1


@pytest.mark.parametrize(("num_cpus", "expected"), [(0.0, 1), (0.5, 1), (1.0, 1), (2.0, 2), (3.7, 3)])
def test_threads_follow_whole_cpus(num_cpus: float, expected: int) -> None:
    config = config_from_dict({"decode": {"num_cpus": num_cpus}})
    assert config.engine_for("decode").num_threads == expected


def test_explicit_torch_threads_win() -> None:
    config = config_from_dict({"decode": {"num_cpus": 0.5, "torch_threads": 2}})
    assert config.engine_for("decode").num_threads == 2
