"""Decoding with a KV cache: early-exit decoding, self-speculative decoding, their costs.

  compiled     a model's split kept between calls, jitted decoders, token checks
  early_exit   `generate` / `decode_teacher_forced`: lossy early exit (copy, recompute)
  speculative  `speculative_generate`: the early layers draft, the rest verify (lossless)
  cost         FLOP accounting of both, in the emulation's formulas (`exits.FlopCounter`)
  cli          `generate_text`, `speculative_text` (what `deepexit-generate` runs:
               `deepexit_jax.main.generate`)

Every decoder runs its layers through the model's own cache-aware block step
(`model.Block.extend` / `extend_one`), so a change to the block reaches all of them.
"""

from deepexit_jax.decoding.cli import (
    SpeculativeText,
    TextGeneration,
    exit_layer_lines,
    generate_text,
    speculative_text,
    validation_prompts,
)
from deepexit_jax.decoding.cost import DecodeCost, SpeculativeCost, decode_cost, speculative_cost
from deepexit_jax.decoding.early_exit import (
    BATCH_EXITS,
    EMULATED_POLICY,
    KV_POLICIES,
    MEASURES,
    DecodeResult,
    decode_teacher_forced,
    generate,
)
from deepexit_jax.decoding.speculative import (
    DRAFT_MEASURES,
    SpeculativeResult,
    speculative_generate,
)

__all__ = [
    "BATCH_EXITS", "EMULATED_POLICY", "KV_POLICIES", "MEASURES", "DecodeCost", "DecodeResult",
    "TextGeneration", "decode_cost", "decode_teacher_forced", "exit_layer_lines", "generate",
    "generate_text", "DRAFT_MEASURES", "SpeculativeCost", "SpeculativeResult",
    "speculative_cost", "speculative_generate", "SpeculativeText", "speculative_text", "validation_prompts",
]
