"""What the ingress needs of the model without loading its weights: tokenizer, vocabulary, context."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cluster.config import ClusterConfig
from cluster.validation import ModelLimits
from engine.builtin import BUILTIN_MODEL_ID


@dataclass(frozen=True)
class ModelInfo:
    """The served model as the ingress sees it."""

    name: str
    tokenizer: Any  # engine.tokenizer.Tokenizer: encode(text) -> ids, decode(ids) -> text, eos_token_id
    limits: ModelLimits


def load_model_info(config: ClusterConfig) -> ModelInfo:
    """Tokenizer and limits of ``config.engine.model`` (the built-in id or a checkpoint directory)."""
    from engine.model_config import ModelConfig

    engine = config.engine_for("decode")  # the pool that holds a whole sequence (in both modes)
    if engine.model == BUILTIN_MODEL_ID:
        from engine.builtin import builtin_hf_config
        from engine.tokenizer import ByteTokenizer

        hf_config: Any = builtin_hf_config()
        tokenizer: Any = ByteTokenizer()
        name = BUILTIN_MODEL_ID
    else:
        from pathlib import Path

        from engine.loader import load_hf_config
        from engine.tokenizer import load_tokenizer

        hf_config = load_hf_config(engine.model)
        tokenizer = load_tokenizer(engine.model)
        name = Path(engine.model).name
    model_config = ModelConfig.from_hf_config(hf_config)
    # A sequence can never hold more tokens than one worker's whole KV pool: the engine's own rule.
    kv = engine.kv_shape(model_config.num_layers, model_config.num_kv_heads, model_config.head_dim)
    context = engine.max_context_len(model_config.context_length, kv)
    return ModelInfo(name, tokenizer, ModelLimits(vocab_size=model_config.vocab_size, max_model_len=context))
