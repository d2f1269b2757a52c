"""capacity plans and simulates without torch or Ray (only capacity.calibrate imports the engine)."""

from __future__ import annotations

import subprocess
import sys


def test_plan_and_simulate_import_neither_torch_nor_ray() -> None:
    code = (
        "import sys, capacity.cli, capacity.simulate_cli, capacity.sim, capacity.scaling; "
        "print(sorted(m for m in ('torch', 'ray') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
