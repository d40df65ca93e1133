"""`deepexit-sweep`: sweeps exit thresholds over a trained checkpoint's validation text.

Usage:
  deepexit-sweep --checkpoint=/tmp/ref --thresholds=0:1:0.1 [--static=/tmp/static2]
  deepexit-sweep --checkpoint=/tmp/ref --calibrate --delta=0.05
  deepexit-sweep --hf_checkpoint=ckpt/layerskip-llama3.2-1B --text_file=pages.txt \
      --exit_layers=4,8 --kv_policy=copy
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from absl import flags

from deepexit_jax import calibration, checkpoint, cli, exits, probes, report, sweep
from deepexit_jax.errors import UserError

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Workdir of a deepexit-train run (or "
                                  "a Hugging Face directory).")
_HF_CHECKPOINT = flags.DEFINE_string("hf_checkpoint", None, "A Hugging Face checkpoint "
                                     "directory (config.json + *.safetensors + "
                                     "tokenizer.json); instead of --checkpoint.")
_THRESHOLDS = flags.DEFINE_string("thresholds", "0:1:0.1",
                                  "start:stop:step (inclusive) or a comma list.")
_OUT = flags.DEFINE_string("out", None, "Output directory (default CHECKPOINT/sweep).")
_EXIT_LAYERS = flags.DEFINE_list("exit_layers", None, "1-based exit layers (default: the "
                                 "run's configured exit_layers; every layer for a Hugging "
                                 "Face checkpoint).")
_MEASURE = flags.DEFINE_enum("measure", "softmax", list(exits.MEASURES[:-1]),
                             "Confidence measure.")
_ROUTING = flags.DEFINE_enum("routing", "token", list(exits.ROUTINGS),
                             "Per-token exits, or one exit layer per sequence.")
_SEQ_QUANTILE = flags.DEFINE_float("seq_quantile", 1.0, "Sequence routing: share of a "
                                   "sequence's tokens that must be confident.")
_DECAY = flags.DEFINE_float("threshold_decay", 0.0, "Position-dependent threshold "
                            "relaxation tau (0 = constant threshold).")
_DECAY_FORM = flags.DEFINE_enum("threshold_decay_form", "exponential",
                                list(exits.DECAY_FORMS), "Form of the decay: ours "
                                "(exponential) or CALM's code (calm).")
_CALIBRATE = flags.DEFINE_bool(
    "calibrate", False, "Also calibrate a threshold with Learn-then-Test on part of the "
    "validation text and report it on the rest (writes calibration.json).")
_DELTA = flags.DEFINE_float("delta", None, "--calibrate: tolerated risk in (0, 1).")
_EPSILON = flags.DEFINE_float("epsilon", 0.1, "--calibrate: error level in (0, 1); "
                              "P(risk <= delta) >= 1 - epsilon.")
_CONSISTENCY = flags.DEFINE_enum(
    "consistency", "textual", list(calibration.CONSISTENCIES), "--calibrate: textual "
    "(top-1 differs from full depth) or risk (NLL increase / ln V, clipped to [0, 1]).")
_FRACTION = flags.DEFINE_float("calibration_fraction", 0.5, "--calibrate: share of "
                               "the validation windows that calibrate.")
_UNIT = flags.DEFINE_enum("calibration_unit", "sequence", list(calibration.UNITS),
                          "--calibrate: calibration examples are windows or tokens.")
_BOUND = flags.DEFINE_enum("bound", "hoeffding_bentkus", list(calibration.BOUNDS),
                           "--calibrate: p-value bound.")
_CAL_POLICY = flags.DEFINE_enum("calibration_kv_policy", "copy", list(exits.KV_POLICIES),
                                "--calibrate: KV policy.")
_CAL_THRESHOLDS = flags.DEFINE_string("calibration_thresholds", None, "--calibrate: "
                                      "candidates (default: --thresholds).")
_CAL_SEED = flags.DEFINE_integer("calibration_seed", 0, "--calibrate: seed of the splits.")
_SPLITS = flags.DEFINE_integer("coverage_splits", 100, "--calibrate: random "
                               "calibration/test splits for the coverage.")
_KV_POLICY = flags.DEFINE_list("kv_policy", ["oracle", "copy"], "KV policies to sweep.")
_STATIC = flags.DEFINE_list("static", [], "Workdirs of static-depth baselines.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Override the run's data.data_dir.")
_TEXT_FILE = flags.DEFINE_string("text_file", None, "UTF-8 text file to evaluate on instead "
                                 "of the run's validation text (required for a Hugging Face "
                                 "checkpoint, which has no training run).")
_SEQ_LEN = flags.DEFINE_integer("seq_len", None, "Evaluation window length (default: the "
                                "run's data.seq_len; without a run min(512, model max_len)).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "Evaluation windows per batch "
                                   "(default: the run's data.batch_size; without a run 8).")
_OVERLAY = flags.DEFINE_string("overlay", None, "JSON of reference points to overlay.")
_PROBE = flags.DEFINE_string("probe", None, "Directory of a saturation probe saved by "
                             "deepexit-probe (e.g. OUT/probes/best); sets the measure "
                             "to 'probe' (its confidence: P(top-1 settled)).")


def _calibration_thresholds(negative: bool) -> np.ndarray | None:
  """--calibrate's candidate thresholds once its flags are checked; None without it."""
  if not _CALIBRATE.value:
    if _DELTA.value is not None:
      raise UserError("--delta only applies with --calibrate: add --calibrate")
    return None
  if _DELTA.value is None:
    raise UserError("--calibrate needs --delta, the tolerated risk, e.g. --delta=0.05")
  calibration.check_levels(_DELTA.value, _EPSILON.value)
  if not 0.0 < _FRACTION.value < 1.0:
    raise UserError(f"--calibration_fraction={_FRACTION.value} must be strictly "
                    "between 0 and 1, e.g. 0.5")
  if _SPLITS.value < 1:
    raise UserError(f"--coverage_splits={_SPLITS.value} must be >= 1, e.g. 100")
  return np.round(sweep.parse_thresholds(
      _CAL_THRESHOLDS.value or _THRESHOLDS.value, negative).astype(np.float64), 6)


def main(argv: Sequence[str]) -> None:
  del argv  # Stray arguments are refused by `cli.run_main`.
  ckpt_dir = cli.checkpoint_dir(_CHECKPOINT.value, _HF_CHECKPOINT.value)
  for p in _KV_POLICY.value:
    if p not in exits.KV_POLICIES:
      raise UserError(f"--kv_policy={p!r}: choose from {', '.join(exits.KV_POLICIES)}")
  try:
    exit_layers = [int(x) for x in _EXIT_LAYERS.value] if _EXIT_LAYERS.value else None
  except ValueError:
    raise UserError(f"--exit_layers={_EXIT_LAYERS.value} must be integers, e.g. 2 or 1,2,3"
                    ) from None
  negative = _MEASURE.value == "entropy"
  thresholds = sweep.parse_thresholds(_THRESHOLDS.value, negative)
  cal_thresholds = _calibration_thresholds(negative)
  cli.log_devices()
  overlay = sweep.load_overlay(_OVERLAY.value) if _OVERLAY.value else ()
  probe, measure = None, _MEASURE.value
  if _PROBE.value:
    probe = probes.load_probe(_PROBE.value, checkpoint.read_model_config(ckpt_dir))
    measure = "probe"
  routing = dict(routing=_ROUTING.value, seq_quantile=_SEQ_QUANTILE.value,
                 threshold_decay=_DECAY.value, threshold_decay_form=_DECAY_FORM.value)
  text = dict(data_dir=_DATA_DIR.value, text_file=_TEXT_FILE.value, seq_len=_SEQ_LEN.value,
              batch_size=_BATCH_SIZE.value)
  result = sweep.run_sweep(ckpt_dir, thresholds, exit_layers=exit_layers,
                           measure=measure, kv_policies=_KV_POLICY.value,
                           static_dirs=_STATIC.value, probe=probe, **routing, **text)
  if _PROBE.value:
    result.metadata["probe"] = os.path.abspath(_PROBE.value)
  calibrated = None
  if cal_thresholds is not None:
    calibrated = calibration.run_calibration(
        ckpt_dir, cal_thresholds, delta=_DELTA.value, epsilon=_EPSILON.value,
        consistency=_CONSISTENCY.value, unit=_UNIT.value, bound=_BOUND.value,
        fraction=_FRACTION.value, seed=_CAL_SEED.value, splits=_SPLITS.value,
        exit_layers=exit_layers, measure=measure, kv_policy=_CAL_POLICY.value,
        probe=probe, **routing, **text)
  out = _OUT.value or os.path.join(ckpt_dir, "sweep")
  paths = report.write_report(result, out, overlay, calibrated)
  print(report.markdown(result, calibrated))
  print("wrote " + ", ".join(paths.values()))


def run() -> None:
  cli.run_main(main)


if __name__ == "__main__":
  run()
