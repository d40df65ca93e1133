"""`deepexit-generate`: continues a prompt from a checkpoint with early-exit or
self-speculative decoding.

Usage:
  deepexit-generate --checkpoint=/tmp/ref --prompt="The return value of " --threshold=0.9
  deepexit-generate --checkpoint=/tmp/ref --prompt="..." --speculative --draft_len=4
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from absl import flags

from deepexit_jax import checkpoint, cli, decoding
from deepexit_jax.errors import UserError

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Workdir of a deepexit-train run (or "
                                  "a Hugging Face directory).")
_HF_CHECKPOINT = flags.DEFINE_string("hf_checkpoint", None, "A Hugging Face checkpoint "
                                     "directory (config.json + *.safetensors + "
                                     "tokenizer.json); instead of --checkpoint.")
_PROMPT = flags.DEFINE_string("prompt", None, "Text to continue.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 100, "Tokens to generate.")
_THRESHOLD = flags.DEFINE_float("threshold", 0.9, "Confidence threshold (inf = never exit).")
_EXIT_LAYERS = flags.DEFINE_list("exit_layers", None, "1-based exit layers (default: the "
                                 "run's configured exit_layers; every layer for a Hugging "
                                 "Face checkpoint).")
_MEASURE = flags.DEFINE_enum("measure", "softmax", list(decoding.MEASURES),
                             "Confidence measure.")
_KV_POLICY = flags.DEFINE_enum("kv_policy", "copy", list(decoding.KV_POLICIES), "KV policy of "
                               "skipped layers.")
_BATCH_EXIT = flags.DEFINE_enum("batch_exit", "sync", list(decoding.BATCH_EXITS),
                                "Batch rule: all rows exit together, or per row.")
_BATCH = flags.DEFINE_integer("batch", 1, "Decode this many copies of the prompt.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy; > 0 samples.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_SHOW_EXITS = flags.DEFINE_bool("show_exits", False, "Print each token's exit layer under it.")
_BASELINE = flags.DEFINE_bool("baseline", False, "Also time full-depth decoding.")
_PROBE = flags.DEFINE_string("probe", None, "A deepexit-probe directory: exit on the "
                             "learned probe's confidence (sets --measure=probe).")
_SPECULATIVE = flags.DEFINE_bool("speculative", False, "Self-speculative decoding: layers "
                                 "1..--draft_layer draft, the rest verify (lossless).")
_DRAFT_LAYER = flags.DEFINE_integer("draft_layer", None, "--speculative: the drafting "
                                    "layer E (default: the run's first exit layer).")
_DRAFT_LEN = flags.DEFINE_integer("draft_len", 4, "--speculative: tokens drafted per cycle.")
_DRAFT_THRESHOLD = flags.DEFINE_float("draft_threshold", None, "--speculative: stop a draft "
                                      "when its confidence (--measure) falls below this.")


def _draft_layer(ckpt_dir: str, exit_layers: Sequence[int] | None) -> int:
  """--draft_layer, or the run's first exit layer below N."""
  if _DRAFT_LAYER.value is not None:
    return _DRAFT_LAYER.value
  meta = checkpoint.load_checkpoint(ckpt_dir)
  n = meta.model.config.num_layers
  below = [k for k in (exit_layers or meta.exit_layers) if k < n]
  if not below:
    raise UserError("--speculative needs --draft_layer (the run has no exit layer below "
                    f"its {n} layers)")
  return below[0]


def _speculative(ckpt_dir: str, exit_layers: Sequence[int] | None) -> None:
  gen = decoding.speculative_text(
      ckpt_dir, _PROMPT.value, _MAX_NEW.value,
      draft_layer=_draft_layer(ckpt_dir, exit_layers),
      batch=_BATCH.value, draft_len=_DRAFT_LEN.value, temperature=_TEMPERATURE.value,
      top_k=_TOP_K.value, rng=jax.random.key(_SEED.value),
      draft_threshold=_DRAFT_THRESHOLD.value, draft_measure=_MEASURE.value)
  for b, text in enumerate(gen.texts):
    if len(gen.texts) > 1:
      print(f"--- row {b}")
    print(_PROMPT.value + text)
  res = gen.result
  print(f"draft layer {res.draft_layer}, draft_len {res.draft_len} | acceptance "
        f"{res.acceptance_rate:.2f} | {res.tokens_per_cycle:.2f} tokens/cycle | FLOPs "
        f"{gen.cost.flops_ratio:.2f}x full depth")
  print(f"tokens/s {gen.tokens_per_second:,.0f} | full depth tokens/s "
        f"{gen.baseline_tokens_per_second:,.0f} | speedup over full depth "
        f"{gen.tokens_per_second / gen.baseline_tokens_per_second:.2f}x | " + (
            "sampled: the full model's distribution" if gen.identical is None
            else f"identical to full depth: {gen.identical}"))


def main(argv: Sequence[str]) -> None:
  del argv  # Stray arguments are refused by `cli.run_main`.
  ckpt_dir = cli.checkpoint_dir(_CHECKPOINT.value, _HF_CHECKPOINT.value)
  if _PROMPT.value is None:
    raise UserError("--prompt is required: the text to continue")
  try:
    layers = [int(x) for x in _EXIT_LAYERS.value] if _EXIT_LAYERS.value else None
  except ValueError:
    raise UserError(f"--exit_layers={_EXIT_LAYERS.value} must be integers, e.g. 2 or 1,2,3"
                    ) from None
  cli.log_devices()
  if _SPECULATIVE.value:
    _speculative(ckpt_dir, layers)
    return
  gen = decoding.generate_text(
      ckpt_dir, _PROMPT.value, _MAX_NEW.value, _THRESHOLD.value, exit_layers=layers,
      batch=_BATCH.value, baseline=_BASELINE.value, measure=_MEASURE.value,
      kv_policy=_KV_POLICY.value, batch_exit=_BATCH_EXIT.value, temperature=_TEMPERATURE.value,
      top_k=_TOP_K.value, rng=jax.random.key(_SEED.value), probe=_PROBE.value)
  for b, text in enumerate(gen.texts):
    if len(gen.texts) > 1:
      print(f"--- row {b}")
    if _SHOW_EXITS.value:
      print("\n".join(decoding.exit_layer_lines(text, gen.exit_layers[b].tolist())))
    else:
      print(_PROMPT.value + text)
  c = gen.cost
  print(f"tokens/s {gen.tokens_per_second:,.0f} | mean exit layer {c.mean_exit_layer:.2f} "
        f"of {gen.num_layers} | mean layers run {c.mean_layers_run:.2f} | FLOPs "
        f"{100 * c.executed / c.full_depth:.1f}% of full depth")
  if gen.baseline_tokens_per_second is not None:
    print(f"full depth tokens/s {gen.baseline_tokens_per_second:,.0f} | measured speedup "
          f"{gen.tokens_per_second / gen.baseline_tokens_per_second:.2f}x | ideal (FLOPs) "
          f"{c.full_depth / c.executed:.2f}x")


def run() -> None:
  cli.run_main(main)


if __name__ == "__main__":
  run()
