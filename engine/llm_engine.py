"""LLMEngine: the single-process engine (prefill and decode in one place).

Tests drive it, it is the "colocated" baseline the cluster is compared with, and the prefill and
decode workers use its split API: ``prefill_only`` requests keep their blocks pinned for a transfer;
``allocate_blocks`` + ``add_prefilled_request`` join a sequence whose KV was pulled from elsewhere.

One step: ``schedule -> run the model -> sample -> post-process`` (stop checks, outputs, frees).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence as Seq
from typing import Any

import torch

from engine.attention import TorchAttention, make_attention_backend
from engine.block_pool import BlockPool
from engine.builtin import BUILTIN_MODEL_ID
from engine.config import EngineConfig
from engine.detokenizer import StopStringChecker
from engine.kv_cache import KVAllocator, allocate_kv_cache, plan_kv_cache
from engine.loader import build_model, load_source, weights_fingerprint
from engine.model_config import ModelConfig
from engine.model_runner import ModelRunner
from engine.outputs import PREFILLED, EngineStats, RequestOutput
from engine.sampler import Sampler
from engine.sampling import SamplingParams
from engine.scheduler import Scheduler, SchedulerOutput
from engine.sequence import Sequence
from engine.tenant_stats import TenantStats, collect_tenant_stats
from engine.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer

logger = logging.getLogger(__name__)


def _seed_from_request_id(request_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(request_id.encode(), digest_size=8).digest(), "little")


def _resume(seq: Sequence, output_token_ids: Seq[int]) -> None:
    """Give a new ``seq`` the output tokens another engine already reported (none: a fresh request)."""
    if output_token_ids:
        seq.token_ids.extend(int(t) for t in output_token_ids)
        seq.num_reported_tokens = len(output_token_ids)


class LLMEngine:
    """Add requests, ``step()``, collect ``RequestOutput``s. See docs/interfaces.md ("## engine")."""

    def __init__(
        self,
        config: EngineConfig | None = None,
        kv_allocator: KVAllocator | None = None,
        *,
        hf_model: Any | None = None,
        tokenizer: Tokenizer | None = None,
    ) -> None:
        """``hf_model``: run an in-memory ``transformers`` model instead of ``config.model``."""
        self.config = config = config or EngineConfig()
        if config.num_threads is not None:
            torch.set_num_threads(config.num_threads)
        self.device = torch.device(config.device)
        self.dtype: torch.dtype = getattr(torch, config.dtype)
        self.model_name, hf_config, state_dict = load_source(config.model, hf_model)
        self.model_config = ModelConfig.from_hf_config(hf_config)
        self._fingerprint = weights_fingerprint(state_dict)
        layout = plan_kv_cache(self.model_config, self.dtype, config.block_size, config.kv_cache_bytes)
        self.kv_layout = layout
        max_model_len = config.max_context_len(self.model_config.context_length, layout.kv_shape)
        self.scheduler_config = config.scheduler_config(max_model_len)
        backend = self._make_backend()
        self.model = build_model(
            self.model_config,
            hf_config,
            state_dict,
            self.dtype,
            self.device,
            self.scheduler_config.max_model_len,
            backend,
        )
        del state_dict
        self.kv_cache = allocate_kv_cache(layout, self.device, kv_allocator)
        self.tokenizer: Tokenizer = tokenizer or self._load_tokenizer(hf_model)
        self.pool = BlockPool(
            layout.num_blocks,
            config.block_size,
            config.eviction_log_entries,
            config.tenant_kv_share,
            config.tenant_kv_shares,
        )
        self.scheduler = Scheduler(self.scheduler_config, self.pool, config.enable_prefix_caching)
        self.runner = ModelRunner(
            self.model,
            self.kv_cache,
            config.block_size,
            self.device,
            config.decode_mirror_bytes,
            cuda_graph_max_batch_size=min(config.cuda_graph_max_batch_size, config.max_num_seqs),
            max_model_len=self.scheduler_config.max_model_len,
        )
        self.sampler = Sampler()
        self._requests: dict[str, Sequence] = {}  # waiting or running
        self._pinned: dict[str, list[int]] = {}  # prefill_only finished: request -> prompt blocks
        self._allocated: dict[str, list[int]] = {}  # decode side: blocks reserved for a pull
        self._finished_outputs: list[RequestOutput] = []  # finished outside a step (e.g. abort)
        self._totals = {"prompt": 0, "cached": 0, "generated": 0}
        # since start: requests taken in (queued, pull allocated) and done (prefilled, ended, aborted)
        self._num_requests_added = 0  # the router's acknowledgement of its charges: router/load.py
        self.num_requests_done = 0  # which sent prompts a prefix summary has seen: router/load.py

    # -- construction helpers -----------------------------------------------------------------------
    def _make_backend(self) -> TorchAttention:
        mc = self.model_config
        return make_attention_backend(
            self.config.attention_backend,
            self.device,
            mc.num_heads,
            mc.num_kv_heads,
            mc.head_dim,
            self.config.block_size,
        )

    def _load_tokenizer(self, hf_model: Any | None) -> Tokenizer:
        if hf_model is None and self.config.model == BUILTIN_MODEL_ID:
            return ByteTokenizer()
        if hf_model is None:
            return load_tokenizer(self.config.model)
        return ByteTokenizer()  # an in-memory model comes with no tokenizer unless one is passed

    @property
    def max_model_len(self) -> int:
        """Tokens (prompt + generated) one sequence may hold here: model, config and pool capped."""
        return self.scheduler_config.max_model_len

    def layout_fingerprint(self) -> str:
        """Model name plus weights fingerprint (``LayoutSignature.model_id``)."""
        return f"{self.model_name}@{self._fingerprint}"

    # -- requests -----------------------------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt_token_ids: Seq[int],
        params: SamplingParams | None = None,
        tenant: str = "",
        prefill_only: bool = False,
        output_token_ids: Seq[int] = (),
    ) -> None:
        """Queue a request. ``prefill_only``: leave after the first token (``PREFILLED``, or the reason that
        token ends it) with the blocks pinned until ``release_pinned``. ``output_token_ids``: a request
        resumed here (migrated): the output tokens already reported elsewhere; prompt and those are
        computed, and the next token is output position ``len(output_token_ids)`` (position-seeded)."""
        seq = self._new_sequence(request_id, prompt_token_ids, params or SamplingParams(), tenant)
        seq.prefill_only = prefill_only
        _resume(seq, output_token_ids)
        self._requests[request_id] = seq
        self.scheduler.add(seq)
        self._num_requests_added += 1

    def _new_sequence(
        self, request_id: str, prompt_token_ids: Seq[int], params: SamplingParams, tenant: str
    ) -> Sequence:
        if request_id in self._requests or request_id in self._pinned:
            raise ValueError(f"request_id {request_id!r} is already in the engine")
        prompt = [int(t) for t in prompt_token_ids]
        if not prompt:
            raise ValueError("prompt_token_ids must not be empty")
        max_len = self.scheduler_config.max_model_len
        if len(prompt) >= max_len:
            raise ValueError(f"prompt has {len(prompt)} tokens; the context length is {max_len}")
        vocab = self.model_config.vocab_size
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise ValueError(f"prompt_token_ids must be in [0, {vocab})")
        seed = params.seed if params.seed is not None else _seed_from_request_id(request_id)
        checker = None
        if params.stop or params.detokenize:
            checker = StopStringChecker(self.tokenizer, params.stop, params.num_chars_sent)
        return Sequence(request_id, prompt, len(prompt), params, seed, tenant, stop_checker=checker)

    def abort_request(self, request_id: str) -> None:
        """Stop a request and free (or unpin, or un-reserve) its blocks. Idempotent."""
        seq = self._requests.pop(request_id, None)
        if seq is not None:
            self.num_requests_done += 1
            seq.prefill_only = False
            self.scheduler.finish(seq, "abort")
        self.release_pinned(request_id)
        self.free_allocated(request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests) or bool(self._finished_outputs)

    # -- prefill side -------------------------------------------------------------------------------
    def pinned_blocks(self, request_id: str) -> list[int]:
        """Blocks holding a finished prefill_only request's prompt KV, in order."""
        if request_id not in self._pinned:
            raise KeyError(f"request {request_id!r} has no pinned blocks")
        return list(self._pinned[request_id])

    def release_pinned(self, request_id: str) -> None:
        """Unpin; the full blocks stay in the prefix cache. Idempotent."""
        block_ids = self._pinned.pop(request_id, None)
        if block_ids is not None:
            self.pool.release(block_ids)

    # -- decode side --------------------------------------------------------------------------------
    def can_allocate_blocks(self, num_blocks: int) -> bool:
        """Query only: would ``num_blocks`` blocks be allocatable now."""
        return self.pool.can_allocate(num_blocks)

    def allocate_blocks(self, request_id: str, num_tokens: int, tenant: str = "") -> list[int]:
        """Reserve local blocks for ``num_tokens`` tokens of KV about to be pulled."""
        if request_id in self._allocated or request_id in self._requests:
            raise ValueError(f"request_id {request_id!r} already holds blocks")
        block_ids = self.pool.allocate(self.scheduler.blocks_for(num_tokens), tenant)
        self._allocated[request_id] = block_ids
        self._num_requests_added += 1
        return list(block_ids)

    def free_allocated(self, request_id: str) -> None:
        """Give back the blocks of a pull that failed. Idempotent."""
        block_ids = self._allocated.pop(request_id, None)
        if block_ids is not None:
            self.pool.release(block_ids)

    def add_prefilled_request(
        self,
        request_id: str,
        prompt_token_ids: Seq[int],
        first_token_id: int,
        block_ids: Seq[int],
        params: SamplingParams | None = None,
        tenant: str = "",
        earlier_output_ids: Seq[int] = (),
    ) -> None:
        """Join the running batch with the prompt's KV already in ``block_ids`` (from ``allocate_blocks``).

        ``first_token_id`` (output position 0) was sampled and reported by the prefill side; this engine
        reports output positions 1 on. A migrated request passes the output tokens reported before it as
        ``earlier_output_ids``: ``block_ids`` then hold the KV of prompt + those, ``first_token_id`` is
        the last token reported (position ``len(earlier_output_ids)``), and this engine goes on after it.
        """
        reserved = self._allocated.get(request_id)
        if reserved is None or list(block_ids) != reserved:
            raise ValueError(f"block_ids of {request_id!r} must be the blocks allocate_blocks returned")
        seq = self._new_sequence(request_id, prompt_token_ids, params or SamplingParams(), tenant)
        _resume(seq, earlier_output_ids)
        if len(block_ids) != self.scheduler.blocks_for(seq.num_tokens):
            raise ValueError(f"{len(block_ids)} blocks do not hold exactly {seq.num_tokens} prompt tokens")
        del self._allocated[request_id]
        seq.block_ids = list(block_ids)
        seq.num_computed_tokens = seq.num_tokens
        seq.token_ids.append(int(first_token_id))
        seq.num_reported_tokens = seq.num_output_tokens
        self._requests[request_id] = seq
        self.scheduler.add_running(seq)
        reason = self._check_stop(seq)
        if reason is not None:
            self._finish(seq, reason)
            self._finished_outputs.append(self._make_output(seq))

    # -- the step -----------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule, run the model, sample, post-process. Returns outputs of requests that progressed."""
        outputs, self._finished_outputs = self._finished_outputs, []
        scheduled = self.scheduler.schedule()
        if not scheduled.scheduled:
            return outputs
        logits, sampling_seqs = self.runner.execute(scheduled.scheduled)
        self._account_prompts(scheduled)
        self.scheduler.commit(scheduled)
        positions = [seq.num_output_tokens for seq in sampling_seqs]
        tokens = self.sampler.sample(
            logits, [s.params for s in sampling_seqs], [s.seed for s in sampling_seqs], positions
        )
        for row, (seq, token) in enumerate(zip(sampling_seqs, tokens, strict=True)):
            seq.token_ids.append(token)
            if seq.params.return_logits:
                seq.pending_logits.append(logits[row].clone())
            self._totals["generated"] += 1
            reason = self._check_stop(seq)
            if reason is not None:
                self._finish(seq, reason)
            outputs.append(self._make_output(seq))
        return outputs

    def _account_prompts(self, scheduled: SchedulerOutput) -> None:
        for item in scheduled.scheduled:
            seq = item.seq
            if seq.num_computed_tokens + item.num_tokens == seq.num_tokens and seq.num_output_tokens == 0:
                self._totals["prompt"] += seq.num_prompt_tokens
                self._totals["cached"] += seq.num_cached_tokens

    def _check_stop(self, seq: Sequence) -> str | None:
        """Why ``seq`` leaves the batch after its newest token, or None. The one place stop rules live."""
        params, token = seq.params, seq.token_ids[-1]
        if token in params.stop_token_ids:
            return "stop"
        if not params.ignore_eos and token == self.tokenizer.eos_token_id:
            return "eos"
        if seq.stop_checker is not None and seq.stop_checker.update(seq.output_token_ids):
            return "stop"
        if seq.num_output_tokens >= params.max_tokens:
            return "length"
        if seq.num_tokens >= self.scheduler_config.max_model_len:
            return "context"
        if seq.prefill_only:
            return PREFILLED  # not an end: the decode side continues from the pinned blocks
        return None

    def _finish(self, seq: Sequence, reason: str) -> None:
        del self._requests[seq.request_id]
        self.num_requests_done += 1
        if seq.prefill_only:
            self._pinned[seq.request_id] = seq.block_ids
        self.scheduler.finish(seq, reason)

    def _make_output(self, seq: Sequence) -> RequestOutput:
        # slice token_ids: output_token_ids would copy the whole output on every step
        new_tokens = seq.token_ids[seq.num_prompt_tokens + seq.num_reported_tokens :]
        seq.num_reported_tokens = seq.num_output_tokens
        logits = None
        if seq.params.return_logits:
            logits, seq.pending_logits = seq.pending_logits, []
        new_text = None
        if seq.stop_checker is not None:  # a prefilled request goes on elsewhere: keep holding back
            new_text = seq.stop_checker.take_new_text(seq.is_finished and seq.finish_reason != PREFILLED)
        return RequestOutput(
            seq.request_id,
            new_tokens,
            seq.is_finished,
            seq.finish_reason,
            seq.num_prompt_tokens,
            seq.num_cached_tokens,
            new_text,
            logits,
            seq.prefix_miss,
        )

    # -- stats --------------------------------------------------------------------------------------
    def tenant_stats(self) -> tuple[TenantStats, ...]:
        """Per tenant: active requests and their tokens, blocks, refused allocations, evictions (a query,
        O(requests): for on-demand reviews, not every step)."""
        active: dict[str, list[tuple[str, int]]] = {}
        for seq in self._requests.values():
            active.setdefault(seq.tenant, []).append((seq.request_id, seq.num_tokens))
        for held in (self._pinned, self._allocated):
            for request_id, block_ids in held.items():
                tenant = self.pool.owner_of(block_ids[0]) if block_ids else ""
                active.setdefault(tenant, []).append((request_id, len(block_ids) * self.pool.block_size))
        return collect_tenant_stats(self.pool, active)

    def stats(self) -> EngineStats:
        """A snapshot of blocks, queues, token totals and evictions."""
        pool = self.pool
        return EngineStats(
            num_blocks_total=pool.num_blocks,
            num_blocks_used=pool.num_used_blocks,
            num_blocks_cached=pool.num_cached_blocks,
            num_blocks_free=pool.num_free_blocks,
            num_blocks_allocatable=pool.num_allocatable_blocks,
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_pinned=len(self._pinned),
            num_queued_prefill_tokens=self.scheduler.num_queued_prefill_tokens,
            num_prompt_tokens=self._totals["prompt"],
            num_cached_tokens=self._totals["cached"],
            num_generated_tokens=self._totals["generated"],
            num_preemptions=self.scheduler.num_preemptions,
            evictions=dict(pool.evictions),
            num_requests_added=self._num_requests_added,
        )
