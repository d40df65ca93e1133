"""Text generation from a checkpoint, and the `deepexit-generate` binary."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from deepexit_jax.decoding.cost import DecodeCost, decode_cost
from deepexit_jax.decoding.early_exit import BATCH_EXITS, KV_POLICIES, MEASURES, generate
from deepexit_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class TextGeneration:
  """What `generate_text` returns (and `deepexit-generate` prints).

  Attributes:
    texts: the B generated continuations (without the prompt).
    exit_layers: [B, M] int 1-based layer each generated token came from.
    num_layers: N.
    tokens_per_second: generated tokens (all rows) per second of the timed call, compile
      excluded.
    cost: the `DecodeCost` of the decode.
    baseline_tokens_per_second: the same decode at full depth (same code, no exits), or
      None if not asked for.
  """

  texts: list[str]
  exit_layers: np.ndarray
  num_layers: int
  tokens_per_second: float
  cost: DecodeCost
  baseline_tokens_per_second: float | None = None


def _timed(fn) -> tuple[Any, float]:
  """Runs `fn` once to compile, then returns (result, seconds) of the best of two timed calls."""
  import time

  jax.block_until_ready(fn())
  best = math.inf
  for _ in range(2):
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - start)
  return out, best


def generate_text(checkpoint_dir: str, prompt: str, max_new_tokens: int, threshold: float,
                  *, exit_layers: Sequence[int] | None = None, batch: int = 1,
                  baseline: bool = False, **kwargs) -> TextGeneration:
  """Loads a checkpoint and continues `prompt` with early-exit decoding.

  Args:
    checkpoint_dir: a `deepexit-train` workdir or a `save_model` directory with a tokenizer.
    prompt: the text to continue (at least one character the tokenizer knows).
    max_new_tokens: tokens to generate.
    threshold: confidence threshold (`inf` = never exit).
    exit_layers: 1-based exit layers; None uses the run's configured ones (or layer N).
    batch: decode this many copies of the prompt at once (a throughput figure; with
      sampling the rows differ).
    baseline: also time the full-depth decode of the same prompt.
    **kwargs: measure, kv_policy, batch_exit, temperature, top_k, rng, max_pending
      (see `generate`).

  Returns:
    A `TextGeneration`.
  """
  from deepexit_jax import checkpoint

  ckpt = checkpoint.load_checkpoint(checkpoint_dir)
  if ckpt.tokenizer is None:
    raise UserError(f"{checkpoint_dir} has no tokenizer.json: generate from a deepexit-train "
                    "workdir (or save_model(..., tokenizer=...))")
  model, n = ckpt.model, ckpt.model.config.num_layers
  if exit_layers is None:
    exit_layers = tuple((ckpt.experiment or {}).get("exit_layers", (n,)))
  if not prompt:
    raise UserError("the prompt is empty: pass at least one character with --prompt")
  ids = ckpt.tokenizer.encode(prompt)
  unk = getattr(ckpt.tokenizer, "UNK_ID", None)
  if unk is not None and (ids == unk).any():
    unknown = sorted({c for c, i in zip(prompt, ids) if i == unk})
    raise UserError(f"the prompt holds characters the model never saw in training "
                    f"{''.join(unknown)!r}: remove or replace them")
  if not isinstance(batch, int) or batch < 1:
    raise UserError(f"batch={batch!r} must be an integer >= 1")
  prompt_BP = np.tile(ids[None], (batch, 1))

  def call(layers):
    return lambda: generate(model, prompt_BP, max_new_tokens, threshold, exit_layers=layers,
                            **kwargs)

  result, seconds = _timed(call(exit_layers))
  base_tps = None
  if baseline:
    _, base_seconds = _timed(call((n,)))
    base_tps = batch * max_new_tokens / base_seconds
  new_BM = np.asarray(result.new_tokens)
  cost = decode_cost(model.config, result, measure=kwargs.get("measure", "softmax"),
                     kv_policy=kwargs.get("kv_policy", "copy"))
  return TextGeneration(
      texts=[ckpt.tokenizer.decode(row) for row in new_BM],
      exit_layers=np.asarray(result.exit_layer), num_layers=n,
      tokens_per_second=batch * max_new_tokens / seconds, cost=cost,
      baseline_tokens_per_second=base_tps)


_LAYER_DIGITS = "123456789abcdefghijklmnopqrstuvwxyz"


def exit_layer_lines(text: str, exit_layers: Sequence[int], width: int = 72) -> list[str]:
  """The text in lines of `width` characters, each followed by a line of exit layers.

  Layer k is written as one character under its token (1-9, then a, b, ... for 10, 11,
  ...); newlines and tabs show as a visible symbol so the columns stay aligned.
  """
  shown = "".join({"\n": "\u21b5", "\t": "\u2192"}.get(c, c) for c in text)
  digits = "".join(_LAYER_DIGITS[k - 1] if 1 <= k <= len(_LAYER_DIGITS) else "?"
                   for k in exit_layers)
  lines = []
  for i in range(0, len(shown), width):
    lines += [shown[i:i + width], digits[i:i + width]]
  return lines


def run() -> None:
  """The `deepexit-generate` binary; flags are defined here so importing stays flag-free."""
  from absl import flags

  from deepexit_jax import cli

  ckpt_flag = flags.DEFINE_string("checkpoint", None, "Workdir of a deepexit-train run.")
  prompt_flag = flags.DEFINE_string("prompt", None, "Text to continue.")
  new_flag = flags.DEFINE_integer("max_new_tokens", 100, "Tokens to generate.")
  thr_flag = flags.DEFINE_float("threshold", 0.9, "Confidence threshold (inf = never exit).")
  exits_flag = flags.DEFINE_list("exit_layers", None, "1-based exit layers (default: the "
                                 "run's configured exit_layers).")
  measure_flag = flags.DEFINE_enum("measure", "softmax", list(MEASURES), "Confidence measure.")
  kv_flag = flags.DEFINE_enum("kv_policy", "copy", list(KV_POLICIES), "KV policy of "
                              "skipped layers.")
  batch_exit_flag = flags.DEFINE_enum("batch_exit", "sync", list(BATCH_EXITS),
                                      "Batch rule: all rows exit together, or per row.")
  batch_flag = flags.DEFINE_integer("batch", 1, "Decode this many copies of the prompt.")
  temp_flag = flags.DEFINE_float("temperature", 0.0, "0 = greedy; > 0 samples.")
  topk_flag = flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens.")
  seed_flag = flags.DEFINE_integer("seed", 0, "Sampling seed.")
  show_flag = flags.DEFINE_bool("show_exits", False, "Print each token's exit layer under it.")
  base_flag = flags.DEFINE_bool("baseline", False, "Also time full-depth decoding.")

  def main(argv):
    del argv
    if not ckpt_flag.value:
      raise UserError("--checkpoint is required: the --workdir of a deepexit-train run")
    if prompt_flag.value is None:
      raise UserError("--prompt is required: the text to continue")
    try:
      layers = [int(x) for x in exits_flag.value] if exits_flag.value else None
    except ValueError:
      raise UserError(f"--exit_layers={exits_flag.value} must be integers, e.g. 2 or 1,2,3"
                      ) from None
    cli.log_devices()
    gen = generate_text(
        ckpt_flag.value, prompt_flag.value, new_flag.value, thr_flag.value,
        exit_layers=layers, batch=batch_flag.value, baseline=base_flag.value,
        measure=measure_flag.value, kv_policy=kv_flag.value,
        batch_exit=batch_exit_flag.value, temperature=temp_flag.value, top_k=topk_flag.value,
        rng=jax.random.key(seed_flag.value))
    for b, text in enumerate(gen.texts):
      if len(gen.texts) > 1:
        print(f"--- row {b}")
      if show_flag.value:
        print("\n".join(exit_layer_lines(text, gen.exit_layers[b].tolist())))
      else:
        print(prompt_flag.value + text)
    c = gen.cost
    print(f"tokens/s {gen.tokens_per_second:,.0f} | mean exit layer {c.mean_exit_layer:.2f} "
          f"of {gen.num_layers} | mean layers run {c.mean_layers_run:.2f} | FLOPs "
          f"{100 * c.executed / c.full_depth:.1f}% of full depth")
    if gen.baseline_tokens_per_second is not None:
      print(f"full depth tokens/s {gen.baseline_tokens_per_second:,.0f} | measured speedup "
            f"{gen.tokens_per_second / gen.baseline_tokens_per_second:.2f}x | ideal (FLOPs) "
            f"{c.full_depth / c.executed:.2f}x")

  cli.run_main(main)


if __name__ == "__main__":
  run()
