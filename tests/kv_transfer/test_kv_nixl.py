"""NIXL (UCX) backend between two processes."""

from __future__ import annotations

import pytest

from kv_transfer import NixlConfig
from tests.kv_transfer.transport_scenarios import TIMEOUT_S, Scenarios

pytest.importorskip("nixl._api")  # installed in .venv; a missing install fails loudly in CI's import check

pytestmark = pytest.mark.integration


class TestNixl(Scenarios):
    config = NixlConfig(timeout_s=TIMEOUT_S)
