"""torch.distributed (gloo) backend between two processes."""

from __future__ import annotations

import pytest

from kv_transfer import TorchDistConfig
from tests.kv_transfer.transport_scenarios import TIMEOUT_S, Scenarios

pytestmark = pytest.mark.integration


class TestTorchDist(Scenarios):
    config = TorchDistConfig(timeout_s=TIMEOUT_S)
