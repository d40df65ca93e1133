"""Calibrated exit thresholds (issue 16): Learn-then-Test on the reference and deep models.

For each model: trains it if missing (resumable), collects every candidate threshold's
per-window exit results over the validation text ONCE (softmax confidence, KV policy
`copy`, the decoder's), then, for delta in a small grid, calibrates on half of the
windows, reports on the other half and measures coverage over 100 random
calibration/test splits (host arithmetic on the per-window sums), beside the
uncalibrated choice (lowest FLOPs within +0.5% PPL on the whole text, as
`deepexit-sweep` recommends). Writes RESULTS.md beside this file.

Models:
  reference  experiments/configs/reference.py into runs/reference (4 layers, exit at 2)
  deep       experiments/configs/deep.py into runs/decoding/deep (8 layers, exits 2, 4, 6;
             trained by the decoding benchmark, reused if finished)

Run from the repository root (about 10 minutes on a loaded 2-core CPU when both models
exist; training adds ~3 min for the reference model and ~4 for the deep one):
  DEEPEXIT_DATA_DIR=../shared/data python experiments/calibration/run.py
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
from absl import app, flags, logging

from deepexit_jax import calibration, cli, report, sweep
from deepexit_jax.config import ExperimentConfig, load_config_file
from deepexit_jax.train import read_eval_records

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import common  # noqa: E402

CONFIGS = os.path.join(HERE, "..", "configs")
_REFERENCE = flags.DEFINE_string("reference", "runs/reference", "Reference model workdir.")
_DEEP = flags.DEFINE_string("deep", "runs/decoding/deep", "Deep model workdir.")
_EPSILON = flags.DEFINE_float("epsilon", 0.1, "Error level of every calibration.")
_SPLITS = flags.DEFINE_integer("splits", 100, "Random splits for the coverage.")

THRESHOLDS = np.round(np.linspace(0.0, 1.0, 41), 3)  # 0, 0.025, ..., 1
KV_POLICY = "copy"
FRACTION, SEED = 0.5, 0
# (consistency, unit, deltas): textual in share of tokens; risk in units of ln V nats.
GRID = [
    ("textual", "sequence", (0.01, 0.02, 0.05, 0.1)),
    ("textual", "token", (0.01, 0.02, 0.05)),
    ("risk", "sequence", (0.005, 0.01, 0.02)),
    ("risk", "token", (0.002, 0.005, 0.01)),
]


def _config(name: str) -> ExperimentConfig:
  return ExperimentConfig.from_dict(load_config_file(os.path.join(CONFIGS, name + ".py")))


def main(argv):
  del argv
  t_start = time.perf_counter()
  models = {"reference": ("reference", _REFERENCE.value), "deep": ("deep", _DEEP.value)}
  trained, collected, records = {}, {}, {}
  for name, (cfg_name, workdir) in models.items():
    cfg = _config(cfg_name)
    t0 = time.perf_counter()
    was_finished = common.finished(cfg, workdir)
    logging.info("%s: %s", name, "reusing " + workdir if was_finished else "training")
    common.ensure_trained(cfg, workdir)
    trained[name] = (cfg, workdir, was_finished, time.perf_counter() - t0)
    run = sweep.load_run(workdir)
    t0 = time.perf_counter()
    results = calibration.collect_exit_losses(
        run.checkpoint.model, run.batches, THRESHOLDS,
        exit_layers=tuple(run.checkpoint.experiment["exit_layers"]), kv_policy=KV_POLICY)
    collected[name] = (run, results, time.perf_counter() - t0)
    t0 = time.perf_counter()
    records[name] = [
        (cons, unit, calibration.calibration_record(
            results, delta=delta, epsilon=_EPSILON.value, consistency=cons, unit=unit,
            fraction=FRACTION, seed=SEED, splits=_SPLITS.value))
        for cons, unit, deltas in GRID for delta in deltas]
    logging.info("%s: %d calibrations x %d splits in %.1f s", name, len(records[name]),
                 _SPLITS.value, time.perf_counter() - t0)
  write_results(trained, collected, records, time.perf_counter() - t_start)
  print(open(os.path.join(HERE, "RESULTS.md")).read())


def _pct(x: float) -> str:
  return f"{100 * x:.1f}%"


def _thr(x) -> str:
  return "never" if x == "inf" else f"{x:g}"


def write_results(trained, collected, records, wall: float) -> None:
  """RESULTS.md: every number comes from this run."""
  eps = _EPSILON.value
  lines = [
      "# Calibrated exit thresholds (Learn-then-Test)", "",
      "Regenerate (trains missing models, then everything below):", "",
      "```bash", "DEEPEXIT_DATA_DIR=../shared/data python experiments/calibration/run.py",
      "```", "",
      f"This run took {wall / 60:.1f} minutes of wall time on this machine "
      f"({os.cpu_count()} CPU cores, shared).", "",
      "Setting: softmax confidence, KV policy `copy` (what the decoder runs), candidate "
      f"thresholds 0, 0.025, ..., 1 ({THRESHOLDS.size}), Hoeffding-Bentkus p-values, "
      f"fixed-sequence testing from threshold 1 down, epsilon = {eps}. The validation text "
      "is cut into the sweep's windows (128 characters); a seeded permutation puts half of "
      "the windows in the calibration part and the rest in the test part (split 0, "
      f"seed {SEED}, is the one whose test numbers are shown). Coverage = share of "
      f"{_SPLITS.value} such splits (split k: `numpy.random.default_rng([{SEED}, k])`) "
      "whose test-part risk is <= delta; LTT promises >= "
      f"{_pct(1 - eps)} for the expected risk. Per-window results of all candidates are "
      "computed once per model; the splits only resample windows.", "",
      "Risks: **textual** = share of tokens whose top-1 under early exit differs from full "
      "depth; **risk** = mean of min(1, max(0, NLL_early - NLL_full) / ln V) per token "
      "(ln V = the NLL of a uniform guess). Unit **sequence**: each 128-character window "
      "is one calibration example (its mean loss), the assumption the guarantee needs "
      "(windows of a text are close to exchangeable); unit **token**: every character is "
      "an example, which ignores that neighbouring characters are dependent (n is "
      "overstated, the bound too tight).", "",
      "FLOPs saved = 1 - FLOPs fraction on the test part (exit checks and the copied "
      "states' key/value projections counted). **No bound** = the lowest threshold whose "
      "raw calibration risk is <= delta (what choosing on a held-out set without a "
      "p-value gives). **Uncalibrated** = `deepexit-sweep`'s recommendation, the lowest "
      "FLOPs within +0.5% PPL on the whole text (fitted to the text it is scored on).", "",
  ]
  for name, (cfg, workdir, was_finished, train_s) in trained.items():
    run, results, collect_s = collected[name]
    recs = read_eval_records(workdir)
    steps_per_epoch = round(recs[-1]["step"] / recs[-1]["epoch"])
    wall_s = common.wall_seconds(workdir)
    how = (f"trained by this command in {train_s / 60:.1f} min" if not was_finished else
           f"reused (training wall time {wall_s / 60:.1f} min, recorded when trained)"
           if wall_s else "reused (trained earlier by another command; its training wall "
           "time was not recorded)")
    full = results.metrics(None)
    unc = records[name][0][2].fields["uncalibrated"]
    lines += [
        f"## {name} model ({workdir}, step {run.checkpoint.step})", "",
        f"Model {how}. Per-window results of the {THRESHOLDS.size} candidates on "
        f"{results.num_windows} windows ({int(results.tokens.sum()):,} tokens) took "
        f"{collect_s:.0f} s. Full-depth PPL {full['ppl']:.3f}. Exit layers "
        f"{list(results.settings['exit_layers'])} of {results.num_layers}. Uncalibrated "
        f"choice: threshold {_thr(unc['threshold'])}.", "",
        "Recipe:", "", *common.recipe_lines(cfg, steps_per_epoch), "",
        "| risk | unit | delta | calibrated threshold | p | calibration risk | test risk | "
        "test PPL change | FLOPs saved | coverage | no-bound coverage | uncalibrated: test "
        "risk, FLOPs saved, coverage |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for cons, unit, rep in records[name]:
      f = rep.fields
      u = f["uncalibrated"]
      p = "-" if f["p_value"] is None else f"{f['p_value']:.3g}"
      lines.append(
          f"| {cons} | {unit} | {f['delta']:g} | {_thr(f['threshold'])} | {p} | "
          f"{f['calibration_risk']:.4f} | {f['test_risk']:.4f} | "
          f"{100 * f['ppl_change']:+.2f}% | {_pct(1 - f['flops_fraction'])} | "
          f"{_pct(f['coverage'])} | {_pct(f['empirical_rule_coverage']['coverage'])} | "
          f"{u['test_risk']:.4f}, {_pct(1 - u['flops_fraction'])}, {_pct(u['coverage'])} |")
    lines.append("")
  report.write_results(HERE, lines)


if __name__ == "__main__":
  cli.quiet_library_logs()
  app.run(main)
