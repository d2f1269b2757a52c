"""TransposedLinear computes what nn.Linear computes, and the transform leaves a tied lm_head alone."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from engine.cpu_linear import TransposedLinear, transpose_linear_weights
from tests.engine.engine_helpers import build_model, make_engine


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 7, 64])
def test_transposed_linear_matches_nn_linear(bias: bool, rows: int) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(48, 80, bias=bias)
    transposed = TransposedLinear(linear)
    x = torch.randn(rows, 48)
    assert torch.equal(transposed.weight, linear.weight)
    assert transposed.weight_t.is_contiguous() and transposed.weight_t.shape == (48, 80)
    torch.testing.assert_close(transposed(x), linear(x), rtol=1e-6, atol=1e-6)


def test_engine_on_cpu_runs_every_untied_projection_transposed() -> None:
    engine = make_engine(None)  # built-in model: untied embeddings, 4 layers x 7 projections + lm_head
    kinds = [type(m) for m in engine.model.modules() if isinstance(m, (nn.Linear, TransposedLinear))]
    assert kinds == [TransposedLinear] * (4 * 7 + 1)


def test_tied_lm_head_keeps_the_embedding_weight() -> None:
    model = build_model("qwen2")  # tiny Qwen2 config: tie_word_embeddings=True
    assert model.config.tie_word_embeddings
    engine = make_engine(model)
    assert isinstance(engine.model.lm_head, nn.Linear)
    assert engine.model.lm_head.weight is engine.model.model.embed_tokens.weight
    assert torch.equal(engine.model.lm_head.weight, model.get_input_embeddings().weight)


def test_transform_counts_and_skips_by_name() -> None:
    module = nn.Sequential()
    module.add_module("a", nn.Linear(4, 4))
    module.add_module("lm_head", nn.Linear(4, 4))
    assert transpose_linear_weights(module, skip=("lm_head",)) == 1
    assert isinstance(module.a, TransposedLinear) and isinstance(module.lm_head, nn.Linear)
