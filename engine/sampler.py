"""Sampler: greedy rows in one argmax; sampled rows each with a position-seeded generator."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

import torch

from engine.sampling import SamplingParams

_SEED_MASK = (1 << 63) - 1


def position_seed(seed: int, position: int) -> int:
    """The generator seed for output position ``position`` of a request seeded ``seed`` (a fixed mix)."""
    digest = hashlib.blake2b(struct.pack("<QQ", seed % 2**64, position), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _SEED_MASK


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """``[vocab]`` float32 scaled logits with tokens outside top-k / top-p set to -inf."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the mass before it already reaches top_p (the top token always stays).
        mass_before = torch.cumsum(probs, dim=-1) - probs
        drop = mass_before >= top_p
        logits = logits.scatter(0, order[drop], float("-inf"))
    return logits


def sample_one(logits: torch.Tensor, params: SamplingParams, seed: int, position: int) -> int:
    """One token from ``[vocab]`` float32 logits."""
    if params.is_greedy:
        return int(torch.argmax(logits))
    scaled = filter_logits(logits / params.temperature, params.top_k, params.top_p)
    probs = torch.softmax(scaled, dim=-1)
    generator = torch.Generator(device=logits.device)
    generator.manual_seed(position_seed(seed, position))
    return int(torch.multinomial(probs, 1, generator=generator))


class Sampler:
    """Turns a step's logits into one token per sampling sequence."""

    def sample(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        seeds: Sequence[int],
        positions: Sequence[int],
    ) -> list[int]:
        """``logits`` ``[S, vocab]`` float32; row ``r`` belongs to a request with ``params[r]``, seed
        ``seeds[r]``, sampling its output position ``positions[r]``."""
        tokens = torch.argmax(logits, dim=-1).tolist()  # greedy for every row in one op
        for row, row_params in enumerate(params):
            if not row_params.is_greedy:
                tokens[row] = sample_one(logits[row], row_params, seeds[row], positions[row])
        return tokens
