"""Text generation from a checkpoint, and the `deepexit-generate` binary."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from deepexit_jax.decoding.cost import DecodeCost, SpeculativeCost, decode_cost, speculative_cost
from deepexit_jax.decoding.early_exit import generate
from deepexit_jax.decoding.speculative import SpeculativeResult, speculative_generate
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


def validation_prompts(ckpt, batch: int, length: int) -> np.ndarray:
  """int32 [batch, length] prompts: windows of a `deepexit-train` checkpoint's validation
  tokens, spread evenly over the text (benchmarks decode them)."""
  from deepexit_jax import data

  cfg = data.DataConfig.from_dict(ckpt.experiment["data"])
  val = data.prepare_dataset(cfg, tokenizer=ckpt.tokenizer).val_tokens
  starts = np.linspace(0, len(val) - length - 1, batch).astype(int)
  return np.stack([val[s:s + length] for s in starts]).astype(np.int32)


def _load(checkpoint_dir: str, prompt: str, batch: int):
  """(checkpoint, int32 [batch, P] prompt ids), with one-line errors for bad input."""
  from deepexit_jax import checkpoint

  ckpt = checkpoint.load_checkpoint(checkpoint_dir)
  if ckpt.tokenizer is None:
    raise UserError(f"{checkpoint_dir} has no tokenizer.json: generate from a deepexit-train "
                    "workdir (or save_model(..., tokenizer=...))")
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
  return ckpt, np.tile(ids[None], (batch, 1)).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class SpeculativeText:
  """What `speculative_text` returns (and `deepexit-generate --speculative` prints).

  Attributes:
    texts: the B generated continuations (without the prompt).
    result: the `SpeculativeResult`.
    cost: its `SpeculativeCost`.
    tokens_per_second: generated tokens (all rows) per second, compile excluded.
    baseline_tokens_per_second: full-depth greedy `generate` of the same tokens.
    identical: greedy: the speculative tokens equal full-depth decoding's (must be True);
      None when sampling (the same distribution, not the same draws).
  """

  texts: list[str]
  result: SpeculativeResult
  cost: SpeculativeCost
  tokens_per_second: float
  baseline_tokens_per_second: float
  identical: bool | None


def speculative_text(checkpoint_dir: str, prompt: str, max_new_tokens: int, *,
                     draft_layer: int, draft_len: int = 4, batch: int = 1,
                     **kwargs) -> SpeculativeText:
  """Loads a checkpoint and continues `prompt` by self-speculative decoding, timed against
  full-depth decoding of the same prompt (same sampling settings and key).

  Args:
    checkpoint_dir, prompt, max_new_tokens, batch: as for `generate_text`.
    draft_layer, draft_len: E and k (see `speculative_generate`).
    **kwargs: temperature, top_k, rng, draft_threshold, draft_measure.
  """
  ckpt, prompt_BP = _load(checkpoint_dir, prompt, batch)
  model, n = ckpt.model, ckpt.model.config.num_layers
  result, seconds = _timed(lambda: speculative_generate(
      model, prompt_BP, max_new_tokens, draft_layer=draft_layer, draft_len=draft_len,
      **kwargs))
  plain = {key: kwargs[key] for key in ("temperature", "top_k", "rng") if key in kwargs}
  full, base_seconds = _timed(lambda: generate(model, prompt_BP, max_new_tokens, np.inf,
                                               exit_layers=(n,), **plain))
  tokens = np.asarray(result.tokens)
  return SpeculativeText(
      texts=[ckpt.tokenizer.decode(row) for row in np.asarray(result.new_tokens)],
      result=result, cost=speculative_cost(model.config, result),
      tokens_per_second=batch * max_new_tokens / seconds,
      baseline_tokens_per_second=batch * max_new_tokens / base_seconds,
      identical=(None if kwargs.get("temperature", 0.0) > 0
                 else bool(np.array_equal(tokens, np.asarray(full.tokens)))))


def generate_text(checkpoint_dir: str, prompt: str, max_new_tokens: int, threshold: float,
                  *, exit_layers: Sequence[int] | None = None, batch: int = 1,
                  baseline: bool = False, **kwargs) -> TextGeneration:
  """Loads a checkpoint and continues `prompt` with early-exit decoding.

  Args:
    checkpoint_dir: a `deepexit-train` workdir or a `save_model` directory with a tokenizer.
    prompt: the text to continue (at least one character the tokenizer knows).
    max_new_tokens: tokens to generate.
    threshold: confidence threshold (`inf` = never exit).
    exit_layers: 1-based exit layers; None: `checkpoint.Checkpoint.exit_layers` (the run's
      configured ones; every layer for a checkpoint without a training run).
    batch: decode this many copies of the prompt at once (a throughput figure; with
      sampling the rows differ).
    baseline: also time the full-depth decode of the same prompt.
    **kwargs: measure, kv_policy, batch_exit, temperature, top_k, rng, max_pending, eos_id,
      probe (a probe or a `deepexit-probe` directory, which sets measure "probe")
      (see `generate`).

  Returns:
    A `TextGeneration`.
  """
  ckpt, prompt_BP = _load(checkpoint_dir, prompt, batch)
  model, n = ckpt.model, ckpt.model.config.num_layers
  if isinstance(kwargs.get("probe"), str):  # A probe directory (deepexit-probe's output).
    from deepexit_jax import probes

    kwargs["probe"] = probes.load_probe(kwargs["probe"], model.config)
    kwargs["measure"] = "probe"
  if exit_layers is None:
    exit_layers = ckpt.exit_layers

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
                     kv_policy=kwargs.get("kv_policy", "copy"),
                     probe_flops=getattr(kwargs.get("probe"), "flops_per_token", 0))
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
