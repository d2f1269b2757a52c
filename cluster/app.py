"""The Serve application: ingress + prefill pool + decode pool, from one ``ClusterConfig``.

``build_app(args)`` is Serve's application-builder entry point (``import_path: cluster.app:build_app``
in a KubeRay ``serveConfigV2``; ``args`` is the parsed cluster YAML). ``pdserve serve`` and
``EmbeddedCluster`` call the same builder. In colocated mode there is no prefill deployment: each decode
replica prefills and decodes its own requests.
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.deployment import Application

from cluster.config import ClusterConfig, PoolConfig, PoolName, config_from_dict
from cluster.deployments import DecodeDeployment, PrefillDeployment
from cluster.ingress import IngressDeployment
from cluster.request_path import DECODE_DEPLOYMENT, PREFILL_DEPLOYMENT

INGRESS_DEPLOYMENT = "IngressDeployment"
DEPLOYMENT_OF_POOL = {
    "prefill": PREFILL_DEPLOYMENT, "decode": DECODE_DEPLOYMENT, "ingress": INGRESS_DEPLOYMENT
}
AUTOSCALING_POLICIES = {
    PREFILL_DEPLOYMENT: "cluster.autoscaling:prefill_policy",
    DECODE_DEPLOYMENT: "cluster.autoscaling:decode_policy",
}


def build_app(args: dict[str, Any] | None = None) -> Application:
    """Serve application builder: ``args`` is the cluster YAML as a dict (unknown fields refused)."""
    return build_application(config_from_dict(args or {}))


def build_application(config: ClusterConfig) -> Application:
    """The bound application for ``config``.

    A pool's ``device: cuda`` is checked where its replicas start (each replica, and ``EmbeddedCluster``
    on its own machine), not here: on KubeRay this builder runs on a head node that may have no GPU."""
    config_dict = config.to_dict()
    decode = _deployment(DecodeDeployment, DECODE_DEPLOYMENT, config.decode, config).bind(config_dict)
    prefill = None
    if not config.is_colocated:
        prefill = _deployment(PrefillDeployment, PREFILL_DEPLOYMENT, config.prefill, config).bind(config_dict)
    ingress = serve.deployment(
        IngressDeployment,
        name=INGRESS_DEPLOYMENT,
        num_replicas=config.ingress.num_replicas,
        max_ongoing_requests=config.ingress.max_ongoing_requests,
        ray_actor_options=_actor_options(config.ingress),
    )
    return ingress.bind(config_dict, prefill, decode)


def is_externally_scaled(config: ClusterConfig) -> bool:
    """Whether ``scale_pool`` may set the pools' replica counts: when no pool autoscales (Serve refuses its
    external scaling API beside its own autoscaling). ``EmbeddedCluster`` deploys with it so."""
    return not any(config.pool(name).is_autoscaling for name in config.worker_pools)


def scale_pool(app_name: str, pool: PoolName, num_replicas: int) -> None:
    """Set a fixed-size pool's replica count in place through Serve's external scaling API (what the
    dashboard's ``POST /api/v1/applications/{app}/deployments/{deployment}/scale`` calls): the other replicas
    keep running; a removed one drains (Serve's graceful shutdown: a decode replica's streams finish within
    ``migration.drain_timeout_s``, then Serve kills it and the ones left migrate, ``cluster.migration``)."""
    import ray
    from ray.serve._private.common import DeploymentID
    from ray.serve.context import _get_global_client

    deployment = DeploymentID(name=DEPLOYMENT_OF_POOL[pool], app_name=app_name)
    controller = _get_global_client()._controller  # the dashboard's route is off in the embedded cluster
    ray.get(controller.update_deployment_replicas.remote(deployment, num_replicas))


def _actor_options(pool: PoolConfig) -> dict[str, Any]:
    """Ray options of one replica: CPUs, GPUs, the pool's custom resources (node placement) and the
    environment of its process (``env_vars``, as a ``runtime_env``: Ray merges it with the job's own
    env_vars, and it reaches replicas on every node, KubeRay's included)."""
    options: dict[str, Any] = {"num_cpus": pool.num_cpus, "num_gpus": pool.num_gpus}
    if pool.resources:
        options["resources"] = dict(pool.resources)
    if pool.env_vars:
        options["runtime_env"] = {"env_vars": dict(pool.env_vars)}
    return options


def _deployment(cls: type, name: str, pool: PoolConfig, config: ClusterConfig) -> Any:
    options: dict[str, Any] = {
        "name": name,
        "max_ongoing_requests": pool.max_ongoing_requests,
        "ray_actor_options": _actor_options(pool),
        "request_router_config": RequestRouterConfig(
            request_router_class="cluster.routing.TargetedRequestRouter",
            request_routing_stats_period_s=config.router.load_report_period_s,
            request_routing_stats_timeout_s=max(1.0, 5 * config.router.load_report_period_s),
        ),
        "health_check_period_s": 2.0,
        # decode: a replica being removed finishes its streams for this long, then the rest migrate
        "graceful_shutdown_timeout_s": config.migration.drain_timeout_s if name == DECODE_DEPLOYMENT else 5.0,
    }
    if pool.is_autoscaling:
        options["autoscaling_config"] = {
            "min_replicas": pool.min_replicas,
            "max_replicas": pool.max_replicas,
            "initial_replicas": pool.min_replicas,
            "upscale_delay_s": 2.0,
            "downscale_delay_s": 30.0,
            "policy": {
                "policy_function": AUTOSCALING_POLICIES[name],
                "policy_kwargs": _policy_kwargs(config, name),
            },
        }
    else:
        options["num_replicas"] = pool.num_replicas
    return serve.deployment(cls, **options)


def _policy_kwargs(config: ClusterConfig, name: str) -> dict[str, Any]:
    """The pool policy's knobs from the cluster's ``autoscaling`` section (only the ones set there)."""
    policy = config.autoscaling.prefill if name == PREFILL_DEPLOYMENT else config.autoscaling.decode
    return policy.model_dump(exclude_unset=True)
