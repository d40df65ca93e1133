"""Threshold sweeps: PPL, exit fractions and compute of early exit over a validation text.

A sweep evaluates the whole validation text once per KV policy. Under `oracle`
one forward pass per batch serves every threshold (`predict_with_exit` with a
vector of thresholds); under `copy` the exit decisions feed deeper layers, so
each threshold runs its own layer scan (still one jitted call per batch).

Compute is reported two ways:
  layers %  mean over tokens of layers run / N (the reference "Compute" column);
  FLOPs %   total FLOPs used / total full-depth FLOPs over all tokens (a ratio of
            sums, so long-context tokens weigh what they cost), counting exit-head
            checks, and for `copy` the key/value projections of skipped layers
            (formulas in `exits`).
Rows besides the thresholds: full depth, the oracle bound (a perfect predictor
that exits each token at the earliest exit layer whose top-1 equals the last
layer's, with free predictions: only blocks and one head are counted), and
static-depth baselines (separately trained shallower models).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepexit_jax import checkpoint, data, exits
from deepexit_jax.checkpoint import params_digest
from deepexit_jax.errors import UserError
from deepexit_jax.losses import token_nll
from deepexit_jax.model import DeepSupervisionTransformer

# A recommended setting may cost at most this relative PPL increase over full depth.
PPL_TOLERANCE = 0.005


@dataclasses.dataclass(frozen=True)
class SweepRow:
  """One point of the quality/compute trade-off.

  Attributes:
    kind: "threshold", "full" (full depth), "oracle" (perfect-predictor bound)
      or "static" (a separately trained model of smaller depth).
    label: human-readable name of the point.
    kv_policy: "oracle" or "copy" for threshold rows, "" otherwise.
    threshold: the confidence threshold (None for non-threshold rows).
    ppl: per-token perplexity over the validation text.
    shallow_exit: fraction of tokens that exit before the last layer.
    exit_fractions: fraction of tokens exiting at each exit layer.
    layers_fraction: mean layers run / N of the early-exit model.
    flops_fraction: total FLOPs / total full-depth FLOPs of the early-exit model.
    ppl_change: relative PPL change versus full depth (0.01 = +1%).
    depth: layers of the model (static rows) or None.
  """

  kind: str
  label: str
  kv_policy: str
  threshold: float | None
  ppl: float
  shallow_exit: float
  exit_fractions: tuple[float, ...]
  layers_fraction: float
  flops_fraction: float
  ppl_change: float = 0.0
  depth: int | None = None


@dataclasses.dataclass
class SweepReport:
  """A finished sweep: its rows and where they came from."""

  rows: list[SweepRow]
  exit_layers: tuple[int, ...]
  measure: str
  num_layers: int
  num_tokens: int
  recommendations: dict[str, SweepRow]
  metadata: dict[str, Any]


def parse_thresholds(spec: str, allow_negative: bool = False) -> np.ndarray:
  """Parses "start:stop:step" (inclusive of stop) or "a,b,c" into float32 thresholds.

  Args:
    spec: the text.
    allow_negative: accept negative thresholds (the entropy measure's are <= 0).

  Raises:
    UserError: malformed text, a NaN or (unless allowed) negative threshold, or a
      non-positive step.
  """
  try:
    if ":" in spec:
      start, stop, step = (float(x) for x in spec.split(":"))
      if not step > 0:
        raise UserError(f"--thresholds={spec!r}: the step must be > 0")
      count = int(math.floor((stop - start) / step + 1e-6)) + 1
      values = np.round(start + step * np.arange(max(count, 0)), 10)
    else:
      values = np.array([float(x) for x in spec.split(",") if x.strip()])
  except ValueError:
    raise UserError(f"--thresholds={spec!r} is neither 'start:stop:step' nor 'a,b,c' "
                    "(e.g. 0:1:0.1)") from None
  if values.size == 0:
    raise UserError(f"--thresholds={spec!r} gives no thresholds")
  if np.isnan(values).any() or (not allow_negative and (values < 0).any()):
    raise UserError(f"--thresholds={spec!r} contains a NaN or negative threshold: "
                    "confidence thresholds are >= 0 (use inf for 'never exit'; negative "
                    "ones only with --measure=entropy)")
  return values.astype(np.float32)


@dataclasses.dataclass
class _Totals:
  """Masked sums accumulated over evaluation batches, one entry per threshold."""

  nll: np.ndarray
  count: float
  layers: np.ndarray
  flops: np.ndarray
  full_flops: float
  exits: np.ndarray  # [S, E]

  def add(self, sums: dict[str, Any]) -> None:
    """Adds one batch's `_masked_sums`."""
    self.nll += sums["nll"]
    self.layers += sums["layers"]
    self.flops += sums["flops"]
    self.exits += sums["exits"]
    self.full_flops += float(sums["full"])
    self.count += float(sums["count"])

  def rows(self, kind: str, labels: Sequence[str], kv_policy: str,
           thresholds: Sequence[float | None], num_layers: int) -> list[SweepRow]:
    out = []
    for s, label in enumerate(labels):
      exit_fr = self.exits[s] / self.count
      out.append(SweepRow(
          kind=kind, label=label, kv_policy=kv_policy, threshold=thresholds[s],
          ppl=float(np.exp(self.nll[s] / self.count)),
          shallow_exit=float(exit_fr.sum()), exit_fractions=tuple(float(x) for x in exit_fr),
          layers_fraction=float(self.layers[s] / self.count / num_layers),
          flops_fraction=float(self.flops[s] / self.full_flops)))
    return out


@functools.partial(jax.jit, static_argnames=("counter", "checked"))
def _masked_sums(nll_SBT: jax.Array, exit_layer_SBT: jax.Array, flops_SBT: jax.Array,
                 mask_BT: jax.Array, counter: exits.FlopCounter,
                 checked: tuple[int, ...]) -> dict[str, jax.Array]:
  """One batch's contribution to `_Totals` (per-token FLOPs, not fractions), one dispatch."""
  t_BT = jnp.broadcast_to(jnp.arange(mask_BT.shape[1], dtype=jnp.float32), mask_BT.shape)
  full_BT = counter.full_depth(t_BT)
  onehot_SBTE = exit_layer_SBT[..., None] == jnp.asarray(checked, jnp.int32)
  return {
      "nll": jnp.sum(nll_SBT * mask_BT, (1, 2)),
      "layers": jnp.sum(exit_layer_SBT * mask_BT, (1, 2)),
      "flops": jnp.sum(flops_SBT * mask_BT, (1, 2)),
      "exits": jnp.sum(onehot_SBTE * mask_BT[..., None], (1, 2)),
      "full": jnp.sum(full_BT * mask_BT), "count": jnp.sum(mask_BT)}


def sweep_thresholds(model: DeepSupervisionTransformer, batches: data.EvalBatches,
                     thresholds: np.ndarray, *, exit_layers: Sequence[int],
                     measure: str = "softmax", kv_policy: str = "oracle",
                     probe: Any = None, **routing: Any) -> list[SweepRow]:
  """Early-exit PPL and compute at every threshold over all evaluation batches.

  Args:
    model: the early-exit model.
    batches: the validation text (`data.eval_batches`), each target once.
    thresholds: [S] thresholds; `np.inf` gives the full-depth row.
    exit_layers: 1-based exit layers.
    measure: confidence measure (see `exits`).
    kv_policy: "oracle" or "copy".
    probe: a confidence probe for measure "probe".
    **routing: `routing`, `seq_quantile`, `threshold_decay` of `predict_with_exit`.

  Returns:
    One "threshold" row per threshold (PPL change not yet filled in).
  """
  counter = exits.FlopCounter.from_config(model.config)
  thr_S = jnp.asarray(thresholds, jnp.float32)
  checked = tuple(k for k in exit_layers if k < model.config.num_layers)
  s, e = len(thresholds), len(checked)
  tot = _Totals(np.zeros(s), 0.0, np.zeros(s), np.zeros(s), 0.0, np.zeros((s, e)))
  for b in range(batches.num_batches):
    mask_BT = jnp.asarray(batches.mask[b])
    res = exits.predict_with_exit(
        model, batches.inputs[b], thr_S, exit_layers=exit_layers, measure=measure,
        kv_policy=kv_policy, probe=probe, targets=batches.targets[b], return_logits=False,
        **routing)
    tot.add(jax.device_get(_masked_sums(res.nll, res.exit_layer, res.flops, mask_BT, counter,
                                        checked)))
  labels = [f"{t:g}" for t in thresholds]
  return tot.rows("threshold", labels, kv_policy, [float(t) for t in thresholds],
                  model.config.num_layers)


@nnx.jit(static_argnames=("exit_layers",))
def _oracle_bound_batch(model, inputs_BT, targets_BT, exit_layers):
  """Exit layer, NLL and FLOPs [1, B, T] of the perfect predictor (blocks + one head)."""
  logits_NBTV = model(inputs_BT).per_layer
  layer_BT = exits.oracle_exit_layer(logits_NBTV, exit_layers)
  nll_NBT = jax.vmap(lambda lg: token_nll(lg, targets_BT))(logits_NBTV)
  nll_BT = jnp.take_along_axis(nll_NBT, (layer_BT - 1)[None], 0)[0]
  counter = exits.FlopCounter.from_config(model.config)
  t_BT = jnp.broadcast_to(jnp.arange(layer_BT.shape[1], dtype=jnp.float32), layer_BT.shape)
  return layer_BT[None], nll_BT[None], counter.exit_at(t_BT, layer_BT)[None]


def oracle_bound(model: DeepSupervisionTransformer, batches: data.EvalBatches,
                 exit_layers: Sequence[int]) -> SweepRow:
  """The perfect-predictor row: exit at the earliest layer agreeing with the last."""
  n = model.config.num_layers
  counter = exits.FlopCounter.from_config(model.config)
  checked = tuple(k for k in exit_layers if k < n)
  tot = _Totals(np.zeros(1), 0.0, np.zeros(1), np.zeros(1), 0.0, np.zeros((1, len(checked))))
  for b in range(batches.num_batches):
    layer_1BT, nll_1BT, flops_1BT = _oracle_bound_batch(
        model, batches.inputs[b], batches.targets[b], tuple(exit_layers))
    tot.add(jax.device_get(_masked_sums(nll_1BT, layer_1BT, flops_1BT,
                                        jnp.asarray(batches.mask[b]), counter, checked)))
  return tot.rows("oracle", ["oracle bound"], "", [None], n)[0]


def static_baseline(static: DeepSupervisionTransformer, batches: data.EvalBatches,
                    reference: DeepSupervisionTransformer) -> SweepRow:
  """A separately trained model evaluated at its full depth, costed against `reference`.

  Its compute is expressed in the early-exit model's units: layers / N_reference
  and FLOPs / full-depth FLOPs of the reference, so both sit on one axis.
  """
  cfg, ref = static.config, reference.config
  if cfg.vocab_size != ref.vocab_size:
    raise UserError(f"static baseline has vocabulary {cfg.vocab_size}, the early-exit model "
                    f"{ref.vocab_size}: train both on the same data and tokenizer")
  n = cfg.num_layers
  own, ref_counter = exits.FlopCounter.from_config(cfg), exits.FlopCounter.from_config(ref)
  rows = sweep_thresholds(static, batches, np.array([np.inf], np.float32), exit_layers=(n,))
  t = np.arange(batches.inputs.shape[-1], dtype=np.float64)
  mask_T = np.asarray(batches.mask).sum(axis=(0, 1))  # tokens at each position
  flops = float(np.sum(mask_T * own.full_depth(t)) / np.sum(mask_T * ref_counter.full_depth(t)))
  return dataclasses.replace(
      rows[0], kind="static", label=f"static {n}-layer", kv_policy="", threshold=None,
      exit_fractions=(), layers_fraction=n / ref.num_layers, flops_fraction=flops, depth=n)


def with_ppl_change(rows: list[SweepRow], full_ppl: float) -> list[SweepRow]:
  return [dataclasses.replace(r, ppl_change=r.ppl / full_ppl - 1.0) for r in rows]


def recommend(rows: Sequence[SweepRow], tolerance: float = PPL_TOLERANCE) -> dict[str, SweepRow]:
  """The reference's recommended settings among the threshold rows (per FLOPs).

  Returns:
    "best_quality_at_lowest_compute": lowest FLOPs with PPL change <= tolerance;
    "max_efficiency": lowest FLOPs overall; "full_depth": the full-depth row.
  """
  thr = [r for r in rows if r.kind == "threshold" and math.isfinite(r.threshold)]
  out = {}
  within = [r for r in thr if r.ppl_change <= tolerance]
  if within:
    out["best_quality_at_lowest_compute"] = min(within, key=lambda r: r.flops_fraction)
  if thr:
    out["max_efficiency"] = min(thr, key=lambda r: r.flops_fraction)
  full = [r for r in rows if r.kind == "full"]
  if full:
    out["full_depth"] = full[0]
  return out


def pareto_front(rows: Sequence[SweepRow], key: str = "flops_fraction") -> list[SweepRow]:
  """Rows not dominated in (compute, PPL): nothing is both cheaper and better."""
  pts = sorted(rows, key=lambda r: (getattr(r, key), r.ppl))
  front, best = [], math.inf
  for r in pts:
    if r.ppl < best:
      front.append(r)
      best = r.ppl
  return front


@dataclasses.dataclass
class LoadedRun:
  """A checkpoint and its evaluation text, as the sweep evaluates it.

  Attributes:
    checkpoint: the loaded `checkpoint.Checkpoint` (best parameters, tokenizer, config).
    batches: the evaluation text cut into windows (`data.eval_batches`).
    data_description: where the text came from.
  """

  checkpoint: checkpoint.Checkpoint
  batches: data.EvalBatches
  data_description: str


def load_run(checkpoint_dir: str, data_dir: str | None = None, *,
             text_file: str | None = None, seq_len: int | None = None,
             batch_size: int | None = None) -> LoadedRun:
  """Loads a checkpoint and cuts its evaluation text into windows (`data.evaluation_text`).

  Args:
    checkpoint_dir: a `deepexit-train` workdir (its config.json names the data) or a
      Hugging Face directory (then `text_file` is required).
    data_dir: overrides the run's data.data_dir (e.g. a local dataset copy).
    text_file, seq_len, batch_size: see `data.evaluation_text` (default: the run's first
      data.val_chars validation characters, in its seq_len x batch_size windows).
  """
  ckpt = checkpoint.load_checkpoint(checkpoint_dir)
  text = data.evaluation_text(ckpt, text_file=text_file, seq_len=seq_len,
                              batch_size=batch_size, data_dir=data_dir)
  return LoadedRun(ckpt, text.batches, text.description)


def run_sweep(checkpoint_dir: str, thresholds: np.ndarray, *,
              exit_layers: Sequence[int] | None = None, measure: str = "softmax",
              kv_policies: Sequence[str] = ("oracle", "copy"),
              static_dirs: Sequence[str] = (), data_dir: str | None = None,
              probe: Any = None, routing: str = "token", seq_quantile: float = 1.0,
              threshold_decay: float = 0.0,
              threshold_decay_form: str = "exponential", text_file: str | None = None,
              seq_len: int | None = None, batch_size: int | None = None) -> SweepReport:
  """Loads a trained checkpoint and sweeps thresholds over its validation text.

  Args:
    checkpoint_dir: a `deepexit-train` workdir (its config.json names the data) or a
      Hugging Face directory (with `text_file`).
    thresholds: [S] thresholds (`parse_thresholds`).
    exit_layers: 1-based exit layers; None: `checkpoint.Checkpoint.exit_layers` (the
      run's configured ones; every layer for a model without a training run).
    measure: confidence measure.
    kv_policies: KV policies to sweep, each giving its own rows.
    static_dirs: workdirs of static-depth baselines on the same data.
    data_dir: overrides the run's data.data_dir (e.g. a local dataset copy).
    probe: a confidence probe for measure "probe".
    routing, seq_quantile, threshold_decay, threshold_decay_form: token or sequence
      routing and the position-dependent threshold, as in `predict_with_exit`.
    text_file, seq_len, batch_size: the evaluation text (`data.evaluation_text`).

  Returns:
    A `SweepReport`.
  """
  run = load_run(checkpoint_dir, data_dir, text_file=text_file, seq_len=seq_len,
                 batch_size=batch_size)
  ckpt, model, batches = run.checkpoint, run.checkpoint.model, run.batches
  n = model.config.num_layers
  exit_layers = tuple(exit_layers or ckpt.exit_layers)

  # Full depth checks no exit, so it pays for no exit head but the last.
  full = sweep_thresholds(model, batches, np.array([np.inf], np.float32),
                          exit_layers=(n,), kv_policy="oracle")[0]
  full = dataclasses.replace(full, kind="full", label="full depth", kv_policy="",
                             threshold=None)
  rows = [full]
  for policy in kv_policies:
    rows += sweep_thresholds(model, batches, thresholds, exit_layers=exit_layers,
                             measure=measure, kv_policy=policy, probe=probe,
                             routing=routing, seq_quantile=seq_quantile,
                             threshold_decay=threshold_decay,
                             threshold_decay_form=threshold_decay_form)
  rows.append(oracle_bound(model, batches, exit_layers))
  for d in static_dirs:
    static = checkpoint.load_checkpoint(d)
    if static.tokenizer is not None and static.tokenizer.to_json() != ckpt.tokenizer.to_json():
      raise UserError(f"static baseline {d} was trained with another tokenizer than "
                      f"{checkpoint_dir}: train it on the same data config")
    rows.append(static_baseline(static.model, batches, model))
  rows = with_ppl_change(rows, full.ppl)
  metadata = {
      "checkpoint": checkpoint_dir, "checkpoint_abspath": ckpt.path, "step": ckpt.step, "params_sha256": params_digest(model),
      "model": model.config.to_dict(), "experiment": ckpt.experiment,
      "data": run.data_description, "static_checkpoints": list(static_dirs),
      "thresholds": [float(t) for t in thresholds], "kv_policies": list(kv_policies),
      "tolerance": PPL_TOLERANCE, "routing": routing, "seq_quantile": seq_quantile,
      "threshold_decay": threshold_decay, "threshold_decay_form": threshold_decay_form,
  }
  return SweepReport(rows=rows, exit_layers=exit_layers, measure=measure, num_layers=n,
                     num_tokens=batches.num_targets, recommendations=recommend(rows),
                     metadata=metadata)


def load_overlay(path: str) -> list[tuple[str, float, float]]:
  """Reads overlay points [{"label", "compute" (layers fraction), "ppl"}] from JSON."""
  if not os.path.exists(path):
    raise UserError(f"--overlay file {path} not found: give a JSON list of "
                    '{"label", "compute", "ppl"} points')
  return [(str(p["label"]), float(p["compute"]), float(p["ppl"]))
          for p in checkpoint.read_json(path)]
