"""The model shape the engine needs, read from a Hugging Face config; unsupported models are refused."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# architecture -> (q/k/v projections always biased, has q/k RMSNorm)
SUPPORTED_ARCHITECTURES: dict[str, tuple[bool, bool]] = {
    "LlamaForCausalLM": (False, False),
    "MistralForCausalLM": (False, False),
    "Qwen2ForCausalLM": (True, False),
    "Qwen3ForCausalLM": (False, True),
}
_MODEL_TYPE_TO_ARCH = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
_STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


class UnsupportedModelError(ValueError):
    """The checkpoint is not a Llama-family decoder this engine can run."""


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a Llama-family decoder (Llama 2/3, Mistral, Qwen2, Qwen3)."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int  # the model's context length
    tie_word_embeddings: bool
    qkv_bias: bool  # q/k/v projections carry a bias (Qwen2 always; Llama/Qwen3 with attention_bias)
    o_proj_bias: bool  # the output projection carries a bias (Llama/Mistral/Qwen3 with attention_bias)
    has_qk_norm: bool  # RMSNorm over head_dim on q and k before RoPE (Qwen3)
    rope_type: str
    sliding_window: int | None  # when set, the context is capped to it (we attend to everything)

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )

    @property
    def context_length(self) -> int:
        """Tokens (prompt + generated) one sequence may hold."""
        if self.sliding_window is not None:
            return min(self.max_position_embeddings, self.sliding_window)
        return self.max_position_embeddings

    @classmethod
    def from_hf_config(cls, hf_config: Any) -> ModelConfig:
        """Read a ``transformers`` config; raise ``UnsupportedModelError`` naming what is not supported."""
        architecture = _architecture_of(hf_config)
        default_bias, has_qk_norm = SUPPORTED_ARCHITECTURES[architecture]
        rope = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in _STATIC_ROPE_TYPES:
            raise UnsupportedModelError(
                f"rope type {rope_type!r} is not supported (supported: {', '.join(_STATIC_ROPE_TYPES)})"
            )
        if getattr(hf_config, "mlp_bias", False):
            raise UnsupportedModelError("mlp_bias=True is not supported")
        num_heads = hf_config.num_attention_heads
        attention_bias = bool(getattr(hf_config, "attention_bias", False))
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads
        sliding_window = getattr(hf_config, "sliding_window", None)
        if architecture.startswith("Qwen") and not getattr(hf_config, "use_sliding_window", False):
            sliding_window = None
        return cls(
            architecture=architecture,
            vocab_size=hf_config.vocab_size,
            hidden_size=hf_config.hidden_size,
            intermediate_size=hf_config.intermediate_size,
            num_layers=hf_config.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            rms_norm_eps=hf_config.rms_norm_eps,
            max_position_embeddings=hf_config.max_position_embeddings,
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            qkv_bias=default_bias or attention_bias,
            o_proj_bias=attention_bias and architecture != "Qwen2ForCausalLM",
            has_qk_norm=has_qk_norm,
            rope_type=rope_type,
            sliding_window=sliding_window,
        )


def _architecture_of(hf_config: Any) -> str:
    architectures = list(getattr(hf_config, "architectures", None) or [])
    if not architectures:
        model_type = getattr(hf_config, "model_type", "")
        if model_type in _MODEL_TYPE_TO_ARCH:
            architectures = [_MODEL_TYPE_TO_ARCH[model_type]]
    for architecture in architectures:
        if architecture in SUPPORTED_ARCHITECTURES:
            return architecture
    raise UnsupportedModelError(
        f"unsupported architecture {architectures or getattr(hf_config, 'model_type', None)!r}; "
        f"pdserve's engine runs {', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
    )
