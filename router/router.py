"""The router: picks a prefill worker by prefix key and load, and a decode worker by KV headroom.

A plain object meant to be embedded (the cluster's ingress holds one per replica): no threads, no
globals, no I/O. Its answers depend only on the config, the worker sets and the load reports it was
given (and, for round-robin and tie rotation, how many decisions it made), so ingress replicas fed
the same reports make the same choices without talking to each other.

Typical use::

    router = Router(RouterConfig(block_size=16))
    router.set_workers(prefill_ids=["p0", "p1"], decode_ids=["d0"])
    router.update_load(LoadReport("p0", queued_prefill_tokens=0, running_requests=0,
                                  free_kv_blocks=900, total_kv_blocks=1000, reported_at=time.monotonic()))
    decision = router.route(prompt_token_ids, expected_num_blocks=40, tenant="acme")
    decision.prefill.worker_id, decision.prefill.reason, decision.decode.worker_id
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from engine.block_hash import BlockHash
from engine.prefix_summary import depth_tokens, probe_keys
from router.cache_aware import CacheAwarePolicy
from router.config import RouterConfig
from router.decisions import DecodeChoice, PrefillChoice, RouteDecision, RouteReason
from router.load import LoadReport, LoadTable
from router.policies import make_policy
from router.prefix import PrefixKeyer
from router.ring import HashRing


class NoWorkerError(LookupError):
    """The pool asked for has no workers."""


class Router:
    """Chooses workers for requests. See the module docstring."""

    def __init__(self, config: RouterConfig | None = None):
        self.config = config if config is not None else RouterConfig()
        self._keyer = PrefixKeyer(self.config.block_size, self.config.prefix_depth_blocks)
        self._ring = HashRing(virtual_nodes=self.config.virtual_nodes, seed=self.config.hash_seed)
        self._prefill_loads = LoadTable(self.config)
        self._decode_loads = LoadTable(self.config)
        self._cache_aware = CacheAwarePolicy(self.config) if self.config.policy == "cache_aware" else None
        self._policy = make_policy("prefix_hash" if self._cache_aware else self.config.policy)
        self._depths = depth_tokens(self.config.block_size, 64)  # tokens at probe depth j + 1
        self._decode_turn = 0  # round-robin position over unreported decode workers

    # -- membership and load -------------------------------------------------------------------

    def set_workers(self, prefill_ids: Iterable[str], decode_ids: Iterable[str]) -> None:
        """Replace both pools. Workers that stay keep their load reports; the ring moves only the
        keys of workers that joined or left."""
        prefill = set(prefill_ids)
        self._ring.set_workers(prefill)
        self._prefill_loads.set_workers(prefill)
        self._decode_loads.set_workers(decode_ids)

    @property
    def prefill_ids(self) -> tuple[str, ...]:
        return self._prefill_loads.worker_ids

    @property
    def decode_ids(self) -> tuple[str, ...]:
        return self._decode_loads.worker_ids

    def update_load(self, report: LoadReport) -> bool:
        """Take a worker's load report (prefill, decode, or both pools if it is in both).

        Returns False if no pool accepted it (unknown worker, or not newer than the report held:
        re-sending the same report is a no-op).
        """
        accepted_prefill = self._prefill_loads.update(report)
        accepted_decode = self._decode_loads.update(report)
        return accepted_prefill or accepted_decode

    def is_hot(self, prefill_id: str) -> bool:
        """Whether a prefill worker is above its watermark (the ring owner is skipped while it is)."""
        return self._prefill_loads.is_hot(prefill_id)

    # -- decisions -----------------------------------------------------------------------------

    def prefix_key(self, prompt_token_ids: Sequence[int], tenant: str = "") -> BlockHash | None:
        """The prompt's prefix key (query: no state change). None if it has no full block."""
        return self._keyer.key(prompt_token_ids, tenant)

    def choose_prefill(self, prompt_token_ids: Sequence[int], tenant: str = "") -> PrefillChoice:
        """Pick the prefill worker for a prompt and count the prompt against it until its next report.

        Raises ``NoWorkerError`` if the prefill pool is empty. The cache_aware policy keys by the
        prompt's probe keys (``engine.prefix_summary``) and leaves ``prefix_key`` None.
        """
        if self._cache_aware is not None:
            probes = probe_keys(prompt_token_ids, self.config.block_size, tenant)
            return self.choose_prefill_by_probes(probes, len(prompt_token_ids))
        key = self._keyer.key(prompt_token_ids, tenant)
        return self.choose_prefill_by_key(key, len(prompt_token_ids))

    def choose_prefill_by_probes(self, probes: list[int], num_prompt_tokens: int) -> PrefillChoice:
        """cache_aware: :meth:`choose_prefill` with the probe keys already computed (a replay of
        per-block ids computes them with ``engine.prefix_summary.probe_keys(ids, 1)``). The chosen worker is
        charged the prompt's expected uncached tokens, and counted as holding its probe keys."""
        if self._cache_aware is None:
            raise ValueError(f"choose_prefill_by_probes needs policy cache_aware, not {self.config.policy}")
        loads = self._prefill_loads
        if not loads.worker_ids:
            raise NoWorkerError("no prefill workers")
        depths = self._depths
        worker_id, reason, cached = self._cache_aware.choose(
            probes, depths, num_prompt_tokens, self._ring, loads
        )
        cached = min(cached, max(0, num_prompt_tokens - 1))
        loads.charge_prefill(worker_id, num_prompt_tokens - cached, probes)
        return PrefillChoice(worker_id, reason, None, cached)

    def choose_prefill_by_key(self, prefix_key: BlockHash | None, num_prompt_tokens: int) -> PrefillChoice:
        """:meth:`choose_prefill` with the key already computed (replays, or a key the caller keeps)."""
        if not self._prefill_loads.worker_ids:
            raise NoWorkerError("no prefill workers")
        worker_id, reason = self._policy.choose(prefix_key, self._ring, self._prefill_loads)
        self._prefill_loads.debit(worker_id, queued_tokens=num_prompt_tokens, running_requests=1)
        return PrefillChoice(worker_id, reason, prefix_key)

    def choose_decode(self, expected_num_blocks: int) -> DecodeChoice:
        """Pick the decode worker with the most KV headroom for ``expected_num_blocks`` blocks.

        Order: among reported workers that fit the request, most free blocks (ties: fewer running
        requests, then sorted id) -> ``kv_headroom``; else unreported workers in turn ->
        ``round_robin``; else (none fits) the one with the most free blocks -> ``least_loaded``.
        The blocks are counted against the chosen worker until its next report.
        Raises ``NoWorkerError`` if the decode pool is empty.
        """
        if expected_num_blocks < 0:
            raise ValueError(f"expected_num_blocks must be >= 0, got {expected_num_blocks}")
        loads = self._decode_loads
        if not loads.worker_ids:
            raise NoWorkerError("no decode workers")
        best_id, best_free, unreported = loads.most_free_kv()
        if best_id is not None and best_free >= expected_num_blocks:
            reason = RouteReason.KV_HEADROOM
        elif unreported:
            best_id = unreported[self._decode_turn % len(unreported)]
            self._decode_turn += 1
            reason = RouteReason.ROUND_ROBIN
        else:
            reason = RouteReason.LEAST_LOADED
        assert best_id is not None
        loads.charge_decode(best_id, expected_num_blocks)
        return DecodeChoice(best_id, reason)

    def route(
        self, prompt_token_ids: Sequence[int], expected_num_blocks: int, tenant: str = ""
    ) -> RouteDecision:
        """Both choices for one request (prefill first)."""
        prefill = self.choose_prefill(prompt_token_ids, tenant)
        return RouteDecision(prefill, self.choose_decode(expected_num_blocks))
