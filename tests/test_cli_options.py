"""The ``pdserve`` commands' address options: ``--ray-address`` (serve), ``--server`` (the clients); the old
ambiguous ``--address`` stops with a message naming the new option."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from cluster.cli import main


@pytest.mark.parametrize(
    ("command", "new"),
    [(["serve"], "--ray-address"), (["generate", "hi"], "--server"), (["info"], "--server"),
     (["bench"], "--server")],
)  # fmt: skip
def test_address_was_renamed(command: list[str], new: str) -> None:
    result = CliRunner().invoke(main, [*command, "--address", "10.0.0.1:6379"])
    assert result.exit_code == 2
    assert f"--address was removed: use {new} 10.0.0.1:6379" in result.output
    help_text = CliRunner().invoke(main, [command[0], "--help"]).output
    assert new in help_text and "--address" not in help_text
