"""The engine and the KV transport exactly as the workers use them (``typing.Protocol``, structural).

``engine.llm_engine.LLMEngine`` is a ``WorkerEngine``; every ``kv_transfer.base.KVTransport`` backend is
a ``WorkerTransport`` and its ``Transfer`` a ``PullTransfer``. The workers and ``EngineLoop`` are typed
with these, so a fake engine or transport in a test needs only what is listed here. A worker that needs
more of the engine or the transport adds it here first.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch

    from engine.outputs import EngineStats, RequestOutput
    from engine.sampling import SamplingParams
    from kv_transfer.base import KVHandle, LayoutSignature, TransferEndpoint, TransferStatus


class WorkerEngine(Protocol):
    """One engine, driven from one thread (``EngineLoop``). See docs/interfaces.md ("## engine")."""

    # [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]: the memory a transport serves
    kv_cache: torch.Tensor

    def layout_fingerprint(self) -> str:
        """``LayoutSignature.model_id``: model name plus weights fingerprint."""
        ...

    # -- the loop ---------------------------------------------------------------------------------
    def has_unfinished_requests(self) -> bool: ...

    def step(self) -> list[RequestOutput]: ...

    def stats(self) -> EngineStats: ...

    # -- both sides -------------------------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        params: SamplingParams | None = None,
        tenant: str = "",
        prefill_only: bool = False,
        output_token_ids: Sequence[int] = (),
    ) -> None: ...

    def abort_request(self, request_id: str) -> None:
        """Stop the request and free (or unpin, or un-reserve) its blocks. Idempotent."""
        ...

    # -- prefill side -----------------------------------------------------------------------------
    def pinned_blocks(self, request_id: str) -> list[int]: ...

    def release_pinned(self, request_id: str) -> None: ...

    # -- decode side ------------------------------------------------------------------------------
    def can_allocate_blocks(self, num_blocks: int) -> bool: ...

    def allocate_blocks(self, request_id: str, num_tokens: int, tenant: str = "") -> list[int]: ...

    def add_prefilled_request(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        first_token_id: int,
        block_ids: Sequence[int],
        params: SamplingParams | None = None,
        tenant: str = "",
        earlier_output_ids: Sequence[int] = (),
    ) -> None: ...

    def free_allocated(self, request_id: str) -> None: ...


class PullTransfer(Protocol):
    """One decode-side pull in flight (``kv_transfer.base.Transfer``)."""

    @property
    def error(self) -> str | None:
        """Why it failed (set once the status is FAILED)."""
        ...

    def wait(self, timeout: float | None = None) -> TransferStatus:
        """Block until DONE or FAILED, or the transport's deadline."""
        ...


class WorkerTransport(Protocol):
    """A KV transport as a worker uses it (``kv_transfer.base.KVTransport``)."""

    def register(self, pool: torch.Tensor, layout: LayoutSignature) -> TransferEndpoint:
        """Serve ``pool`` to peers (prefill side) or pull into it (decode side)."""
        ...

    def read_blocks(self, handle: KVHandle, local_block_ids: Sequence[int]) -> PullTransfer:
        """Start pulling ``handle``'s blocks into ``local_block_ids``; returns at once."""
        ...

    def close(self) -> None: ...
