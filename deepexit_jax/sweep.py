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
import hashlib
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepexit_jax import checkpoint, data, exits
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
    t_BT = jnp.broadcast_to(jnp.arange(mask_BT.shape[1], dtype=jnp.float32), mask_BT.shape)
    flops_SBT = res.flops_fraction * counter.full_depth(t_BT)
    tot.add(jax.device_get(_masked_sums(res.nll, res.exit_layer, flops_SBT, mask_BT, counter,
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
  flops_BT = layer_BT * counter.block(t_BT) + counter.head
  return layer_BT[None], nll_BT[None], flops_BT[None]


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


def params_digest(model: nnx.Module) -> str:
  """Short SHA-256 of the parameters: identifies the exact checkpoint a sweep used."""
  h = hashlib.sha256()
  for leaf in jax.tree.leaves(checkpoint.pure_params(model)):
    h.update(np.asarray(leaf).tobytes())
  return h.hexdigest()[:16]


@dataclasses.dataclass
class LoadedRun:
  """A trained checkpoint and its validation text, as the sweep evaluates it.

  Attributes:
    checkpoint: the loaded `checkpoint.Checkpoint` (best parameters, tokenizer, config).
    batches: the validation text cut into evaluation windows (`data.eval_batches`).
    data_description: where the text came from.
  """

  checkpoint: checkpoint.Checkpoint
  batches: data.EvalBatches
  data_description: str


def load_run(checkpoint_dir: str, data_dir: str | None = None) -> LoadedRun:
  """Loads a `deepexit-train` workdir and cuts its validation text into windows.

  Args:
    checkpoint_dir: the run's --workdir (its config.json names the data).
    data_dir: overrides the run's data.data_dir (e.g. a local dataset copy).
  """
  ckpt = checkpoint.load_checkpoint(checkpoint_dir)
  if ckpt.experiment is None or ckpt.tokenizer is None:
    raise UserError(f"{checkpoint_dir} lacks config.json/tokenizer.json: sweep the --workdir "
                    "of a deepexit-train run")
  data_cfg = dict(ckpt.experiment["data"])
  if data_dir:
    data_cfg["data_dir"] = data_dir
  dataset = data.prepare_dataset(data.DataConfig.from_dict(data_cfg), tokenizer=ckpt.tokenizer)
  batches = data.eval_batches(dataset.val_tokens, data_cfg["seq_len"], data_cfg["batch_size"])
  return LoadedRun(ckpt, batches, dataset.corpus.description)


def run_sweep(checkpoint_dir: str, thresholds: np.ndarray, *,
              exit_layers: Sequence[int] | None = None, measure: str = "softmax",
              kv_policies: Sequence[str] = ("oracle", "copy"),
              static_dirs: Sequence[str] = (), data_dir: str | None = None,
              probe: Any = None, routing: str = "token", seq_quantile: float = 1.0,
              threshold_decay: float = 0.0,
              threshold_decay_form: str = "exponential") -> SweepReport:
  """Loads a trained checkpoint and sweeps thresholds over its validation text.

  Args:
    checkpoint_dir: a `deepexit-train` workdir (its config.json names the data).
    thresholds: [S] thresholds (`parse_thresholds`).
    exit_layers: 1-based exit layers; None uses the run's configured ones.
    measure: confidence measure.
    kv_policies: KV policies to sweep, each giving its own rows.
    static_dirs: workdirs of static-depth baselines on the same data.
    data_dir: overrides the run's data.data_dir (e.g. a local dataset copy).
    probe: a confidence probe for measure "probe".
    routing, seq_quantile, threshold_decay, threshold_decay_form: token or sequence
      routing and the position-dependent threshold, as in `predict_with_exit`.

  Returns:
    A `SweepReport`.
  """
  run = load_run(checkpoint_dir, data_dir)
  ckpt, model, batches = run.checkpoint, run.checkpoint.model, run.batches
  n = model.config.num_layers
  exit_layers = tuple(exit_layers or ckpt.experiment["exit_layers"])

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


def run() -> None:
  """The `deepexit-sweep` binary; flags are defined here so importing stays flag-free."""
  from absl import flags

  from deepexit_jax import calibration, cli, report

  ckpt_flag = flags.DEFINE_string("checkpoint", None, "Workdir of a deepexit-train run.")
  thr_flag = flags.DEFINE_string("thresholds", "0:1:0.1",
                                 "start:stop:step (inclusive) or a comma list.")
  out_flag = flags.DEFINE_string("out", None, "Output directory (default CHECKPOINT/sweep).")
  exits_flag = flags.DEFINE_list("exit_layers", None, "1-based exit layers (default: the "
                                 "run's configured exit_layers).")
  measure_flag = flags.DEFINE_enum("measure", "softmax", list(exits.MEASURES[:-1]),
                                   "Confidence measure.")
  routing_flag = flags.DEFINE_enum("routing", "token", list(exits.ROUTINGS),
                                   "Per-token exits, or one exit layer per sequence.")
  quantile_flag = flags.DEFINE_float("seq_quantile", 1.0, "Sequence routing: share of a "
                                     "sequence's tokens that must be confident.")
  decay_flag = flags.DEFINE_float("threshold_decay", 0.0, "Position-dependent threshold "
                                  "relaxation tau (0 = constant threshold).")
  decay_form_flag = flags.DEFINE_enum("threshold_decay_form", "exponential",
                                      list(exits.DECAY_FORMS), "Form of the decay: ours "
                                      "(exponential) or CALM's code (calm).")
  calibrate_flag = flags.DEFINE_bool(
      "calibrate", False, "Also calibrate a threshold with Learn-then-Test on part of the "
      "validation text and report it on the rest (writes calibration.json).")
  delta_flag = flags.DEFINE_float("delta", None, "--calibrate: tolerated risk in (0, 1).")
  epsilon_flag = flags.DEFINE_float("epsilon", 0.1, "--calibrate: error level in (0, 1); "
                                    "P(risk <= delta) >= 1 - epsilon.")
  consistency_flag = flags.DEFINE_enum(
      "consistency", "textual", list(calibration.CONSISTENCIES), "--calibrate: textual "
      "(top-1 differs from full depth) or risk (NLL increase / ln V, clipped to [0, 1]).")
  fraction_flag = flags.DEFINE_float("calibration_fraction", 0.5, "--calibrate: share of "
                                     "the validation windows that calibrate.")
  unit_flag = flags.DEFINE_enum("calibration_unit", "sequence", list(calibration.UNITS),
                                "--calibrate: calibration examples are windows or tokens.")
  bound_flag = flags.DEFINE_enum("bound", "hoeffding_bentkus", list(calibration.BOUNDS),
                                 "--calibrate: p-value bound.")
  cal_policy_flag = flags.DEFINE_enum("calibration_kv_policy", "copy",
                                      list(exits.KV_POLICIES), "--calibrate: KV policy.")
  cal_thr_flag = flags.DEFINE_string("calibration_thresholds", None, "--calibrate: "
                                     "candidates (default: --thresholds).")
  seed_flag = flags.DEFINE_integer("calibration_seed", 0, "--calibrate: seed of the splits.")
  splits_flag = flags.DEFINE_integer("coverage_splits", 100, "--calibrate: random "
                                     "calibration/test splits for the coverage.")
  kv_flag = flags.DEFINE_list("kv_policy", ["oracle", "copy"], "KV policies to sweep.")
  static_flag = flags.DEFINE_list("static", [], "Workdirs of static-depth baselines.")
  data_flag = flags.DEFINE_string("data_dir", None, "Override the run's data.data_dir.")
  overlay_flag = flags.DEFINE_string("overlay", None, "JSON of reference points to overlay.")
  probe_flag = flags.DEFINE_string("probe", None, "Directory of a saturation probe saved by "
                                   "deepexit-probe (e.g. OUT/probes/best); sets the measure "
                                   "to 'probe' (its confidence: P(top-1 settled)).")

  def main(argv):
    del argv
    if not ckpt_flag.value:
      raise UserError("--checkpoint is required: the --workdir of a deepexit-train run")
    for p in kv_flag.value:
      if p not in exits.KV_POLICIES:
        raise UserError(f"--kv_policy={p!r}: choose from {', '.join(exits.KV_POLICIES)}")
    try:
      exit_layers = [int(x) for x in exits_flag.value] if exits_flag.value else None
    except ValueError:
      raise UserError(f"--exit_layers={exits_flag.value} must be integers, e.g. 2 or 1,2,3"
                      ) from None
    negative = measure_flag.value == "entropy"
    thresholds = parse_thresholds(thr_flag.value, negative)
    cal_thresholds = None
    if calibrate_flag.value:
      if delta_flag.value is None:
        raise UserError("--calibrate needs --delta, the tolerated risk, e.g. --delta=0.05")
      calibration.check_levels(delta_flag.value, epsilon_flag.value)
      if not 0.0 < fraction_flag.value < 1.0:
        raise UserError(f"--calibration_fraction={fraction_flag.value} must be strictly "
                        "between 0 and 1, e.g. 0.5")
      if splits_flag.value < 1:
        raise UserError(f"--coverage_splits={splits_flag.value} must be >= 1, e.g. 100")
      cal_thresholds = np.round(parse_thresholds(
          cal_thr_flag.value or thr_flag.value, negative).astype(np.float64), 6)
    elif delta_flag.value is not None:
      raise UserError("--delta only applies with --calibrate: add --calibrate")
    cli.log_devices()
    overlay = load_overlay(overlay_flag.value) if overlay_flag.value else ()
    probe, measure = None, measure_flag.value
    if probe_flag.value:
      from deepexit_jax import probes

      probe = probes.load_probe(probe_flag.value,
                                checkpoint.read_model_config(ckpt_flag.value))
      measure = "probe"
    routing = dict(routing=routing_flag.value, seq_quantile=quantile_flag.value,
                   threshold_decay=decay_flag.value,
                   threshold_decay_form=decay_form_flag.value)
    result = run_sweep(ckpt_flag.value, thresholds,
                       exit_layers=exit_layers, measure=measure,
                       kv_policies=kv_flag.value, static_dirs=static_flag.value,
                       data_dir=data_flag.value, probe=probe, **routing)
    if probe_flag.value:
      result.metadata["probe"] = os.path.abspath(probe_flag.value)
    calibrated = None
    if calibrate_flag.value:
      calibrated = calibration.run_calibration(
          ckpt_flag.value, cal_thresholds, delta=delta_flag.value, epsilon=epsilon_flag.value,
          consistency=consistency_flag.value, unit=unit_flag.value, bound=bound_flag.value,
          fraction=fraction_flag.value, seed=seed_flag.value, splits=splits_flag.value,
          exit_layers=exit_layers, measure=measure, kv_policy=cal_policy_flag.value,
          probe=probe, data_dir=data_flag.value, **routing)
    out = out_flag.value or os.path.join(ckpt_flag.value, "sweep")
    paths = report.write_report(result, out, overlay, calibrated)
    print(report.markdown(result, calibrated))
    print("wrote " + ", ".join(paths.values()))

  cli.run_main(main)


if __name__ == "__main__":
  run()
