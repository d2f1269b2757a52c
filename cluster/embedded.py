"""``EmbeddedCluster``: a local Ray + the pdserve Serve application, as a context manager.

Used by ``pdserve serve`` (no ``--ray-address``), the tests and the benchmarks::

    with EmbeddedCluster(ClusterConfig()) as cluster:
        print(cluster.grpc_address)     # "127.0.0.1:50051"
        print(cluster.http_address)     # "127.0.0.1:8000" (the OpenAI API; "" when http.enabled is off)

Ray is started with ``include_dashboard=False``, a ``_temp_dir`` under /tmp, and bound to 127.0.0.1 as
far as Ray allows (its core processes still listen on all interfaces; see docs/operations.md). Serve
runs with its HTTP/gRPC proxies disabled: the ingress replicas serve gRPC themselves. When Ray is
already initialized in this process (the tests' session fixture, or ``--ray-address``), it is reused and
left running on exit; only the application is deleted.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from types import TracebackType
from typing import Any

from cluster.config import ClusterConfig

logger = logging.getLogger(__name__)

RAY_TEMP_DIR = os.path.join(tempfile.gettempdir(), "pdserve-ray")


def init_local_ray(num_cpus: int | None = None, address: str | None = None) -> bool:
    """Start (or join, with ``address``) Ray in this process; False when it was already initialized."""
    import ray

    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {
        "include_dashboard": False,
        "log_to_driver": False,
        "configure_logging": True,
        "logging_level": logging.WARNING,
    }
    if address is not None:
        ray.init(address=address, **kwargs)
    else:
        os.makedirs(RAY_TEMP_DIR, exist_ok=True)
        ray.init(num_cpus=num_cpus, _temp_dir=RAY_TEMP_DIR, _node_ip_address="127.0.0.1", **kwargs)
    return True


def start_serve() -> None:
    """Serve's controller with no proxies (the ingress replicas serve gRPC themselves)."""
    from ray import serve

    serve.start(proxy_location="Disabled")


class EmbeddedCluster:
    """Starts the application on a local (or joined) Ray; ``grpc_address`` once started."""

    def __init__(
        self,
        config: ClusterConfig | None = None,
        address: str | None = None,
        num_cpus: int | None = None,
        ready_timeout_s: float = 120.0,
    ) -> None:
        self.config = config or ClusterConfig()
        self.address = address
        self.num_cpus = num_cpus
        self.ready_timeout_s = ready_timeout_s
        self.grpc_address = ""
        self.http_address = ""
        self._owns_ray = False
        self._has_ray = False  # start() got as far as Ray: stop() has something to clean up

    def start(self) -> EmbeddedCluster:
        from ray import serve

        from cluster.app import build_application, is_externally_scaled

        if self.address is None:  # the replicas run on this machine: it must have the GPUs they ask for
            self.config.check_devices()
        self._owns_ray = init_local_ray(self.num_cpus, self.address)
        self._has_ray = True
        start_serve()
        started = time.perf_counter()
        handle = serve.run(
            build_application(self.config),
            name=self.config.app_name,
            route_prefix=None,
            external_scaler_enabled=is_externally_scaled(self.config),  # cluster.app.scale_pool
        )
        self.grpc_address = handle.grpc_address.remote().result(timeout_s=self.ready_timeout_s)
        self.http_address = handle.http_address.remote().result(timeout_s=self.ready_timeout_s)
        logger.info(
            "pdserve app %r up in %.1fs on %s",
            self.config.app_name,
            time.perf_counter() - started,
            self.grpc_address,
        )
        return self

    def redeploy(self, config: ClusterConfig) -> EmbeddedCluster:
        """Replace the application with one built from ``config`` (same Ray and Serve)."""
        self.delete_app()
        self.config = config
        return self.start()

    def delete_app(self) -> None:
        from ray import serve

        serve.delete(self.config.app_name, _blocking=True)

    def stop(self) -> None:
        """Delete the app; shut Serve and Ray down when this object started Ray."""
        import ray
        from ray import serve

        if not self._has_ray:  # refused before Ray (e.g. a cuda pool without a GPU): nothing to undo
            return
        try:
            self.delete_app()
        finally:
            if self._owns_ray:
                serve.shutdown()
                ray.shutdown()

    def __enter__(self) -> EmbeddedCluster:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()
