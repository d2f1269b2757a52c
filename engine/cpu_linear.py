"""``TransposedLinear``: a projection whose weight is stored ``[in, out]`` contiguous, for CPU.

A transform applied to a loaded ``CausalLM`` (``transpose_linear_weights``), not a different model:
the parameters keep their values and ``.weight`` still reads ``[out, in]`` (a view).

Why: on the 2-core dev VM (AMD EPYC, MKL), the 29 projections of the built-in model's decode step,
cycled through the way a step cycles through them, ran ``x @ W_t`` (``W_t`` contiguous) faster than
``F.linear(x, W)`` at every batch measured: batch 1 703 vs 1122 us, batch 8 1573 vs 2317 us, batch
32 3580 vs 3898 us (docs/engine.md, "Projections on CPU"). oneDNN's packed weights
(``torch.ops.mkldnn``) were faster at batch 32 but 1.6x slower at batch 1, and would need a second copy.
"""

from __future__ import annotations

import torch
from torch import nn


class TransposedLinear(nn.Module):
    """``y = x @ weight_t (+ bias)``; ``weight_t``: ``[in_features, out_features]`` contiguous."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight_t = nn.Parameter(linear.weight.detach().t().contiguous(), requires_grad=False)
        self.bias = linear.bias

    @property
    def weight(self) -> torch.Tensor:
        """``[out_features, in_features]`` view, as ``nn.Linear`` exposes it."""
        return self.weight_t.t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x @ self.weight_t
        return out if self.bias is None else out + self.bias


def transpose_linear_weights(model: nn.Module, skip: tuple[str, ...] = ()) -> int:
    """Replace every ``nn.Linear`` in ``model`` (except children named in ``skip``, e.g. a tied
    ``lm_head`` whose weight is the embedding's) by a ``TransposedLinear``; returns how many."""
    replaced = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and name not in skip:
                setattr(module, name, TransposedLinear(child))
                replaced += 1
    return replaced
