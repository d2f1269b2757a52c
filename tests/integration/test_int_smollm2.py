"""Issue 12 through the cluster, on the real model (SmolLM2-135M-Instruct from its installed GGUF),
one cluster for the module: disaggregated, shm, float32 (1 prefill + 1 decode).

- acceptance 1: "What is the capital of France?" as a ``messages`` prompt, greedy, answers "Paris",
  through gRPC and through ``pdserve generate --chat`` (a subprocess against the same cluster);
- acceptance 2: 8 chat prompts x 64 new tokens, concurrent, token-identical to transformers
  ``generate`` on the same dequantized weights (float32); nixl and colocated in test_int_smollm2_modes.py;
- acceptance 3: a two-turn conversation through ``messages``: turn 2 reports cached tokens >= turn 1's
  prompt in whole blocks (the prompt's KV is on the prefill replica; the answer's on the decode one);
- ``pdserve chat`` driven through a pipe: two turns, the second served from the prefix cache.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.client import FINISH_NAMES
from tests.integration.int_helpers import run_many, wait_until_no_blocks_held
from tests.integration.smollm2_helpers import (
    BLOCK_SIZE,
    CHAT_PROMPTS,
    NEW_TOKENS,
    assert_matches_reference,
    chat_prompt_ids,
    chat_request,
    smollm2_config,
)

pytestmark = pytest.mark.integration

PDSERVE = str(Path(sys.executable).parent / "pdserve")
FRANCE = "What is the capital of France?"


@pytest.fixture(scope="module")
def address(pd_cluster) -> str:
    return pd_cluster.ensure(smollm2_config()).grpc_address


def test_chat_answers_paris_through_grpc(address: str) -> None:
    [result] = asyncio.run(run_many(address, [chat_request([("user", FRANCE)], tenant="paris")]))
    assert result.code.name == "OK", result.details
    assert "Paris" in result.text, result.text
    assert result.last.usage.prompt_tokens == len(chat_prompt_ids(FRANCE))
    assert FINISH_NAMES[result.last.finish_reason] == "eos"  # <|im_end|>, the end of the turn


def test_generate_chat_cli_prints_paris(address: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    done = subprocess.run(
        [PDSERVE, "generate", "--chat", FRANCE, "--server", address],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout, done.stdout


def test_eight_chat_prompts_match_transformers_float32(address: str) -> None:
    requests = [chat_request([("user", text)], NEW_TOKENS, tenant="exact") for text in CHAT_PROMPTS]
    results = asyncio.run(run_many(address, requests))
    for index, result in enumerate(results):
        assert result.code.name == "OK", result.details
        assert_matches_reference(index, result.token_ids, FINISH_NAMES[result.last.finish_reason], NEW_TOKENS)
    wait_until_no_blocks_held(address, within_s=5.0)


def test_turn_two_is_served_from_turn_ones_prompt_blocks(address: str) -> None:
    turn1 = [("user", FRANCE)]
    [first] = asyncio.run(run_many(address, [chat_request(turn1, tenant="turns")]))
    turn2 = [*turn1, ("assistant", first.text), ("user", "And what is the capital of Germany?")]
    [second] = asyncio.run(run_many(address, [chat_request(turn2, tenant="turns")]))
    prompt1 = first.last.usage.prompt_tokens
    assert second.last.usage.cached_tokens >= prompt1 // BLOCK_SIZE * BLOCK_SIZE > 0
    assert second.last.usage.prompt_tokens > prompt1 + first.last.usage.completion_tokens - 1
    assert "Berlin" in second.text, second.text
    print(
        f"disaggregated turn 2: cached {second.last.usage.cached_tokens} of "
        f"{second.last.usage.prompt_tokens} (turn 1: prompt {prompt1}, answer "
        f"{first.last.usage.completion_tokens})"
    )


def test_chat_repl_through_a_pipe(address: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    done = subprocess.run(
        [PDSERVE, "chat", "--server", address, "--tenant", "repl", "--max-tokens", "32"],
        input=f"{FRANCE}\nAnd of Italy?\n/exit\nnever sent\n",
        capture_output=True, text=True, timeout=180, env=env,
    )
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout, done.stdout
    stats = [line for line in done.stderr.splitlines() if line.startswith("[turn ")]
    assert len(stats) == 2, done.stderr  # /exit ended it: the last line was never sent
    cached = int(stats[1].split("cached ")[1].split(",")[0])
    prompt1 = int(stats[0].split("prompt ")[1].split(" ")[0])
    assert cached >= prompt1 // BLOCK_SIZE * BLOCK_SIZE, done.stderr
    assert "TTFT" in stats[1]
