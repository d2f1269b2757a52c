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

from cluster.config import ClusterConfig, PoolConfig, config_from_dict
from cluster.deployments import DecodeDeployment, PrefillDeployment
from cluster.ingress import IngressDeployment
from cluster.request_path import DECODE_DEPLOYMENT, PREFILL_DEPLOYMENT

INGRESS_DEPLOYMENT = "IngressDeployment"
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
