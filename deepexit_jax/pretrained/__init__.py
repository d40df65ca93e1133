"""Pretrained models: Hugging Face Llama and GPT-2 checkpoints in the one-scan model.

  architectures.py   config.json <-> `ModelConfig`, tensor names and layouts per family
  hf_directory.py    reading (one tensor at a time, optionally onto a mesh) and writing
                     Hugging Face directories, tokenizer.json, hub ids
"""

from deepexit_jax.pretrained.architectures import ARCHITECTURES, DEFAULT_MAX_LEN
from deepexit_jax.pretrained.hf_directory import (
    is_hf_directory,
    load_hf_checkpoint,
    load_hf_tokenizer,
    save_hf_checkpoint,
)

__all__ = [
    "ARCHITECTURES",
    "DEFAULT_MAX_LEN",
    "is_hf_directory",
    "load_hf_checkpoint",
    "load_hf_tokenizer",
    "save_hf_checkpoint",
]
