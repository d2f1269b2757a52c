"""Build a ``CausalLM`` from a checkpoint (HF directory or GGUF), an in-memory model, or the built-in seed."""

from __future__ import annotations

import glob
import hashlib
import json
import os
from typing import Any

import torch

from engine.attention import TorchAttention
from engine.builtin import BUILTIN_MODEL_ID, build_builtin_hf_model, resolve_model_path
from engine.cpu_linear import prepare_cpu_projections
from engine.gguf import find_gguf_file, gguf_model_name, load_gguf_config, read_gguf_state_dict
from engine.model import CausalLM
from engine.model_config import ModelConfig, UnsupportedModelError

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def load_hf_config(path: str) -> Any:
    """The ``transformers`` config of a checkpoint: a GGUF file's metadata or a directory's ``config.json``.

    ``path`` may also be a model id ``resolve_model_path`` knows. Unknown models are refused early.
    """
    from transformers import AutoConfig

    path = resolve_model_path(path)
    gguf_file = find_gguf_file(path)
    if gguf_file is not None:
        return load_gguf_config(gguf_file)
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"model: {path!r} is not a checkpoint directory (no config.json)")
    with open(config_path) as f:
        raw = json.load(f)
    try:
        return AutoConfig.from_pretrained(path, local_files_only=True)
    except (ValueError, KeyError) as error:
        raise UnsupportedModelError(
            f"unsupported model_type {raw.get('model_type')!r} / "
            f"architectures {raw.get('architectures')!r}: {error}"
        ) from error


def read_safetensors(path: str) -> dict[str, torch.Tensor]:
    """All tensors of ``*.safetensors`` in ``path`` (sharded or not)."""
    from safetensors.torch import load_file

    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"model: no *.safetensors files in {path!r}")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(file))
    return state


def build_model(
    model_config: ModelConfig,
    hf_config: Any,
    state_dict: dict[str, torch.Tensor],
    dtype: torch.dtype,
    device: torch.device,
    max_positions: int,
    backend: TorchAttention,
) -> CausalLM:
    """A ``CausalLM`` on ``device`` in ``dtype`` holding ``state_dict`` (HF parameter names)."""
    with torch.device("meta"):
        model = CausalLM(model_config, hf_config, backend, max_positions)
    expected = set(model.state_dict())
    weights = {k: v for k, v in state_dict.items() if not k.endswith(_IGNORED_SUFFIXES)}
    if model_config.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    converted = {k: v.to(device=device, dtype=dtype) for k, v in weights.items()}
    model.load_state_dict(converted, assign=True)
    if model_config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    if device.type == "cpu":
        prepare_cpu_projections(model, dtype, tied=model_config.tie_word_embeddings)
    model.init_rotary()
    model.eval()
    return model


def weights_fingerprint(state_dict: dict[str, torch.Tensor]) -> str:
    """A short hash of a few parameters' bytes: same name with other weights gives another fingerprint."""
    digest = hashlib.blake2b(digest_size=8)
    for name in sorted(state_dict)[:8]:
        tensor = state_dict[name].detach().to("cpu", torch.float32).flatten()[:4096]
        digest.update(name.encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def load_source(model: str, hf_model: Any | None) -> tuple[str, Any, dict[str, torch.Tensor]]:
    """``(model_name, hf_config, state_dict)`` from an in-memory model, a model id, a GGUF or a directory.

    GGUF weights come dequantized to float32; ``build_model`` casts them to the serving dtype.
    """
    if hf_model is not None:
        name = getattr(hf_model.config, "_name_or_path", "") or type(hf_model).__name__
        return name, hf_model.config, hf_model.state_dict()
    if model == BUILTIN_MODEL_ID:
        builtin = build_builtin_hf_model()
        return BUILTIN_MODEL_ID, builtin.config, builtin.state_dict()
    model = resolve_model_path(model)
    hf_config = load_hf_config(model)
    ModelConfig.from_hf_config(hf_config)  # refuse unsupported architectures before reading weights
    gguf_file = find_gguf_file(model)
    if gguf_file is not None:
        return gguf_model_name(gguf_file), hf_config, read_gguf_state_dict(gguf_file, hf_config)
    return os.path.basename(os.path.normpath(model)), hf_config, read_safetensors(model)
