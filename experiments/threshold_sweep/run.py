"""Reproduces the reference threshold sweep and writes RESULTS.md beside this file.

Trains (or resumes) three models on the reference data and budget: the reference
early-exit model (4 layers, dim 32, exit at layer 2, loss weights {2: 0.7, 4: 0.3})
and two static baselines with a final-layer loss only (2 layers = the exit depth,
and 4 layers); then sweeps the early-exit model under both KV policies with the
static models on the same chart, and sets the result beside the reference table.

Run from the repository root (about 10 minutes on a 2-core CPU):
  DEEPEXIT_DATA_DIR=../shared/data python experiments/threshold_sweep/run.py
Flags: --workdir (default runs/threshold_sweep), --epochs (default: the config's 10).
"""

from __future__ import annotations

import os

from absl import app, flags, logging
from ml_collections import ConfigDict

from deepexit_jax import cli, report, sweep
from deepexit_jax.checkpoint import read_json
from deepexit_jax.config import ExperimentConfig, load_config_file
from deepexit_jax.train import read_eval_records, train

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIGS = os.path.join(HERE, "..", "configs")
_WORKDIR = flags.DEFINE_string("workdir", "runs/threshold_sweep", "Where the runs go.")
_EPOCHS = flags.DEFINE_integer("epochs", None, "Override train.epochs of every model.")


def _config(name: str, *args: str) -> ConfigDict:
  c = load_config_file(os.path.join(CONFIGS, name + ".py"), *args)
  if _EPOCHS.value:
    c.train.epochs = _EPOCHS.value
  return c


def _history_table(runs: dict[str, str]) -> list[str]:
  lines = ["| model | epoch | " + " | ".join(f"val PPL L{i}" for i in range(1, 5)) + " |",
           "|---|---|" + "---|" * 4]
  for name, wd in runs.items():
    for rec in read_eval_records(wd):
      cells = [f"{p:.2f}" for p in rec["layer_ppl"]] + [""] * (4 - len(rec["layer_ppl"]))
      lines.append(f"| {name} | {rec['epoch']:.0f} | " + " | ".join(cells) + " |")
  return lines


def _side_by_side(result: sweep.SweepReport, ref: list[dict]) -> list[str]:
  rows = [r for r in result.rows if r.kind == "threshold"]
  lines = ["| Threshold | ref PPL | ref Shallow Exit | ref Compute | ours PPL (oracle) | "
           "ours Shallow Exit | ours Compute (layers) | ours FLOPs | ours PPL (copy) | "
           "ours FLOPs (copy) |", "|" + "---|" * 10]
  for p in ref:
    o, c = (next(r for r in rows if r.kv_policy == policy
                  and abs(r.threshold - p["threshold"]) < 1e-6) for policy in ("oracle", "copy"))
    lines.append(
        f"| {p['threshold']:.1f} | {p['ppl']:.2f} | {100 * p['shallow_exit']:.1f}% | "
        f"{100 * p['compute']:.1f}% | {o.ppl:.2f} | {100 * o.shallow_exit:.1f}% | "
        f"{100 * o.layers_fraction:.1f}% | {100 * o.flops_fraction:.1f}% | {c.ppl:.2f} | "
        f"{100 * c.flops_fraction:.1f}% |")
  return lines


def main(argv):
  del argv
  runs = {"reference": ("reference",), "static 2-layer": ("static", "2"),
          "static 4-layer": ("static", "4")}
  dirs = {}
  for name, (cfg_name, *args) in runs.items():
    wd = os.path.join(_WORKDIR.value, name.replace(" ", "_").replace("-", ""))
    logging.info("training %s into %s", name, wd)
    train(ExperimentConfig.from_dict(_config(cfg_name, *args)), wd, resume=True)
    dirs[name] = wd
  result = sweep.run_sweep(dirs["reference"], sweep.parse_thresholds("0:1:0.1"),
                           kv_policies=("oracle", "copy"),
                           static_dirs=[dirs["static 2-layer"], dirs["static 4-layer"]])
  ref = read_json(os.path.join(HERE, "reference_table.json"))
  overlay = [(p["label"], p["compute"], p["ppl"]) for p in ref]
  report.write_report(result, HERE, overlay)
  write_results(result, ref, dirs)
  print(open(os.path.join(HERE, "RESULTS.md")).read())


def write_results(result: sweep.SweepReport, ref: list[dict], dirs: dict[str, str]) -> None:
  """RESULTS.md: every number in it comes from this run's files."""
  by = {r.label: r for r in result.rows if r.kind != "threshold"}
  full, s2, s4 = by["full depth"], by["static 2-layer"], by["static 4-layer"]
  thr0 = next(r for r in result.rows if r.kind == "threshold" and r.kv_policy == "oracle"
              and r.threshold == 0.0)
  exp = result.metadata["experiment"]
  best = read_eval_records(dirs["reference"])
  first = best[0]
  rec = result.recommendations
  lines = [
      "# Threshold sweep: reproduction of the reference early-exit experiment", "",
      "Regenerate everything here (models, tables, plot) with:", "",
      "```bash", "DEEPEXIT_DATA_DIR=../shared/data python experiments/threshold_sweep/run.py",
      "```", "",
      "## Setup", "",
      f"- Model: {exp['model']['num_layers']} layers, dim {exp['model']['dim']}, "
      f"{exp['model']['num_heads']} heads, FFN {exp['model']['ffn_dim']}, exit at layer "
      f"{exp['exit_layers']}, loss weights `{exp['loss_weights']}`; "
      f"{exp['train']['epochs']} epochs, AdamW lr {exp['train']['learning_rate']}, "
      f"warm-up {exp['train']['warmup_steps']} steps, cosine decay, seed "
      f"{exp['train']['seed']}.",
      f"- Data: {result.metadata['data']}; seq {exp['data']['seq_len']}, batch "
      f"{exp['data']['batch_size']}. PPL is per character over {result.num_tokens:,} "
      "validation targets, each predicted once (non-overlapping windows).",
      "- Static baselines: the same model cut to 2 and 4 layers, final-layer loss only, "
      "same data, epochs and seed.",
      f"- Checkpoint swept: step {result.metadata['step']}, params "
      f"{result.metadata['params_sha256']} (best full-depth validation PPL).", "",
      "## Ours next to the reference", "",
      "Reference columns are from the research notes; `Compute` there is layers run / N.",
      "", *_side_by_side(result, ref), "",
      f"Our full depth: PPL {full.ppl:.2f} (reference 14.07). Static 2-layer: "
      f"{s2.ppl:.2f} at {100 * s2.flops_fraction:.1f}% FLOPs; static 4-layer: {s4.ppl:.2f}. "
      f"Early exit at threshold 0 (every token at layer 2): {thr0.ppl:.2f} at "
      f"{100 * thr0.flops_fraction:.1f}% FLOPs.", "",
      "## Validation PPL during training (per epoch, per layer exit)", "",
      *_history_table(dirs), "",
      f"After epoch 1 the reference model's full-depth PPL is {first['layer_ppl'][-1]:.2f}.",
      "",
      "## Full sweep (both KV policies, baselines, recommendations)", "",
      report.markdown(result), "",
      "![PPL vs compute](sweep.png)", "",
      "## Recommended settings", "",
  ]
  for key, name in (("best_quality_at_lowest_compute", "Best quality at lowest compute"),
                    ("max_efficiency", "Maximum efficiency"), ("full_depth", "Full depth")):
    r = rec.get(key)
    lines.append(f"- {name}: " + ("none" if r is None else
                                  f"{r.label} {r.kv_policy}: PPL {r.ppl:.3f}, "
                                  f"{100 * r.layers_fraction:.1f}% layers, "
                                  f"{100 * r.flops_fraction:.1f}% FLOPs"))
  report.write_results(HERE, lines)


if __name__ == "__main__":
  cli.quiet_library_logs()
  app.run(main)
