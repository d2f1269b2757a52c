"""deploy/: KubeRay manifests against the CRD schemas (offline), the Serve config against Serve's
schema and this repository's code, and the copies of the config kept in step.

The CRD schemas are KubeRay's own (schemas/kuberay in ../shared beside the repository). A
Kubernetes API server prunes unknown fields silently, so the validator here is stricter than plain
JSON Schema: an object schema that lists its properties refuses any other key (a typo such as
``minReplica`` fails instead of vanishing).
"""

from __future__ import annotations

import copy
import functools
import importlib
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.shared_data import require_shared

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
SCHEMAS = "schemas/kuberay"  # under ../shared
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayService": "ray.io_rayservices.yaml"}


def _load(name: str) -> Any:
    return yaml.safe_load((DEPLOY / name).read_text())


def _strict(schema: Any) -> Any:
    """A copy of an openAPIV3Schema where listed properties are the only allowed ones."""
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: _strict(value) for key, value in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@functools.cache
def _validator(kind: str, api_version: str) -> jsonschema.Draft7Validator:
    path = require_shared(f"{SCHEMAS}/{CRD_FILES[kind]}")
    # The CRDs are ~1 MB each: parse with libyaml when available, once per session.
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    version = api_version.split("/")[1]
    served = [v for v in crd["spec"]["versions"] if v["name"] == version and v.get("served")]
    assert served, f"{kind} {api_version} is not a served version of the CRD"
    return jsonschema.Draft7Validator(_strict(served[0]["schema"]["openAPIV3Schema"]))


def _errors(kind: str, manifest: dict[str, Any]) -> list[str]:
    validator = _validator(kind, manifest["apiVersion"])
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(manifest)]


def _serve_config() -> dict[str, Any]:
    return _load("serve-config.yaml")


def _app() -> dict[str, Any]:
    (app,) = _serve_config()["applications"]
    return app


def _deployments() -> dict[str, dict[str, Any]]:
    return {d["name"]: d for d in _app()["deployments"]}


# ---- KubeRay CRD schemas ----


def test_raycluster_manifest_matches_the_crd_schema() -> None:
    manifest = _load("raycluster.yaml")
    assert manifest["kind"] == "RayCluster"
    assert _errors("RayCluster", manifest) == []


def test_rayservice_manifest_and_its_cluster_match_the_crd_schemas() -> None:
    service = _load("rayservice.yaml")
    assert service["kind"] == "RayService"
    assert _errors("RayService", service) == []
    # rayClusterConfig is a RayCluster spec: check it against the RayCluster CRD as well.
    as_cluster = {"apiVersion": service["apiVersion"], "kind": "RayCluster", "metadata": {"name": "x"},
                  "spec": service["spec"]["rayClusterConfig"]}
    assert _errors("RayCluster", as_cluster) == []


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda m: m["spec"]["workerGroupSpecs"][1].update(minReplica=1), "minReplica"),
        (lambda m: m["spec"]["workerGroupSpecs"][1].update(maxReplicas="8"), "is not of type 'integer'"),
        (lambda m: m["spec"]["workerGroupSpecs"][2].pop("groupName"), "'groupName' is a required property"),
        (lambda m: m["spec"]["workerGroupSpecs"][2].update(resources={"prefill": 1}),
         "is not of type 'string'"),
        (lambda m: m["spec"]["autoscalerOptions"].update(upscalingMode="Fast"), "is not one of"),
    ],
)
def test_the_validator_rejects_typos_and_wrong_types(mutate: Any, expected: str) -> None:
    manifest = copy.deepcopy(_load("raycluster.yaml"))
    mutate(manifest)
    errors = _errors("RayCluster", manifest)
    assert any(expected in e for e in errors), errors


def test_the_rayservice_embeds_the_raycluster_spec_and_the_serve_config() -> None:
    service = _load("rayservice.yaml")
    assert service["spec"]["rayClusterConfig"] == _load("raycluster.yaml")["spec"]
    assert yaml.safe_load(service["spec"]["serveConfigV2"]) == _serve_config()
    assert _app()["args"] == _load("cluster-config.yaml")


# ---- node groups and Serve placement ----


def _groups() -> dict[str, dict[str, Any]]:
    return {g["groupName"]: g for g in _load("raycluster.yaml")["spec"]["workerGroupSpecs"]}


def _container_limits(group: dict[str, Any]) -> dict[str, str]:
    (container,) = group["template"]["spec"]["containers"]
    return container["resources"]["limits"]


@pytest.mark.parametrize(
    ("deployment", "group"),
    [("PrefillDeployment", "prefill"), ("DecodeDeployment", "decode"), ("IngressDeployment", "ingress")],
)
def test_each_deployment_lands_on_its_own_worker_group(deployment: str, group: str) -> None:
    groups = _groups()
    options = _deployments()[deployment]["ray_actor_options"]
    (resource,) = options["resources"]
    # Exactly one worker group (and not the head) advertises the custom resource the deployment asks for.
    owners = [name for name, g in groups.items() if resource in g.get("resources", {})]
    assert owners == [group]
    head = _load("raycluster.yaml")["spec"]["headGroupSpec"]
    assert resource not in head.get("resources", {})
    # One pod fits one replica: CPU, GPU and the custom resource per pod cover the request.
    limits = _container_limits(groups[group])
    assert float(limits["cpu"]) >= options["num_cpus"]
    assert float(limits.get("nvidia.com/gpu", 0)) >= options.get("num_gpus", 0)
    assert float(groups[group]["resources"][resource]) >= options["resources"][resource]


def test_gpu_pools_have_gpus_and_room_for_their_replica_bounds() -> None:
    groups, deployments = _groups(), _deployments()
    for deployment, group in (("PrefillDeployment", "prefill"), ("DecodeDeployment", "decode")):
        assert float(_container_limits(groups[group])["nvidia.com/gpu"]) >= 1
        autoscaling = deployments[deployment]["autoscaling_config"]
        per_pod = float(groups[group]["resources"][group]) // deployments[deployment]["ray_actor_options"][
            "resources"][group]
        assert autoscaling["max_replicas"] <= groups[group]["maxReplicas"] * per_pod
        assert autoscaling["min_replicas"] >= 1
    # Ingress: one replica per pod (it binds the gRPC port), and enough pods for its replicas.
    ingress = deployments["IngressDeployment"]
    assert ingress["max_replicas_per_node"] == 1
    assert groups["ingress"]["maxReplicas"] >= ingress["num_replicas"]
    assert _app()["args"]["grpc"]["port"] == 50051
    service = _load("grpc-service.yaml")
    pod_labels = groups["ingress"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    for name, group in groups.items():
        if name != "ingress":
            assert not service["spec"]["selector"].items() <= group["template"]["metadata"]["labels"].items()


def test_every_pod_mounts_the_model_directory() -> None:
    # The app builder validates `model` (a directory) wherever Serve runs the build task, and every
    # replica loads the tokenizer or weights from it: all pods need the mount.
    model = Path(_app()["args"]["engine"]["model"])
    assert model.is_absolute()
    spec = _load("raycluster.yaml")["spec"]
    templates = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    for template in templates:
        (container,) = template["spec"]["containers"]
        mounts = [Path(m["mountPath"]) for m in container["volumeMounts"]]
        assert any(model.is_relative_to(m) for m in mounts), container["name"]


# ---- the Serve config against Serve and this repository ----


def test_serve_config_validates_with_serve_schema() -> None:
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(_serve_config())
    assert [a.name for a in schema.applications] == ["pdserve"]


def test_import_and_policy_paths_resolve_to_real_attributes() -> None:
    from ray.serve.config import AutoscalingConfig

    from cluster.autoscaling import DecodePolicyConfig, PrefillPolicyConfig, policy_config_from_kwargs

    def resolve(path: str) -> Any:
        module, _, attr = path.partition(":")
        return getattr(importlib.import_module(module), attr)

    app = _app()
    assert callable(resolve(app["import_path"]))
    app_policy = app["autoscaling_policy"]
    policy = resolve(app_policy["policy_function"])(**app_policy["policy_kwargs"])
    assert callable(policy)
    config_types = {"cluster.autoscaling:prefill_policy": PrefillPolicyConfig,
                    "cluster.autoscaling:decode_policy": DecodePolicyConfig}
    seen = set()
    for deployment in app["deployments"]:
        autoscaling = deployment.get("autoscaling_config")
        if autoscaling is None:
            continue
        policy_path = autoscaling["policy"]["policy_function"]
        assert callable(resolve(policy_path))
        # Serve's own model imports and pickles the policy; ours validates the kwargs by field.
        AutoscalingConfig(**autoscaling)
        policy_config_from_kwargs(config_types[policy_path], autoscaling["policy"]["policy_kwargs"])
        seen.add(policy_path)
    assert seen == set(config_types)


def _args_for_this_machine() -> dict[str, Any]:
    # The only field that cannot hold here: `model` names a directory on the pods' models volume
    # (checked above against the mounts). Everything else is validated as written.
    from engine.builtin import BUILTIN_MODEL_ID

    args = _app()["args"]
    return {**args, "engine": {**args["engine"], "model": BUILTIN_MODEL_ID}}


def test_embedded_cluster_config_validates_with_cluster_config() -> None:
    from cluster.config import ConfigError, config_from_dict

    config = config_from_dict(_args_for_this_machine())
    assert (config.kv_transfer.backend, config.engine.dtype) == ("nixl", "bfloat16")
    assert config.grpc.host == "0.0.0.0" and config.decode.device == "cuda"  # parses without a GPU
    assert config.prefill.is_autoscaling and config.decode.is_autoscaling
    with pytest.raises(ConfigError, match="model"):
        config_from_dict(_app()["args"])  # the pods' path does not exist on this machine
    with pytest.raises(ConfigError, match="max_replcas"):
        config_from_dict({**_args_for_this_machine(), "decode": {"max_replcas": 2}})


def test_the_builder_builds_and_the_overrides_match_its_deployments() -> None:
    from ray.serve._private.build_app import build_app as serve_build_app

    from cluster.app import build_app

    args = _args_for_this_machine()
    built = serve_build_app(build_app(args), name=_app()["name"])
    names = {d.name for d in built.deployments}
    overrides = _deployments()
    assert set(overrides) == names  # every deployment is placed; no override names a missing one
    # ray_actor_options in the config replace the code's: they must agree with the cluster config.
    for name, pool in (("PrefillDeployment", "prefill"), ("DecodeDeployment", "decode"),
                       ("IngressDeployment", "ingress")):
        options = overrides[name]["ray_actor_options"]
        assert options["num_cpus"] == args[pool]["num_cpus"]
        assert options.get("num_gpus", 0) == args[pool].get("num_gpus", 0)
        # the replica environment too (the pool's env_vars: MALLOC_ARENA_MAX=2 unless args say otherwise)
        code_env = next(d for d in built.deployments if d.name == name).ray_actor_options["runtime_env"]
        assert options["runtime_env"] == code_env == {"env_vars": {"MALLOC_ARENA_MAX": "2"}}
    for name, pool in (("PrefillDeployment", "prefill"), ("DecodeDeployment", "decode")):
        autoscaling = overrides[name]["autoscaling_config"]
        assert (autoscaling["min_replicas"], autoscaling["max_replicas"]) == (
            args[pool]["min_replicas"], args[pool]["max_replicas"])
        code_config = next(d for d in built.deployments if d.name == name)._deployment_config
        code_policy = code_config.autoscaling_config.policy.policy_function
        assert code_policy == autoscaling["policy"]["policy_function"]
    assert overrides["IngressDeployment"]["num_replicas"] == args["ingress"]["num_replicas"]


# ---- versions and the container recipe ----


def test_ray_and_torch_versions_agree_with_the_environment() -> None:
    import ray

    assert _load("raycluster.yaml")["spec"]["rayVersion"] == ray.__version__
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    makefile = (REPO / "Makefile").read_text()
    make_torch = re.search(r"^TORCH\s*\?=\s*torch==(\S+)", makefile, re.M)
    docker_torch = re.search(r"^ARG TORCH_VERSION=(\S+)", dockerfile, re.M)
    assert make_torch and docker_torch and make_torch.group(1) == docker_torch.group(1)
    # Every top-level package the project installs is copied into the image.
    pyproject = (REPO / "pyproject.toml").read_text()
    include = re.search(r"^include = \[(.*)\]", pyproject, re.M)
    assert include
    for package in re.findall(r'"(\w+)\*"', include.group(1)):
        assert re.search(rf"^COPY {package} {package}$", dockerfile, re.M), package


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed: kustomize build not run")
def test_kustomization_builds() -> None:
    out = subprocess.run(["kubectl", "kustomize", str(DEPLOY)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    kinds = [doc["kind"] for doc in yaml.safe_load_all(out.stdout) if doc]
    assert sorted(kinds) == ["PersistentVolumeClaim", "RayService", "Service"]
