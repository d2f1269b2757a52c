"""What the planner and the simulator know of a model and a device (torch-free).

A :class:`ModelSpec` is a model's shape (layers, heads, KV heads, head dim, parameter count, dtype);
its KV bytes per token come from ``engine.kv_memory``, the one place that math lives. A
:class:`DeviceSpec` is one accelerator's memory, bandwidth and FLOP/s with the efficiencies the
roofline applies; a :class:`NodeSpec` is ``tp`` of them serving one model replica (tensor parallel).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from engine.kv_memory import KVShape, dtype_size

MIB = 2**20


@dataclass(frozen=True)
class ModelSpec:
    """A decoder's shape, enough for KV memory and a FLOP / byte roofline."""

    name: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_params: float
    dtype: str = "bfloat16"
    max_context: int = 4096

    @property
    def kv(self) -> KVShape:
        return KVShape(self.num_layers, self.num_kv_heads, self.head_dim, self.dtype)

    @property
    def kv_bytes_per_token(self) -> int:
        return self.kv.bytes_per_token

    @property
    def weight_bytes(self) -> float:
        return self.num_params * dtype_size(self.dtype)

    @property
    def attention_flops_per_pair(self) -> float:
        """FLOPs of one (query, key) token pair over all layers: QK^T and AV, 2 x 2 x head dim per head."""
        return 4.0 * self.num_layers * self.num_heads * self.head_dim


# Shapes of the models this project names (params: the checkpoints' tensor counts).
MODELS: dict[str, ModelSpec] = {
    "llama-70b": ModelSpec("llama-70b", 80, 64, 8, 128, 70.6e9, "float16", 8192),
    "llama-8b": ModelSpec("llama-8b", 32, 32, 8, 128, 8.03e9, "bfloat16", 8192),
    "smollm2-135m-instruct": ModelSpec("smollm2-135m-instruct", 30, 9, 3, 64, 134.5e6, "bfloat16", 8192),
    # engine.builtin: 4 layers, hidden 256, 8 heads on 4 KV heads, vocab 320, untied embeddings
    "pdserve-builtin-tiny": ModelSpec("pdserve-builtin-tiny", 4, 8, 4, 32, 3.06e6, "float32", 4096),
}


def model_from_checkpoint(path: str | Path, dtype: str | None = None) -> ModelSpec:
    """A Hugging Face checkpoint directory's shape: config.json, and the parameter count summed from
    the safetensors headers (estimated from config.json when there are none)."""
    folder = Path(path)
    config = json.loads((folder / "config.json").read_text())
    num_heads = int(config["num_attention_heads"])
    hidden = int(config["hidden_size"])
    head_dim = int(config.get("head_dim") or hidden // num_heads)
    num_layers = int(config["num_hidden_layers"])
    params = sum(_safetensors_numel(file) for file in sorted(folder.glob("*.safetensors")))
    if params == 0:
        inter = int(config.get("intermediate_size", 4 * hidden))
        kv_dim = int(config.get("num_key_value_heads", num_heads)) * head_dim
        per_layer = hidden * (hidden + 2 * kv_dim + hidden) + 3 * hidden * inter
        embeddings = int(config["vocab_size"]) * hidden * (1 if config.get("tie_word_embeddings") else 2)
        params = num_layers * per_layer + embeddings
    torch_dtype = str(config.get("torch_dtype", "bfloat16")).removeprefix("torch.")
    return ModelSpec(
        name=folder.name, num_layers=num_layers, num_heads=num_heads,
        num_kv_heads=int(config.get("num_key_value_heads", num_heads)), head_dim=head_dim,
        num_params=float(params), dtype=dtype or torch_dtype,
        max_context=int(config.get("max_position_embeddings", 4096)),
    )  # fmt: skip


def _safetensors_numel(path: Path) -> int:
    """Elements of every tensor in a .safetensors file, read from its JSON header only."""
    with path.open("rb") as handle:
        (header_len,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(header_len))
    total = 0
    for name, entry in header.items():
        if name != "__metadata__":
            count = 1
            for dim in entry["shape"]:
                count *= int(dim)
            total += count
    return total


@dataclass(frozen=True)
class DeviceSpec:
    """One accelerator, with the efficiencies the roofline applies to its peak figures."""

    name: str
    memory_bytes: float
    hbm_bytes_per_s: float
    flops: float  # dense bf16/fp16 peak
    compute_efficiency: float = 0.5  # share of peak FLOP/s a prefill step reaches (MFU)
    bandwidth_efficiency: float = 0.7  # share of peak HBM bandwidth a decode step reaches
    interconnect_bytes_per_s: float = 50e9  # node-to-node KV transfer (400 Gb/s NIC)
    step_overhead_s: float = 0.002  # per step: launches, TP all-reduces, scheduling

    def describe(self) -> str:
        return (
            f"{self.name}: {self.memory_bytes / 1e9:.0f} GB, {self.hbm_bytes_per_s / 1e12:.2f} TB/s x "
            f"{self.bandwidth_efficiency:.0%}, {self.flops / 1e12:.0f} TFLOP/s x "
            f"{self.compute_efficiency:.0%}, KV link {self.interconnect_bytes_per_s / 1e9:.0f} GB/s, "
            f"{self.step_overhead_s * 1e3:.1f} ms/step"
        )


DEVICES: dict[str, DeviceSpec] = {
    "H100": DeviceSpec("H100", 80e9, 3.35e12, 989e12),
    "H200": DeviceSpec("H200", 141e9, 4.8e12, 989e12),
    # this 2-core VM in bfloat16 (roofline only; `pdserve simulate --calibrate` measures it instead):
    # ~2 x 32 bf16 FLOP/cycle x 2.5 GHz, ~10 GB/s per core of memory bandwidth
    "cpu": DeviceSpec("cpu", 8e9, 20e9, 160e9, 0.25, 0.5, 5e9, 0.003),
}


@dataclass(frozen=True)
class NodeSpec:
    """``tp`` devices serving one model replica (tensor parallel); memory and speed add up."""

    device: DeviceSpec
    tp: int = 1
    reserved_bytes: float = 0.0  # activations, CUDA graphs, fragmentation: not for weights or KV

    @property
    def memory_bytes(self) -> float:
        return self.device.memory_bytes * self.tp

    def kv_budget_bytes(self, model: ModelSpec) -> float:
        """Memory left for KV once the weights and the reserve are placed (0 when they do not fit)."""
        return max(0.0, self.memory_bytes - model.weight_bytes - self.reserved_bytes)
