"""The ingress replica's gRPC server runs on uvloop (Ray's workers install uvloop's loop policy; see
cluster/ingress.py): asked through Serve, the replica names the class of its running event loop."""

from __future__ import annotations

import pytest

from tests.integration.int_helpers import cluster_config

pytestmark = pytest.mark.integration


def test_ingress_event_loop_is_uvloop(pd_cluster) -> None:
    from ray import serve

    cluster = pd_cluster.ensure(cluster_config())
    ingress = serve.get_app_handle(cluster.config.app_name)
    assert ingress.event_loop.remote().result(timeout_s=30) == "uvloop.Loop"
