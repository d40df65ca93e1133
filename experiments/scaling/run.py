"""Scaling study: a dim-256 early-exit model beside the reference-size one, same budget.

Trains (or resumes) six models on the reference data (char-level WikiText-2, first
500,000 training characters, seq 128, batch 32), all for the same number of epochs:
  wide:  experiments/configs/scaling.py (4 layers, dim 256, 4 heads, FFN 1024, exit
         at layer 2, loss weights {2: 0.5, 4: 0.5}) and its static 2- and 4-layer
         versions (final-layer loss only);
  small: experiments/configs/reference.py (4 layers, dim 32) and its static 2- and
         4-layer versions, cut to the same epochs;
then sweeps both early-exit models (oracle and copy KV policies) with their static
baselines on the chart, and writes RESULTS.md, sweep.* beside this file.

Run from the repository root (about 50 minutes on a loaded 2-core CPU):
  DEEPEXIT_DATA_DIR=../shared/data python experiments/scaling/run.py
Flags: --workdir (default runs/scaling), --epochs (default: scaling.py's 2).
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging

from deepexit_jax import cli, report, sweep
from deepexit_jax.checkpoint import load_checkpoint
from deepexit_jax.config import ExperimentConfig, load_config_file
from deepexit_jax.model import count_params
from deepexit_jax.train import read_eval_records

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import common  # noqa: E402

CONFIGS = os.path.join(HERE, "..", "configs")
_WORKDIR = flags.DEFINE_string("workdir", "runs/scaling", "Where the runs go.")
_EPOCHS = flags.DEFINE_integer("epochs", None, "Override train.epochs of every model.")

# name -> (config file, config argument, run directory)
RUNS = {
    "wide early exit": ("scaling", "", "early_exit"),
    "wide static 2-layer": ("scaling", "static=2", "static2"),
    "wide static 4-layer": ("scaling", "static=4", "static4"),
    "small early exit": ("reference", None, "small_early_exit"),
    "small static 2-layer": ("static", "2", "small_static2"),
    "small static 4-layer": ("static", "4", "small_static4"),
}


def _experiment(cfg_name: str, arg: str | None, epochs: int) -> ExperimentConfig:
  c = load_config_file(os.path.join(CONFIGS, cfg_name + ".py"), *([arg] if arg else []))
  c.train.epochs = epochs
  return ExperimentConfig.from_dict(c)


def main(argv):
  del argv
  epochs = _EPOCHS.value or load_config_file(os.path.join(CONFIGS, "scaling.py")).train.epochs
  dirs = {}
  for name, (cfg_name, arg, sub) in RUNS.items():
    dirs[name] = os.path.join(_WORKDIR.value, sub)
    logging.info("training %s into %s", name, dirs[name])
    common.ensure_trained(_experiment(cfg_name, arg, epochs), dirs[name])
  results = {}
  for size in ("wide", "small"):
    results[size] = sweep.run_sweep(
        dirs[f"{size} early exit"], sweep.parse_thresholds("0:1:0.1"),
        kv_policies=("oracle", "copy"),
        static_dirs=[dirs[f"{size} static 2-layer"], dirs[f"{size} static 4-layer"]])
  report.write_report(results["wide"], HERE)
  params = {size: count_params(load_checkpoint(dirs[f'{size} early exit']).model)
            for size in results}
  configs = {size: _experiment(*RUNS[f"{size} early exit"][:2], epochs) for size in results}
  first = read_eval_records(dirs["wide early exit"])[0]
  write_results(results, params, epochs, configs, round(first["step"] / first["epoch"]))
  print(open(os.path.join(HERE, "RESULTS.md")).read())


def _summary(result: sweep.SweepReport) -> dict[str, sweep.SweepRow]:
  by = {r.label: r for r in result.rows if r.kind != "threshold"}
  statics = sorted((r for r in result.rows if r.kind == "static"), key=lambda r: r.flops_fraction)
  thr0 = next(r for r in result.rows if r.kind == "threshold" and r.kv_policy == "oracle"
              and r.threshold == 0.0)
  return {"full": by["full depth"], "thr0": thr0, "static_small": statics[0],
          "static_full": statics[-1]}


def _within(result: sweep.SweepReport, ppl_limit: float) -> sweep.SweepRow | None:
  """Cheapest threshold setting (either KV policy) within `ppl_limit`."""
  ok = [r for r in result.rows if r.kind == "threshold" and r.ppl <= ppl_limit]
  return min(ok, key=lambda r: r.flops_fraction, default=None)


def write_results(results: dict[str, sweep.SweepReport], params: dict[str, int],
                  epochs: int, configs: dict[str, ExperimentConfig],
                  steps_per_epoch: int) -> None:
  """RESULTS.md: every number comes from this run's sweeps."""
  lines = [
      "# Scaling: a dim-256 early-exit model beside the reference-size one", "",
      "Regenerate (models, tables, plot):", "",
      "```bash", "DEEPEXIT_DATA_DIR=../shared/data python experiments/scaling/run.py", "```",
      "",
      f"Both sizes: char-level WikiText-2 ({results['wide'].metadata['data']}), seq 128, "
      f"batch 32, {epochs} epochs, exit at layer 2 of 4, static 2- and 4-layer models of "
      "the same width trained alone (final-layer loss) with the same budget and seed. "
      "PPL is per character on the validation text, FLOPs as a fraction of the "
      "full-depth model's (exit heads and checks included).", "",
      "**Not a clean size comparison**: the two sizes differ in learning rate and loss "
      "weights as well as width (below), and each model is one training seed.", "",
      *[line for size, cfg in configs.items() for line in (
          f"The whole recipe of the {size} early-exit model (its static models: the same "
          "with their depth and a final-layer loss):", "",
          *common.recipe_lines(cfg, steps_per_epoch), "")],
      "| model | params | full depth PPL | every token at layer 2 (PPL, FLOPs) | "
      "static 2-layer (PPL, FLOPs) | static 4-layer PPL | cheapest setting <= static "
      "4-layer PPL + 0.5% |",
      "|---|---|---|---|---|---|---|",
  ]
  for size, result in results.items():
    s = _summary(result)
    exp = result.metadata["experiment"]["model"]
    best = _within(result, 1.005 * s["static_full"].ppl)
    best_text = ("none" if best is None else
                 f"{best.label} {best.kv_policy}: {best.ppl:.3f} at "
                 f"{100 * best.flops_fraction:.1f}% FLOPs")
    lines.append(
        f"| {size} (dim {exp['dim']}, {exp['num_heads']} heads, FFN {exp['ffn_dim']}) | "
        f"{params[size]:,} | {s['full'].ppl:.3f} | {s['thr0'].ppl:.3f}, "
        f"{100 * s['thr0'].flops_fraction:.1f}% | {s['static_small'].ppl:.3f}, "
        f"{100 * s['static_small'].flops_fraction:.1f}% | {s['static_full'].ppl:.3f} | "
        f"{best_text} |")
  lines += ["", "## Wide model: full sweep", "", report.markdown(results["wide"]), "",
            "![PPL vs compute, wide model](sweep.png)", "",
            "## Small model (same budget): full sweep", "", report.markdown(results["small"])]
  report.write_results(HERE, lines)


if __name__ == "__main__":
  cli.quiet_library_logs()
  app.run(main)
