"""Stop strings through the whole cluster, token-exact against transformers greedy decoding.

The expected output is computed from the reference tokens alone: the request ends at the first token
whose text completes the stop string (that token is still in ``token_ids``, as in vLLM), and the text is
the reference text cut before the stop string. Cases: the stop string is the text of the very first
token (sampled by prefill, so the request ends on the prefill replica) and the text of later tokens
(ended by the decode replica).
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from cluster.config import ClusterConfig
from engine.tokenizer import ByteTokenizer
from protos import pdserve_pb2 as pb
from tests.integration.int_helpers import (
    cluster_config,
    make_prompts,
    reference_greedy,
    run_many,
    wait_until_no_blocks_held,
)

pytestmark = pytest.mark.integration

MAX_TOKENS = 12


def _case(stop_at: int) -> tuple[tuple[int, ...], tuple[int, ...], str]:
    """A prompt, its reference output and a stop string: the text of the output's first printable ASCII
    token at index ``stop_at`` or later (a character absent from the text before it)."""
    tokenizer = ByteTokenizer()
    for prompt in make_prompts(40, seed=31):
        tokens = reference_greedy(prompt, MAX_TOKENS)
        for index in range(stop_at, MAX_TOKENS - 2 if stop_at else 1):
            char = tokenizer.decode([tokens[index]])
            if 32 <= tokens[index] < 127 and char not in tokenizer.decode(list(tokens[:index])):
                return prompt, tokens, char
    raise AssertionError(f"no prompt among 40 has a usable stop character at output index >= {stop_at}")


def _expected(tokens: tuple[int, ...], stop: str) -> tuple[list[int], str]:
    """Reference token ids up to the one that completes ``stop``, and the text cut before ``stop``."""
    tokenizer = ByteTokenizer()
    for end in range(1, len(tokens) + 1):
        text = tokenizer.decode(list(tokens[:end]))
        if stop in text:
            return list(tokens[:end]), text[: text.index(stop)]
    raise AssertionError(f"{stop!r} never appears in the reference output")


def _config(mode: str) -> ClusterConfig:
    config = cluster_config(1, 1, mode="colocated" if mode == "colocated" else "disaggregated")
    if mode == "recompute":  # every pull times out: the decode replica recomputes the prompt
        config = config.override({"kv_transfer.timeout_s": 1e-6})
    return config


NEVER = "<never seen>"  # a second, longer stop string: the detokenizers then hold back 11 characters


@pytest.mark.parametrize(
    ("mode", "stop_at", "with_longer_stop"),
    [  # colocated first: test_int_generate ends on that cluster (the session keeps the others too)
        ("colocated", 0, False),
        ("disaggregated", 0, False),
        ("disaggregated", 0, True),
        ("disaggregated", 2, True),
        ("recompute", 2, False),
    ],
)
def test_stop_string_is_cut_token_exact(pd_cluster, mode: str, stop_at: int, with_longer_stop: bool) -> None:
    """``stop_at`` 0: the stop string is the first token's text (disaggregated: prefill samples it and
    ends the request; colocated: the decode replica's own prefill); 2: a later token's text (the decode
    replica ends it; recompute: after recomputing the prompt and skipping the token the client has)."""
    cluster = pd_cluster.ensure(_config(mode))
    prompt, reference, stop = _case(stop_at)
    expected_ids, expected_text = _expected(reference, stop)
    request = pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=prompt),
        max_tokens=MAX_TOKENS,
        ignore_eos=True,
        stop=[NEVER, stop] if with_longer_stop else [stop],
    )
    result = asyncio.run(run_many(cluster.grpc_address, [request]))[0]
    assert result.code == grpc.StatusCode.OK, result.details
    assert (result.token_ids, result.text) == (expected_ids, expected_text), (stop, reference)
    assert result.last is not None and result.last.finish_reason == pb.FINISH_REASON_STOP
    assert result.last.usage.completion_tokens == len(expected_ids)
    _, held = wait_until_no_blocks_held(cluster.grpc_address, within_s=1.0)
    assert all(count == 0 for count in held.values()), held
