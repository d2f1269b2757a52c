"""GGUF checkpoints: find the file, refuse what the engine cannot run, read config, tokenizer and weights.

``transformers`` (with the ``gguf`` package) is the exactness reference: the engine must hold the
tensors and config ``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`` builds. Its loader
takes ~20 s on SmolLM2 (``gguf.GGUFReader`` makes a numpy view per vocabulary entry; a name map is
rebuilt per submodule), so the header is parsed here in one pass (``GGUFHeader``) and the same rules
applied to it: the config from transformers' own GGUF key mapping; each tensor dequantized to float32
by ``gguf.quants.dequantize`` (what transformers calls), the q/k rows of ``llama`` files un-permuted
back to Hugging Face's RoPE layout, names from ``gguf``'s tensor-name map. Result: bit for bit
transformers' state dict and config (``tests/engine/test_engine_gguf.py`` checks both) in ~3 s. The
tokenizer and chat template come from ``AutoTokenizer`` itself (~4 s). Only local files are read.
"""

from __future__ import annotations

import glob
import os
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from engine.model_config import UnsupportedModelError

if TYPE_CHECKING:  # torch and numpy only where tensors are read: the ingress imports this for tokenizers
    import numpy as np
    import torch

GGUF_SUFFIX = ".gguf"
# ``general.architecture`` values the engine runs (llama.cpp writes Llama 2/3 and Mistral as "llama").
SUPPORTED_GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3")
_PERMUTED_QK_ARCHITECTURES = ("llama",)  # llama.cpp's converter permutes q/k rows for these
_GGUF_MAGIC = b"GGUF"
_GGUF_VERSIONS = (2, 3)
_DEFAULT_ALIGNMENT = 32
# metadata value type -> struct format of a scalar (8: string, 9: array)
_SCALAR_FORMATS = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"
}
_STRING, _ARRAY = 8, 9


class GGUFFileError(ValueError):
    """A model path names no single GGUF file (e.g. a directory holding several)."""


def find_gguf_file(model: str) -> str | None:
    """The GGUF file ``model`` names: a ``*.gguf`` file, or a directory holding exactly one.

    ``None`` when ``model`` is neither (a Hugging Face directory, an id). A directory with a
    ``config.json`` is a Hugging Face checkpoint even if it also holds GGUF files.
    Raises ``GGUFFileError`` for a directory holding several GGUF files (which one is meant?).
    """
    if os.path.isfile(model):
        return model if model.endswith(GGUF_SUFFIX) else None
    if not os.path.isdir(model) or os.path.isfile(os.path.join(model, "config.json")):
        return None
    files = sorted(glob.glob(os.path.join(model, f"*{GGUF_SUFFIX}")))
    if len(files) > 1:
        names = ", ".join(os.path.basename(file) for file in files)
        raise GGUFFileError(
            f"model: {model!r} holds {len(files)} GGUF files ({names}); pass the path of the one to serve"
        )
    return files[0] if files else None


def gguf_model_name(path: str) -> str:
    """The model name of a GGUF file: its file name without ``.gguf``."""
    return os.path.basename(path)[: -len(GGUF_SUFFIX)]


@dataclass(frozen=True)
class GGUFTensorInfo:
    """One tensor's entry in the file's tensor table."""

    name: str  # GGUF name, e.g. "blk.0.attn_q.weight"
    shape: tuple[int, ...]  # torch order (GGUF lists the fastest-moving dimension first)
    ggml_type: int  # gguf.GGMLQuantizationType value
    offset: int  # from the start of the data section


@dataclass(frozen=True)
class GGUFHeader:
    """A GGUF file's scalar and string metadata and its tensor table (arrays: only their lengths)."""

    path: str
    metadata: dict[str, Any]
    array_lengths: dict[str, int]  # e.g. "tokenizer.ggml.tokens" -> vocabulary size
    tensors: tuple[GGUFTensorInfo, ...]
    data_start: int  # byte offset of the data section (aligned)

    @property
    def architecture(self) -> str:
        return str(self.metadata["general.architecture"])

    @classmethod
    def read(cls, path: str) -> GGUFHeader:
        """Parse the header of ``path``; ``ValueError`` if it is not a GGUF v2/v3 file."""
        with open(path, "rb") as f:
            blob = f.read(16 << 20)  # metadata + tensor table; grown below if a header is larger
        while True:
            try:
                return cls._parse(path, blob)
            except struct.error:
                if len(blob) >= os.path.getsize(path):
                    raise ValueError(f"model: {path!r} is a truncated GGUF file") from None
                with open(path, "rb") as f:
                    blob = f.read(len(blob) * 4)

    @classmethod
    def _parse(cls, path: str, blob: bytes) -> GGUFHeader:
        if blob[:4] != _GGUF_MAGIC:
            raise ValueError(f"model: {path!r} is not a GGUF file (no GGUF magic)")
        version, num_tensors, num_values = struct.unpack_from("<IQQ", blob, 4)
        if version not in _GGUF_VERSIONS:
            raise ValueError(f"model: {path!r} is GGUF v{version}; supported: v2, v3")
        pos, metadata, array_lengths = 24, {}, {}
        for _ in range(num_values):
            key, pos = _read_string(blob, pos)
            (value_type,) = struct.unpack_from("<I", blob, pos)
            if value_type == _ARRAY:
                array_lengths[key], pos = _skip_array(blob, pos + 4)
            else:
                metadata[key], pos = _read_value(blob, pos + 4, value_type)
        if "general.architecture" not in metadata:
            raise ValueError(f"model: {path!r} has no general.architecture in its metadata")
        tensors = []
        for _ in range(num_tensors):
            name, pos = _read_string(blob, pos)
            (num_dims,) = struct.unpack_from("<I", blob, pos)
            dims = struct.unpack_from(f"<{num_dims}Q", blob, pos + 4)
            ggml_type, offset = struct.unpack_from("<IQ", blob, pos + 4 + 8 * num_dims)
            pos += 4 + 8 * num_dims + 12
            tensors.append(GGUFTensorInfo(name, tuple(reversed(dims)), ggml_type, offset))
        alignment = int(metadata.get("general.alignment", _DEFAULT_ALIGNMENT))
        data_start = (pos + alignment - 1) // alignment * alignment
        return cls(path, metadata, array_lengths, tuple(tensors), data_start)


def _read_string(blob: bytes, pos: int) -> tuple[str, int]:
    (length,) = struct.unpack_from("<Q", blob, pos)
    end = pos + 8 + length
    if end > len(blob):
        raise struct.error("string past the end of the buffer")
    return blob[pos + 8 : end].decode("utf-8", errors="replace"), end


def _read_value(blob: bytes, pos: int, value_type: int) -> tuple[Any, int]:
    """One scalar or string value and the position after it."""
    if value_type == _STRING:
        return _read_string(blob, pos)
    if value_type not in _SCALAR_FORMATS:
        raise ValueError(f"unknown GGUF metadata value type {value_type}")
    (value,) = struct.unpack_from(_SCALAR_FORMATS[value_type], blob, pos)
    return value, pos + struct.calcsize(_SCALAR_FORMATS[value_type])


def _skip_array(blob: bytes, pos: int) -> tuple[int, int]:
    """``(length, position after the array)`` of the array at ``pos`` (element type, count, elements)."""
    element_type, count = struct.unpack_from("<IQ", blob, pos)
    pos += 12
    if element_type in _SCALAR_FORMATS:
        return count, pos + count * struct.calcsize(_SCALAR_FORMATS[element_type])
    for _ in range(count):
        if element_type == _ARRAY:
            _, pos = _skip_array(blob, pos)
        else:
            _, pos = _read_value(blob, pos, element_type)
    return count, pos


def check_gguf_architecture(header: GGUFHeader) -> str:
    """The file's architecture if the engine runs it; else ``UnsupportedModelError`` naming it."""
    architecture = header.architecture
    if architecture not in SUPPORTED_GGUF_ARCHITECTURES:
        raise UnsupportedModelError(
            f"GGUF architecture {architecture!r} of {header.path!r} is not supported; pdserve's engine runs "
            f"GGUF architectures {', '.join(SUPPORTED_GGUF_ARCHITECTURES)} (Llama 2/3, Mistral, Qwen2, Qwen3)"
        )
    return architecture


def gguf_config_dict(header: GGUFHeader) -> dict[str, Any]:
    """The config dict ``AutoConfig.from_pretrained(dir, gguf_file=...)`` builds for these architectures.

    The same rules as transformers' GGUF loader (``load_gguf_checkpoint``), applied to the header read
    here: its metadata renamed by ``transformers.integrations.GGUF_CONFIG_MAPPING``, embeddings tied
    when the file stores no ``output.weight``, the vocabulary size from the token list if the file
    does not state it. (transformers parses every vocabulary entry first: ~5 s for SmolLM2.)
    """
    from transformers.integrations import GGUF_CONFIG_MAPPING

    config: dict[str, Any] = {
        "tie_word_embeddings": all(info.name != "output.weight" for info in header.tensors)
    }
    for key, value in header.metadata.items():
        prefix, _, config_key = key.partition(".")
        renamed = GGUF_CONFIG_MAPPING.get(prefix, {}).get(config_key)
        if renamed is not None and renamed != -1:
            config[renamed] = value
    if "vocab_size" not in config and "tokenizer.ggml.tokens" in header.array_lengths:
        config["vocab_size"] = header.array_lengths["tokenizer.ggml.tokens"]
    return config


def load_gguf_config(path: str) -> Any:
    """The file's model config as a ``transformers`` config (architecture checked first)."""
    from transformers import AutoConfig

    header = GGUFHeader.read(path)  # parsed once: the architecture check and the config both read it
    check_gguf_architecture(header)
    config = gguf_config_dict(header)
    return AutoConfig.for_model(config.pop("model_type"), **config)


def load_gguf_tokenizer(path: str) -> Any:
    """The tokenizer (vocabulary, merges, special tokens, chat template) stored in the file's metadata."""
    from transformers import AutoTokenizer

    directory, name = os.path.split(os.path.abspath(path))
    # ~4 s for SmolLM2, most of it transformers re-parsing the config to pick the tokenizer class.
    return AutoTokenizer.from_pretrained(directory, gguf_file=name, local_files_only=True)


def read_gguf_state_dict(path: str, hf_config: Any) -> dict[str, torch.Tensor]:
    """All tensors of the file the model uses, dequantized to float32, under HF parameter names.

    Names come from ``gguf``'s map for the file's architecture over the parameters of a
    ``transformers`` model built on the meta device (no memory); file tensors that map to no
    parameter (e.g. llama 3's ``rope_freqs``) are skipped, as transformers does. A tied ``lm_head``
    is absent (the file stores no ``output.weight``).
    """
    import numpy as np
    import torch
    from gguf import GGML_QUANT_SIZES, MODEL_ARCH_NAMES, GGMLQuantizationType, dequantize, get_tensor_name_map
    from transformers import AutoModelForCausalLM

    header = GGUFHeader.read(path)
    arch = next(key for key, name in MODEL_ARCH_NAMES.items() if name == header.architecture)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(hf_config)
    name_map = get_tensor_name_map(arch, hf_config.num_hidden_layers)
    gguf_to_hf = {}
    for hf_name in skeleton.state_dict():
        module, _, suffix = hf_name.rpartition(".")
        gguf_name = name_map.get_name(module)
        if gguf_name is not None:
            gguf_to_hf[f"{gguf_name}.{suffix}"] = hf_name
    blob = np.memmap(path, dtype=np.uint8, mode="r")
    state_dict: dict[str, torch.Tensor] = {}
    for info in header.tensors:
        hf_name = gguf_to_hf.get(info.name)
        if hf_name is None:
            continue
        block_size, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(info.ggml_type)]
        row_bytes = info.shape[-1] // block_size * block_bytes
        start = header.data_start + info.offset
        num_bytes = row_bytes * int(np.prod(info.shape[:-1], dtype=np.int64))
        # raw: [*shape[:-1], row_bytes] uint8, the layout gguf.dequantize takes for every type
        raw = blob[start : start + num_bytes].reshape(*info.shape[:-1], row_bytes)
        weights = dequantize(raw, GGMLQuantizationType(info.ggml_type)).reshape(info.shape)
        if header.architecture in _PERMUTED_QK_ARCHITECTURES:
            weights = _unpermute_qk(weights, info.name, hf_config)
        state_dict[hf_name] = torch.from_numpy(np.array(weights, dtype=np.float32))
    if not state_dict:
        raise ValueError(f"model: no tensors of {path!r} map onto {type(skeleton).__name__}")
    return state_dict


def _unpermute_qk(weights: np.ndarray, gguf_name: str, hf_config: Any) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (``convert_hf_to_gguf.py`` ``LlamaModel.permute``).

    llama.cpp rotates interleaved pairs, HF rotates halves: llama.cpp stores each head's rows as
    ``[head, 2, head_dim/2] -> [head, head_dim/2, 2]``; this swaps them back (as transformers'
    ``LlamaTensorProcessor`` does).
    """
    if ".attn_q." in gguf_name:
        num_heads = hf_config.num_attention_heads
    elif ".attn_k." in gguf_name:
        num_heads = getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads
    else:
        return weights
    # weights: [num_heads * head_dim, hidden] (or [num_heads * head_dim] for a bias)
    half = weights.shape[0] // num_heads // 2
    return weights.reshape(num_heads, half, 2, *weights.shape[1:]).swapaxes(2, 1).reshape(weights.shape)
