"""The ``pdserve`` commands' address options: ``--ray-address`` (serve), ``--server`` (the clients); the old
ambiguous ``--address`` stops with a message naming the new option."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from cluster.cli import main


@pytest.mark.parametrize(
    ("command", "new"),
    [(["serve"], "--ray-address"), (["generate", "hi"], "--server"), (["info"], "--server"),
     (["bench"], "--server"), (["chat"], "--server")],
)  # fmt: skip
def test_address_was_renamed(command: list[str], new: str) -> None:
    result = CliRunner().invoke(main, [*command, "--address", "10.0.0.1:6379"])
    assert result.exit_code == 2
    assert f"--address was removed: use {new} 10.0.0.1:6379" in result.output
    help_text = CliRunner().invoke(main, [command[0], "--help"]).output
    assert new in help_text and "--address" not in help_text


def test_chat_sends_the_whole_conversation_each_turn_and_stops_at_exit(monkeypatch) -> None:
    """``pdserve chat`` against a fake stub: turn 2's request carries turn 1 and its answer."""
    import cluster.client
    from protos import pdserve_pb2 as pb

    sent: list[pb.GenerateRequest] = []

    class FakeStub:
        def Generate(self, request: pb.GenerateRequest, timeout: float):
            sent.append(request)
            done = pb.GenerateResponse(text=f"answer {len(sent)}", finish_reason=pb.FINISH_REASON_EOS)
            done.usage.prompt_tokens, done.usage.cached_tokens = 10 * len(sent), 16 * (len(sent) - 1)
            done.timings.ttft_ms = 12.0
            return iter([done])

    class FakeChannel:
        def close(self) -> None: ...

    monkeypatch.setattr(cluster.client, "connect", lambda server: (FakeChannel(), FakeStub()))
    result = CliRunner().invoke(main, ["chat", "--system", "be brief"], input="hi\n\nthere\n/exit\nlost\n")
    assert result.exit_code == 0, result.output
    assert len(sent) == 2  # the blank line is skipped, /exit ends before "lost"
    turn2 = [(m.role, m.content) for m in sent[1].messages.messages]
    assert turn2 == [("system", "be brief"), ("user", "hi"), ("assistant", "answer 1"), ("user", "there")]
    assert "answer 1" in result.output and "[turn 2: prompt 20 tokens, cached 16" in result.output
