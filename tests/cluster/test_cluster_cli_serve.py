"""``pdserve serve`` refuses a configuration that fails at start (a cuda pool where torch sees no GPU)
with one line naming the field and exit code 2, before Ray starts; ``--mode`` offers the config's
modes (cluster.config.MODES)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cluster.cli import main
from cluster.config import MODES


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where torch sees no GPU")
def test_serve_refuses_cuda_without_a_gpu_naming_the_field(tmp_path: Path) -> None:
    path = tmp_path / "cuda.yaml"
    path.write_text(
        "engine: {model: pdserve-builtin-tiny}\nkv_transfer: {backend: nixl}\n"
        "prefill: {num_gpus: 1, device: cuda}\n"
    )
    result = CliRunner().invoke(main, ["serve", "--config", str(path), "--port", "0"])
    assert result.exit_code == 2, result.output
    assert "pdserve: invalid configuration: prefill.device: cuda requested" in result.stderr
    assert "Traceback" not in result.output


def test_serve_mode_choices_are_the_config_modes() -> None:
    result = CliRunner().invoke(main, ["serve", "--mode", "nonsense"])
    assert result.exit_code == 2
    assert all(mode in result.stderr for mode in MODES)
