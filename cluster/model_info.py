"""What the ingress needs of the model without loading its weights: tokenizer, vocabulary, context."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.config import ClusterConfig
from cluster.validation import ModelLimits
from engine.builtin import BUILTIN_MODEL_ID, resolve_model_path

_TURN_PROBE = "pdserve end-of-turn probe"


@dataclass(frozen=True)
class ModelInfo:
    """The served model as the ingress sees it."""

    name: str
    tokenizer: Any  # engine.tokenizer.Tokenizer: encode(text) -> ids, decode(ids) -> text, eos_token_id
    limits: ModelLimits


def model_name(model: str) -> str:
    """The served model's name: the id of a known model, a GGUF file's model name, a directory's name."""
    from engine.gguf import find_gguf_file, gguf_model_name

    path = resolve_model_path(model)
    if path != model:  # a model id engine.builtin knows (smollm2-135m-instruct)
        return model
    gguf_file = find_gguf_file(path)
    return gguf_model_name(gguf_file) if gguf_file is not None else Path(path).name


def end_of_turn_token_ids(tokenizer: Any) -> tuple[int, ...]:
    """The chat template's end-of-turn token where it is a special token other than EOS (e.g. Llama 3's
    ``<|eot_id|>``); ``()`` when it is EOS (SmolLM2's ``<|im_end|>``) or the model has no template.

    Found by rendering an assistant turn and reading the first token after its content."""
    hf = getattr(tokenizer, "hf_tokenizer", None)
    if hf is None or not getattr(tokenizer, "chat_template", None):
        return ()
    try:
        rendered = hf.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _TURN_PROBE}], tokenize=False
        )
        after = rendered[rendered.index(_TURN_PROBE) + len(_TURN_PROBE) :]
        first = hf.encode(after, add_special_tokens=False)[:1]
    except Exception:  # a template that cannot render an assistant turn: EOS alone ends it
        return ()
    if first and first[0] in set(hf.all_special_ids) and first[0] != tokenizer.eos_token_id:
        return (first[0],)
    return ()


def load_model_info(config: ClusterConfig) -> ModelInfo:
    """Tokenizer and limits of ``config.engine.model`` (the built-in id, a model id, a checkpoint)."""
    from engine.model_config import ModelConfig

    engine = config.engine_for("decode")  # the pool that holds a whole sequence (in both modes)
    if engine.model == BUILTIN_MODEL_ID:
        from engine.builtin import builtin_hf_config
        from engine.tokenizer import ByteTokenizer

        hf_config: Any = builtin_hf_config()
        tokenizer: Any = ByteTokenizer()
        name = BUILTIN_MODEL_ID
    else:
        from engine.loader import load_hf_config
        from engine.tokenizer import load_tokenizer

        hf_config = load_hf_config(engine.model)
        tokenizer = load_tokenizer(engine.model)
        name = model_name(engine.model)
    model_config = ModelConfig.from_hf_config(hf_config)
    # A sequence can never hold more tokens than one worker's whole KV pool: the engine's own rule.
    kv = engine.kv_shape(model_config.num_layers, model_config.num_kv_heads, model_config.head_dim)
    context = engine.max_context_len(model_config.context_length, kv)
    limits = ModelLimits(
        vocab_size=model_config.vocab_size,
        max_model_len=context,
        chat_stop_token_ids=end_of_turn_token_ids(tokenizer),
    )
    return ModelInfo(name, tokenizer, limits)
