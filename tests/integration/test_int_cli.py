"""Acceptance 4: the installed `pdserve` command serves, and `pdserve generate "hello" --json` prints
tokens, as a new user would run them (two processes, the console script from the venv)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from engine.builtin import BUILTIN_MODEL_ID
from engine.tokenizer import ByteTokenizer
from tests.conftest import free_port
from tests.integration.int_helpers import reference_greedy, wait_serving

pytestmark = pytest.mark.integration

PDSERVE = str(Path(sys.executable).parent / "pdserve")


def test_pdserve_serve_and_generate_json(tmp_path: Path) -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(
        # the random built-in model, named (the default is SmolLM2: tests/integration/test_int_smollm2.py)
        [
            *(PDSERVE, "serve", "--port", str(port), "--http-port", "0"),
            *("--model", BUILTIN_MODEL_ID, "--dtype", "float32"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    try:
        wait_serving(address, server, timeout_s=240)
        done = subprocess.run(
            [PDSERVE, "generate", "hello", "--json", "--server", address],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )
        assert done.returncode == 0, done.stderr
        answer = json.loads(done.stdout)
        prompt = tuple(ByteTokenizer().encode("hello"))
        tokens = answer["token_ids"]
        assert 1 <= len(tokens) <= 64
        expected = list(reference_greedy(prompt, 64))
        assert tokens == expected[: len(tokens)]  # greedy, the built-in model, same weights
        assert answer["finish_reason"] in ("length", "eos")
        if answer["finish_reason"] == "length":
            assert len(tokens) == 64
        assert answer["usage"] == {
            "prompt_tokens": len(prompt),
            "cached_tokens": answer["usage"]["cached_tokens"],
            "completion_tokens": len(tokens),
        }
        assert answer["text"] == ByteTokenizer().decode(tokens)
        assert answer["timings"]["ttft_ms"] > 0 and answer["route"]["kv_transport"] == "shm"

        server.send_signal(signal.SIGINT)  # Ctrl-C: a clean shutdown
        assert server.wait(timeout=90) == 0
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)  # our own process group only (start_new_session)
            server.wait(timeout=30)
        log.close()
