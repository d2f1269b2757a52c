"""``PoolConfig.env_vars``: the environment of each replica process, set through Ray's ``runtime_env``
(``MALLOC_ARENA_MAX=2`` by default: glibc's per-thread arenas fragmented a prefill replica's heap in a soak).
That a replica process really has it is checked in tests/integration/test_int_reliability_migration.py."""

from __future__ import annotations

import pytest
from ray.serve._private.build_app import build_app as serve_build_app

from cluster.app import _actor_options, build_application
from cluster.config import ClusterConfig, ConfigError, config_from_dict
from engine.builtin import BUILTIN_MODEL_ID

TINY = {"engine": {"model": BUILTIN_MODEL_ID}}


def test_every_pool_sets_malloc_arena_max_by_default() -> None:
    config = config_from_dict(TINY)
    for name in ("prefill", "decode", "ingress"):
        assert config.pool(name).env_vars == {"MALLOC_ARENA_MAX": "2"}
        assert _actor_options(config.pool(name))["runtime_env"] == {"env_vars": {"MALLOC_ARENA_MAX": "2"}}
    assert "env_vars" not in config.model_dump(exclude_unset=True).get("decode", {})  # a default, not set


def test_env_vars_can_be_replaced_or_emptied_per_pool() -> None:
    config = config_from_dict(TINY).override({"decode.env_vars": {}, "prefill.env_vars": {"FOO": "1"}})
    assert "runtime_env" not in _actor_options(config.decode)
    assert _actor_options(config.prefill)["runtime_env"] == {"env_vars": {"FOO": "1"}}
    assert config.ingress.env_vars == {"MALLOC_ARENA_MAX": "2"}
    assert config_from_dict(config.to_dict()) == config


@pytest.mark.parametrize("env", [{"": "1"}, {"A=B": "1"}, {"1X": "1"}, {"X": 2}])
def test_bad_names_and_values_are_refused_by_path(env: dict) -> None:
    with pytest.raises(ConfigError, match=r"decode\.env_vars"):
        config_from_dict({**TINY, "decode": {"env_vars": env}})


def test_the_built_deployments_carry_the_runtime_env() -> None:
    config = ClusterConfig.model_validate(TINY).override({"prefill.env_vars": {}})
    built = serve_build_app(build_application(config), name="x")
    env = {d.name: d.ray_actor_options.get("runtime_env", {}).get("env_vars") for d in built.deployments}
    assert env == {
        "PrefillDeployment": None,
        "DecodeDeployment": {"MALLOC_ARENA_MAX": "2"},
        "IngressDeployment": {"MALLOC_ARENA_MAX": "2"},
    }


def test_fixed_pools_are_deployed_for_serve_external_scaling_autoscaled_ones_not() -> None:
    from cluster.app import is_externally_scaled

    config = config_from_dict(TINY)
    assert is_externally_scaled(config)  # scale_pool may set the replica counts
    assert not is_externally_scaled(config.override({"decode.min_replicas": 1, "decode.max_replicas": 2}))
    # colocated: only the decode pool runs; a prefill section with bounds does not count
    colocated = config.override({"mode": "colocated", "prefill.min_replicas": 1, "prefill.max_replicas": 2})
    assert is_externally_scaled(colocated)
