"""The text of a request comes from the engines, detokenized once per engine and never at the ingress:
both workers over real built-in engines in one process (the KV copied block by block, as a transport
does). Counted: one ``StopStringChecker`` per engine a request visits (prefill: the first token only;
decode: every token), the client's text equals the whole output decoded once, a stop string that spans
the first token (prefill side) and later ones (decode side) is found, and the recompute path after a
failed pull sends the prefill side's text only once."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Sequence
from typing import ClassVar

import pytest
import torch

import engine.llm_engine
from decode_worker.worker import DecodeWorker
from engine.config import EngineConfig
from engine.detokenizer import StopStringChecker
from engine.llm_engine import LLMEngine
from engine.tokenizer import ByteTokenizer
from kv_transfer.base import KVHandle, LayoutSignature, TransferEndpoint, TransferStatus
from prefill_worker.worker import PrefillWorker
from worker_common.messages import DecodeRequest, SamplingSpec, WorkerRequest
from worker_common.protocols import PullTransfer

MAX_TOKENS = 10


class CountedChecker(StopStringChecker):
    instances: ClassVar[list[CountedChecker]] = []

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        CountedChecker.instances.append(self)

    @property
    def num_tokens_seen(self) -> int:
        return len(self._token_ids)


class _Done:
    error = None

    def wait(self, timeout: float | None = None) -> TransferStatus:
        return TransferStatus.DONE


class _Failed:
    error = "peer gone (test)"

    def wait(self, timeout: float | None = None) -> TransferStatus:
        return TransferStatus.FAILED


class CopyTransport:
    """An in-process transport: ``read_blocks`` copies the prefill engine's blocks (or fails)."""

    def __init__(self, source: LLMEngine | None = None, fails: bool = False) -> None:
        self.source, self.fails, self.pool = source, fails, None

    def register(self, pool: torch.Tensor, layout: LayoutSignature) -> TransferEndpoint:
        self.pool = pool
        return TransferEndpoint("copy", "w", "1", b"", layout)

    def read_blocks(self, handle: KVHandle, local_block_ids: Sequence[int]) -> PullTransfer:
        if self.fails:
            return _Failed()
        assert self.source is not None and self.pool is not None
        self.pool[list(local_block_ids)] = self.source.kv_cache[list(handle.block_ids)]
        return _Done()

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def engines() -> tuple[LLMEngine, LLMEngine]:
    config = EngineConfig(kv_cache_bytes=4 * 2**20, max_num_batched_tokens=256, max_num_seqs=8)
    return LLMEngine(config), LLMEngine(config)


@pytest.fixture(autouse=True)
def counted(monkeypatch) -> list[CountedChecker]:
    CountedChecker.instances = []
    monkeypatch.setattr(engine.llm_engine, "StopStringChecker", CountedChecker)
    return CountedChecker.instances


def _reference(engine_: LLMEngine, prompt: list[int]) -> list[int]:
    engine_.add_request("reference", prompt, SamplingSpec(max_tokens=MAX_TOKENS, ignore_eos=True).to_engine())
    tokens: list[int] = []
    while engine_.has_unfinished_requests():
        for output in engine_.step():
            tokens.extend(output.new_token_ids)
    return tokens


@pytest.fixture(scope="module")
def case(engines) -> tuple[list[int], list[int]]:
    """A prompt whose greedy output starts with two printable ASCII tokens (the byte tokenizer's text)."""
    engine_ = engines[0]
    for seed in range(200):
        prompt = torch.randint(3, 256, (12,), generator=torch.Generator().manual_seed(seed)).tolist()
        tokens = _reference(engine_, prompt)
        if all(32 <= token < 127 for token in tokens[:2]):
            return prompt, tokens
    raise AssertionError("no prompt among 200 starts with two printable ASCII tokens")


def _split(engines, prompt: list[int], stop: tuple[str, ...], pull_fails: bool = False):
    """Prefill on one worker, decode on the other; the client's token ids and text, and the result."""
    prefill_engine, decode_engine = engines
    prefill = PrefillWorker(prefill_engine, CopyTransport(), "p0", "float32", 16, lease_s=30.0)
    decode = DecodeWorker(
        decode_engine, CopyTransport(prefill_engine, pull_fails), "d0", "copy", 1.0, "float32", 16
    )
    spec = SamplingSpec(max_tokens=MAX_TOKENS, ignore_eos=True, stop=stop)
    work = WorkerRequest(f"r{len(stop)}{pull_fails}", tuple(prompt), spec)

    async def run():
        result = await prefill.prefill(work)
        token_ids, text = [result.first_token_id], result.first_text
        if result.is_prefilled:
            request = DecodeRequest(work, result.first_token_id, result.handle, len(result.first_text))
            async for chunk in decode.generate(request):
                if chunk.is_transfer_report:
                    await prefill.release(work.request_id)
                token_ids += chunk.token_ids
                text += chunk.text
        return token_ids, text, result

    try:
        return asyncio.run(run())
    finally:
        prefill.close()
        decode.close()


@pytest.mark.parametrize("pull_fails", [False, True], ids=["pulled", "recomputed"])
def test_split_text_is_decoded_once_per_engine_and_sent_once(
    engines, case, counted, pull_fails: bool
) -> None:
    prompt, reference = case
    token_ids, text, result = _split(engines, prompt, (), pull_fails)
    assert token_ids == reference
    assert result.first_text == ByteTokenizer().decode(reference[:1])  # sent by prefill, not by decode
    assert text == ByteTokenizer().decode(reference)
    # one checker per engine: prefill decodes the first token, decode the whole output
    assert [checker.num_tokens_seen for checker in counted] == [1, MAX_TOKENS]


def test_stop_string_spanning_the_first_token_is_found_on_the_decode_side(engines, case, counted) -> None:
    prompt, reference = case
    stop = ByteTokenizer().decode(reference[:2])  # first token's text (prefill) + the second's (decode)
    token_ids, text, result = _split(engines, prompt, (stop,))
    assert result.is_prefilled and result.first_text == ""  # held back: it may start the stop string
    assert (token_ids, text) == (reference[:2], "")
    assert [checker.num_tokens_seen for checker in counted] == [1, 2]


def test_colocated_request_is_decoded_by_its_one_engine(engines, case, counted) -> None:
    prompt, reference = case
    decode = DecodeWorker(engines[1], None, "d0", "shm", 1.0, "float32", 16)
    work = WorkerRequest("colocated", tuple(prompt), SamplingSpec(max_tokens=MAX_TOKENS, ignore_eos=True))

    async def run():
        chunks = [chunk async for chunk in decode.generate(DecodeRequest(work, None, None))]
        return [t for c in chunks for t in c.token_ids], "".join(c.text for c in chunks)

    try:
        assert asyncio.run(run()) == (reference, ByteTokenizer().decode(reference))
    finally:
        decode.close()
    assert [checker.num_tokens_seen for checker in counted] == [MAX_TOKENS]


def test_the_ingress_request_path_never_loads_the_detokenizer_or_torch() -> None:
    code = "import sys, cluster.request_path; print("
    code += "'engine.detokenizer' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
