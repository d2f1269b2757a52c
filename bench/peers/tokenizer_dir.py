"""Write SmolLM2's tokenizer (from the embedded default's GGUF) to a directory a benchmark client can load.

    .venv/bin/python bench/peers/tokenizer_dir.py OUT_DIR

aiperf counts tokens with a Hugging Face tokenizer and loads it from a local directory here (no hub access).
transformers reads the tokenizer (and its chat template) out of the GGUF metadata, as it reads the weights.
"""

from __future__ import annotations

import os
import sys

from transformers import AutoTokenizer

from engine.builtin import smollm2_gguf_path


def main(out_dir: str) -> None:
    directory, name = os.path.split(smollm2_gguf_path())
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    tokenizer.save_pretrained(out_dir)
    print(f"{out_dir}: {type(tokenizer).__name__}, vocab {len(tokenizer)}")


if __name__ == "__main__":
    main(sys.argv[1])
