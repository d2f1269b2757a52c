"""transformers' own GGUF loader on the installed SmolLM2 file, float32: the exactness reference of the
engine tests and the cluster tests alike, loaded once per test session (~15-25 s on 2 cores)."""

from __future__ import annotations

import os
from functools import cache
from typing import Any


@cache
def smollm2_hf_float32() -> Any:
    """``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`` in float32, eval mode (shared: callers
    must not change it; deep-copy it to cast)."""
    import torch
    from transformers import AutoModelForCausalLM

    from engine.builtin import smollm2_gguf_path

    directory, name = os.path.split(smollm2_gguf_path())
    return AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32).eval()
