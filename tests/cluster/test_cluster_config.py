"""Cluster configuration: YAML -> ClusterConfig; unknown or mistyped fields are refused by dotted path."""

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


def test_the_default_model_is_smollm2_in_bfloat16_and_its_kv_pool_holds_32_chat_streams() -> None:
    from engine.builtin import SMOLLM2_MODEL_ID
    from engine.config import EngineConfig
    from engine.kv_memory import KVShape

    config = load_config(None)
    assert (config.engine.model, config.engine.dtype) == (SMOLLM2_MODEL_ID, "bfloat16")
    engine = config.engine_for("prefill")
    assert type(engine) is EngineConfig and engine.model == SMOLLM2_MODEL_ID  # replicas get the defaults
    smollm2 = KVShape(num_layers=30, num_kv_heads=3, head_dim=64, dtype="bfloat16")  # 23,040 B/token
    assert smollm2.num_blocks(engine.kv_cache_bytes, engine.block_size) * engine.block_size >= 32 * 512
    # a partial engine section keeps the cluster's defaults; the engine's own default stays the tiny model
    partial = config_from_dict({"engine": {"block_size": 32}})
    assert (partial.engine.model, partial.engine.dtype) == (SMOLLM2_MODEL_ID, "bfloat16")
    assert EngineConfig().model == "pdserve-builtin-tiny"


def test_model_accepts_ids_gguf_files_and_directories(tmp_path: Path) -> None:
    from engine.builtin import BUILTIN_MODEL_ID, smollm2_gguf_path

    for model in (BUILTIN_MODEL_ID, smollm2_gguf_path(), str(Path(smollm2_gguf_path()).parent)):
        assert config_from_dict({"engine": {"model": model}}).engine.model == model
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"^engine\.model: .* not a GGUF file"):
        config_from_dict({"engine": {"model": str(tmp_path / "weights.bin")}})
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(ConfigError, match=r"^engine\.model: .*2 GGUF files"):
        config_from_dict({"engine": {"model": str(tmp_path)}})


def test_yaml_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text(
        "mode: colocated\nengine: {kv_cache_bytes: 1048576}\ndecode:\n  num_replicas: 3\n  num_cpus: 0.25\n"
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
        ({"model": "x"}, "model: unknown field"),  # the model is engine.model now
        ({"decode": {"num_replcas": 2}}, "decode.num_replcas: unknown field"),
        ({"decode": {"num_replicas": "two"}}, "decode.num_replicas: must be int, got str"),
        ({"decode": {"num_replicas": None}}, "decode.num_replicas: must be int, got NoneType"),
        ({"decode": {"num_replicas": 0}}, "decode.num_replicas: must be >= 1, got 0"),
        ({"kv_transfer": {"backend": "carrier-pigeon"}}, "kv_transfer.backend: must be one of"),
        ({"grpc": {"port": 70000}}, "grpc.port: must be <= 65535, got 70000"),
        ({"mode": "mixed"}, "mode: must be one of"),
        ({"engine": {"block_size": True}}, "engine.block_size: must be int, got bool"),
        ({"engine": {"kv_cache_bytes": 0}}, "engine.kv_cache_bytes: must be > 0, got 0"),
        ({"prefill": {"min_replicas": 1}}, "prefill.min_replicas/max_replicas: set both"),
        ({"router": 3}, "router: must be a mapping"),
        ({"engine": {"model": "/no/such/dir"}}, "engine.model: '/no/such/dir' is not the built-in model id"),
        ({"kv_transfer": {"timeout_s": 0}}, "kv_transfer.timeout_s: must be > 0"),
        ({"prefill": {"device": "tpu"}}, "prefill.device: must be one of 'cpu' or 'cuda', got 'tpu'"),
        ({"prefill": {"resources": {"node_a": -1}}}, "prefill.resources.node_a: must be >= 0"),
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


@pytest.mark.parametrize(
    ("data", "path"),
    [
        ({"engine": {"dtyp": "float32"}}, "engine.dtyp"),
        ({"kv_transfer": {"timeout": 5}}, "kv_transfer.timeout"),
        ({"kv_transfer": {"backend": "nixl", "num_thread": 2}}, "kv_transfer.num_thread"),
        ({"kv_transfer": {"backend": "nixl", "shm_dir": "/dev/shm"}}, "kv_transfer.shm_dir"),  # shm's field
        ({"router": {"polcy": "round_robin"}}, "router.polcy"),
        ({"prefill": {"num_cpu": 1}}, "prefill.num_cpu"),
        ({"ingress": {"devices": "cpu"}}, "ingress.devices"),
        ({"autoscaling": {"decode": {"target_kv_used": 0.5}}}, "autoscaling.decode.target_kv_used"),
        ({"autoscaling": {"prefil": {}}}, "autoscaling.prefil"),
        ({"grpc": {"hots": "0.0.0.0"}}, "grpc.hots"),
    ],
)
def test_a_misspelled_key_at_every_level_names_its_dotted_path(data: dict, path: str) -> None:
    with pytest.raises(ConfigError) as raised:
        config_from_dict(data)
    assert str(raised.value).startswith(f"{path}: unknown field")


def test_sections_are_the_components_own_configs() -> None:
    from engine.config import EngineConfig
    from kv_transfer.config import NixlConfig
    from router.config import RouterConfig

    config = config_from_dict(
        {"engine": {"block_size": 32}, "kv_transfer": {"backend": "nixl", "timeout_s": 5, "num_threads": 2}}
    )
    assert isinstance(config.engine, EngineConfig) and isinstance(config.router, RouterConfig)
    assert config.kv_transfer == NixlConfig(timeout_s=5.0, num_threads=2)
    assert config.router.block_size == 32  # derived from the engine's, never set twice
    with pytest.raises(ConfigError, match=r"^router\.block_size: must equal engine\.block_size \(32\)"):
        config_from_dict({"engine": {"block_size": 32}, "router": {"block_size": 16}})
    with pytest.raises(ConfigError, match=r"^kv_transfer\.backend: must be one of"):
        config_from_dict({"kv_transfer": {"backend": "carrier-pigeon"}})


def test_pool_device_and_dtype_default_from_gpus_and_engine() -> None:
    config = config_from_dict({"engine": {"dtype": "bfloat16"}, "kv_transfer": {"backend": "nixl"},
                               "decode": {"num_gpus": 1}, "prefill": {"num_gpus": 0.5, "device": "cuda"}})
    assert (config.prefill.device, config.decode.device, config.ingress.device) == ("cuda", "cuda", "cpu")
    assert config.prefill.dtype == config.decode.dtype == "bfloat16"
    assert config_from_dict({}).decode.device == "cpu"
    with pytest.raises(ConfigError, match=r"^decode\.device: cuda needs num_gpus > 0"):
        config_from_dict({"decode": {"device": "cuda"}})


def test_prefill_and_decode_kv_dtypes_must_match() -> None:
    with pytest.raises(ConfigError, match=r"^decode\.dtype: must equal prefill\.dtype \(bfloat16\)"):
        config_from_dict({"decode": {"dtype": "float32"}})
    colocated = config_from_dict({"mode": "colocated", "decode": {"dtype": "float32"}})  # no KV moves
    assert colocated.engine_for("decode").dtype == "float32"


def test_shm_cannot_serve_gpu_memory_nor_cross_nodes() -> None:
    gpu_decode = {"decode": {"num_gpus": 1}, "prefill": {"num_gpus": 1}}
    with pytest.raises(ConfigError, match=r"^kv_transfer\.backend: shm cannot serve GPU memory"):
        config_from_dict(gpu_decode)
    apart = {"prefill": {"resources": {"node_a": 1}}, "decode": {"resources": {"node_b": 1}}}
    with pytest.raises(ConfigError, match=r"^kv_transfer\.backend: shm cannot cross nodes"):
        config_from_dict(apart)
    with pytest.raises(ConfigError, match=r"^kv_transfer\.host: 127\.0\.0\.1 is not reachable"):
        config_from_dict({**apart, "kv_transfer": {"backend": "torch_dist"}})
    config = config_from_dict({**apart, "kv_transfer": {"backend": "torch_dist", "host": "auto"}})
    assert config.decode.resources == {"node_b": 1.0}
    assert config_from_dict({**gpu_decode, "kv_transfer": {"backend": "nixl"}}).decode.device == "cuda"


def test_engine_for_applies_the_pools_settings() -> None:
    config = config_from_dict(
        {
            "engine": {"dtype": "bfloat16", "kv_cache_bytes": 2**20, "max_model_len": 512},
            "mode": "colocated",
            "prefill": {"torch_threads": 3},
            "decode": {"torch_threads": 2, "num_gpus": 1, "dtype": "float16"},
        }
    )
    decode = config.engine_for("decode")
    assert (decode.device, decode.dtype, decode.num_threads) == ("cuda", "float16", 2)
    assert (decode.kv_cache_bytes, decode.max_model_len) == (2**20, 512)  # the rest is the engine's
    prefill = config.engine_for("prefill")
    assert (prefill.device, prefill.dtype, prefill.num_threads) == ("cpu", "bfloat16", 3)
    with pytest.raises(ConfigError, match=r"^engine\.device/num_threads: set them per pool"):
        config_from_dict({"engine": {"device": "cuda"}})


def test_override_validates_and_rederives() -> None:
    config = config_from_dict({"decode": {"num_replicas": 2}})
    changed = config.override({"engine.block_size": 32, "engine.dtype": "bfloat16", "grpc.port": 0})
    assert (changed.engine.block_size, changed.router.block_size, changed.grpc.port) == (32, 32, 0)
    assert changed.prefill.dtype == changed.decode.dtype == "bfloat16"  # defaults follow the engine
    assert changed.decode.num_replicas == 2 and config.engine.block_size == 16  # a copy
    assert config.override({"kv_transfer.backend": "nixl"}).kv_transfer.backend == "nixl"
    with pytest.raises(ConfigError, match=r"^decode\.num_replcas: unknown field"):
        config.override({"decode.num_replcas": 3})
    with pytest.raises(ConfigError, match=r"^grpc\.port: must be <= 65535"):
        config.override({"grpc.port": 70000})
    with pytest.raises(ConfigError, match=r"^mode\.x: mode is not a section"):
        config.override({"mode": "colocated"}).override({"mode.x": 1})


def test_a_cuda_pool_parses_but_the_start_refuses_without_a_gpu() -> None:
    """A GPU cluster's YAML parses on any machine; the start (here, and in each replica) refuses it."""
    import torch

    from cluster.deployments import _build_engine
    from cluster.embedded import EmbeddedCluster

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the refusal is for machines without one")
    config = config_from_dict({"decode": {"num_gpus": 1}, "prefill": {"num_gpus": 1},
                               "kv_transfer": {"backend": "nixl"}})
    assert config.decode.device == "cuda"
    with pytest.raises(ConfigError, match=r"^prefill\.device: cuda requested but torch sees no GPU"):
        EmbeddedCluster(config).start()  # refused before Ray starts
    with pytest.raises(ConfigError, match=r"^decode\.device: cuda requested but torch sees no GPU"):
        _build_engine(config, "decode", None)  # what each decode replica's constructor runs first


def test_autoscaling_section_feeds_the_serve_policy_kwargs() -> None:
    from cluster.app import _policy_kwargs
    from cluster.autoscaling import DecodePolicyConfig, policy_config_from_kwargs

    config = config_from_dict({"autoscaling": {"decode": {"target_kv_blocks_used_fraction": 0.6}}})
    kwargs = _policy_kwargs(config, "DecodeDeployment")
    assert policy_config_from_kwargs(DecodePolicyConfig, kwargs) == config.autoscaling.decode
    assert kwargs == {"target_kv_blocks_used_fraction": 0.6}


def test_nixl_net_devices_parse_from_yaml(tmp_path: Path) -> None:
    path = tmp_path / "nixl.yaml"
    path.write_text("kv_transfer: {backend: nixl, net_devices: 'mlx5_0:1,eth0'}\n")
    assert load_config(str(path)).kv_transfer.net_devices == "mlx5_0:1,eth0"
    assert config_from_dict({"kv_transfer": {"backend": "nixl"}}).kv_transfer.net_devices is None  # UCX picks
    with pytest.raises(ConfigError, match=r"^kv_transfer\.net_devices: must not be empty"):
        config_from_dict({"kv_transfer": {"backend": "nixl", "net_devices": ""}})
    with pytest.raises(ConfigError, match=r"^kv_transfer\.net_devices: unknown field"):
        config_from_dict({"kv_transfer": {"net_devices": "eth0"}})  # shm has no network devices
