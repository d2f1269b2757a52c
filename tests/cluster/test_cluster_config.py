"""Cluster configuration: YAML -> ClusterConfig; unknown or mistyped fields are refused by name."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cluster.config import ClusterConfig, ConfigError, config_from_dict, load_config


def test_defaults_are_the_embedded_default() -> None:
    config = load_config(None)
    assert config == ClusterConfig()
    assert (config.grpc.host, config.grpc.port) == ("127.0.0.1", 50051)
    assert (config.prefill.num_replicas, config.decode.num_replicas) == (1, 1)
    assert config.mode == "disaggregated" and config.kv_transfer.backend == "shm"


def test_yaml_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text(
        "mode: colocated\nkv_cache_bytes: 1048576\ndecode:\n  num_replicas: 3\n  num_cpus: 0.25\n"
        "grpc: {host: 0.0.0.0, port: 6000}\nrouter: {policy: least_loaded}\n"
    )
    config = load_config(path)
    assert config.is_colocated and config.decode.num_replicas == 3 and config.decode.num_cpus == 0.25
    assert config.grpc.host == "0.0.0.0" and config.router.policy == "least_loaded"
    assert config_from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"modle": "x"}, "modle: unknown field"),
        ({"decode": {"num_replcas": 2}}, "decode.num_replcas: unknown field"),
        ({"decode": {"num_replicas": "two"}}, "decode.num_replicas: must be int, got str"),
        ({"decode": {"num_replicas": 0}}, "decode.num_replicas: must be >= 1, got 0"),
        ({"kv_transfer": {"backend": "carrier-pigeon"}}, "kv_transfer.backend: must be one of"),
        ({"grpc": {"port": 70000}}, "grpc.port: must be in [0, 65535]"),
        ({"mode": "mixed"}, "mode: must be one of"),
        ({"block_size": True}, "block_size: must be int, got bool"),
        ({"prefill": {"min_replicas": 1}}, "prefill.min_replicas/max_replicas: set both"),
        ({"router": 3}, "router: must be a mapping"),
        ({"model": "/no/such/dir"}, "model: '/no/such/dir' is not the built-in model id"),
    ],
)
def test_bad_field_is_named(data: dict, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        config_from_dict(data)
    assert message in str(raised.value)


def test_pdserve_serve_refuses_a_mistyped_config(tmp_path: Path) -> None:
    """`pdserve serve --config` with a typo exits non-zero naming the field, before starting anything."""
    path = tmp_path / "bad.yaml"
    path.write_text("decode:\n  num_replcas: 2\n")
    pdserve = Path(sys.executable).parent / "pdserve"
    done = subprocess.run(
        [str(pdserve), "serve", "--config", str(path)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    assert "decode.num_replcas: unknown field" in done.stderr
