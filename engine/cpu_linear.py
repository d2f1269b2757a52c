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

import logging
import os
from typing import Any

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


# ---------------------------------------------------------------------------------------------------
# bfloat16 kernels (engine/csrc/bf16_kernels.cpp): packed projections, fused q/k/v and gate/up.

KERNELS_ENV = "PDSERVE_CPU_KERNELS"  # "0" turns the bf16 kernels off (the torch path runs instead)
_KERNEL_SOURCE = os.path.join(os.path.dirname(__file__), "csrc", "bf16_kernels.cpp")
_KERNEL_FLAGS = ["-O3", "-fopenmp", "-mavx512f", "-mavx512bf16", "-mavx512bw", "-mavx512vl", "-mfma"]
_kernels: Any = None
_kernels_tried = False
_log = logging.getLogger(__name__)


def cpu_has_avx512_bf16() -> bool:
    """Whether this CPU reports ``avx512_bf16`` (Linux ``/proc/cpuinfo``; False where it cannot tell)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return "avx512_bf16" in line.split()
    except OSError:
        pass
    return False


def load_kernels() -> Any:
    """The compiled kernel module, or None (no AVX512-BF16, ``PDSERVE_CPU_KERNELS=0``, or no compiler).

    Built once per machine by ``torch.utils.cpp_extension.load`` into torch's extension cache
    (``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``; ``make env`` builds it), then
    only loaded: a source change rebuilds it.
    """
    global _kernels, _kernels_tried
    if _kernels_tried:
        return _kernels
    _kernels_tried = True
    if os.environ.get(KERNELS_ENV, "1") == "0" or not cpu_has_avx512_bf16():
        return None
    try:
        from torch.utils.cpp_extension import load

        load(
            name="pdserve_bf16_kernels",
            sources=[_KERNEL_SOURCE],
            extra_cflags=_KERNEL_FLAGS,
            extra_ldflags=["-fopenmp"],
            is_python_module=False,  # a TORCH_LIBRARY: the ops appear as torch.ops.pdserve_cpu.*
            verbose=False,
        )
        _kernels = torch.ops.pdserve_cpu
    except Exception as error:  # no compiler, no headers: the torch path still works
        _log.warning("bf16 CPU kernels unavailable (%s); using the torch path", error)
        _kernels = None
    return _kernels


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """``[N, K]`` bf16 -> ``[ceil(N / 16), K / 2, 32]``: per 16 output rows, per input pair ``(2p, 2p+1)``,
    the 16 rows' two values side by side (one 64-byte load per ``vdpbf16ps``); rows padded with zeros."""
    n, k = weight.shape
    if k % 2:
        raise ValueError(f"packed weights need an even input size, got {k}")
    padded = torch.zeros(-(-n // 16) * 16, k, dtype=torch.bfloat16)
    padded[:n] = weight
    return padded.view(-1, 16, k // 2, 2).permute(0, 2, 1, 3).reshape(-1, k // 2, 32).contiguous()


def unpack_weight(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of ``pack_weight``: ``[N, K]``."""
    blocks, pairs, _ = packed.shape
    return packed.view(blocks, pairs, 16, 2).permute(0, 2, 1, 3).reshape(blocks * 16, pairs * 2)[:n]


KERNEL_MAX_ROWS = 4  # inputs up to this many rows run the GEMV kernel; more rows run oneDNN (AMX)
ONEDNN_BATCH_HINT = 32  # the batch size oneDNN's weight layout is chosen for


class PackedLinear(nn.Module):
    """One projection (or several fused along the outputs, e.g. q|k|v) for bf16 on CPU, two layouts:

    - ``packed`` for the AVX512-BF16 kernel (``pack_weight``), used for up to ``KERNEL_MAX_ROWS`` rows
      (decode at small batch: memory-bound GEMVs);
    - oneDNN's own blocked layout (``torch.ops.mkldnn._reorder_linear_weight``, what inductor's
      freezing uses), for more rows (larger decode batches, prefill: AMX-bound GEMMs).

    ``weight`` reads ``[out, in]`` (unpacked on demand: a copy).
    """

    def __init__(self, weights: list[torch.Tensor], biases: list[torch.Tensor | None], kernels: Any) -> None:
        super().__init__()
        weight = torch.cat([w.detach() for w in weights])
        self.out_features, self.in_features = weight.shape
        self.register_buffer("packed", pack_weight(weight), persistent=False)
        onednn = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), ONEDNN_BATCH_HINT)
        self.register_buffer("onednn", onednn, persistent=False)
        self.bias = None
        if any(b is not None for b in biases):
            pairs = zip(weights, biases, strict=True)
            self.bias = torch.cat([(w.new_zeros(w.shape[0]) if b is None else b).detach() for w, b in pairs])
        self.kernels = kernels

    @property
    def weight(self) -> torch.Tensor:
        return unpack_weight(self.packed, self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > KERNEL_MAX_ROWS:
            return torch.ops.mkldnn._linear_pointwise(x, self.onednn, self.bias, "none", [], "")
        out = self.kernels.gemm(x, self.packed, self.out_features)
        return out if self.bias is None else out + self.bias


def kernels_apply(model: nn.Module, dtype: torch.dtype) -> bool:
    """Whether ``pack_for_kernels`` would run this model: bf16 on CPU with the kernels built, and a
    layer shape they handle (no q/k norm; hidden and intermediate sizes multiples of 16; head_dim a
    multiple of 32, at most 256; at most 16 query heads per KV head)."""
    config = getattr(model, "config", None)
    if dtype != torch.bfloat16 or config is None or not torch.backends.mkldnn.is_available():
        return False
    if load_kernels() is None:
        return False
    sizes_ok = config.hidden_size % 16 == 0 and config.intermediate_size % 16 == 0
    head_ok = config.head_dim % 32 == 0 and config.head_dim <= 256
    return sizes_ok and head_ok and not config.has_qk_norm and config.num_heads // config.num_kv_heads <= 16


def pack_for_kernels(model: nn.Module) -> None:
    """Replace the projections by ``PackedLinear``s: per layer q|k|v as ``self_attn.qkv_proj``, ``o_proj``,
    gate|up as ``mlp.gate_up_proj``, ``down_proj``, and the lm_head (a packed copy when it is tied to
    the embedding); then ``model.kernels`` selects the fused forward (engine/model.py)."""
    kernels = load_kernels()
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        projections = (attn.q_proj, attn.k_proj, attn.v_proj)
        attn.qkv_proj = PackedLinear([p.weight for p in projections], [p.bias for p in projections], kernels)
        attn.o_proj = PackedLinear([attn.o_proj.weight], [attn.o_proj.bias], kernels)
        del attn.q_proj, attn.k_proj, attn.v_proj
        mlp.gate_up_proj = PackedLinear([mlp.gate_proj.weight, mlp.up_proj.weight], [None, None], kernels)
        mlp.down_proj = PackedLinear([mlp.down_proj.weight], [None], kernels)
        del mlp.gate_proj, mlp.up_proj
    model.lm_head = PackedLinear([model.lm_head.weight], [None], kernels)
    model.kernels = kernels
    model.decode_weights = decode_layer_weights(model)


def decode_layer_weights(model: nn.Module) -> list[torch.Tensor] | None:
    """The weights ``decode_layers`` (the one-call decode step for up to ``KERNEL_MAX_ROWS`` tokens)
    takes: per layer input norm, q|k|v, o, post-attention norm, gate|up, down (packed), then the final
    norm; None when a projection has a bias (that step adds none)."""
    weights: list[torch.Tensor] = []
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        projections = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
        if any(p.bias is not None for p in projections):
            return None
        weights += [layer.input_layernorm.weight.detach(), attn.qkv_proj.packed, attn.o_proj.packed]
        post_norm = layer.post_attention_layernorm.weight.detach()
        weights += [post_norm, mlp.gate_up_proj.packed, mlp.down_proj.packed]
    return [*weights, model.model.norm.weight.detach()]


def prepare_cpu_projections(model: nn.Module, dtype: torch.dtype, tied: bool) -> None:
    """The CPU transform after loading: the bf16 kernels where they apply, else ``TransposedLinear``."""
    if kernels_apply(model, dtype):
        pack_for_kernels(model)
    else:
        transpose_linear_weights(model, skip=("lm_head",) if tied else ())
