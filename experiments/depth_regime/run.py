"""The depth regime (issue 13): does early exit beat static depth where depth pays?

Trains (or resumes, or reuses) on experiments/configs/depth.py (8 layers, dim 64,
4 epochs of 1,280,000 characters), for each seed in order: the early-exit model
(exit at layer 4, loss weights {4: 0.5, 8: 0.5}) and the static 4- and 8-layer models;
then the early-exit model with the recipe study's best recipe (self-distillation) for
every seed. Sweeps each early-exit model under both KV policies and writes RESULTS.md,
seeds.csv, points.csv and depth_regime.png beside this file. Every run is resumable;
--report_only trains nothing and reports the runs finished so far.

Run from the repository root (25-35 minutes a seed on the shared 2-core CPU, about
2 hours in all; RESULTS.md records each run's wall time; experiments/queue.sh runs
the same trainings in the background):
  DEEPEXIT_DATA_DIR=../shared/data python experiments/depth_regime/run.py
  DEEPEXIT_DATA_DIR=../shared/data python experiments/depth_regime/run.py --report_only
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import statistics
import sys

import numpy as np
from absl import app, flags

from deepexit_jax import cli, report, sweep
from deepexit_jax.config import ExperimentConfig, load_config_file
from deepexit_jax.sweep import SweepRow, pareto_front
from deepexit_jax.train import read_eval_records

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import common  # noqa: E402

CONFIG = os.path.join(HERE, "..", "configs", "depth.py")
THRESHOLDS = np.array([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0],
                      np.float32)
POLICIES = ("oracle", "copy")
EARLY_EXIT = ("early_exit", "early_exit_kd")
STATIC = ("static4", "static8")
LABELS = {"early_exit": "early exit {4: 0.5, 8: 0.5}",
          "early_exit_kd": "early exit + self-distillation (FREE, kd 0.5)",
          "static4": "static 4-layer", "static8": "static 8-layer"}
LEVELS = (0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0)  # besides the static 4-layer model's

_WORKDIR = flags.DEFINE_string("workdir", None, "Where the runs go (default "
                                "runs/depth_regime, or runs/depth_regime_e<epochs> for "
                                "another --epochs).")
_EPOCHS = flags.DEFINE_integer("epochs", 4, "Training epochs of every run (4: depth.py's "
                               "budget; another value is a longer-budget study with its own "
                               "runs and its report in experiments/depth_regime/epochs<N>/).")
_SEEDS = flags.DEFINE_integer("seeds", 3, "Training seeds of every model.")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "Train nothing; report finished runs.")
_KD = flags.DEFINE_bool("kd", True, "Also train the self-distillation early-exit models.")


@dataclasses.dataclass(frozen=True)
class Run:
  model: str  # a depth.py model name
  seed: int

  @property
  def workdir(self) -> str:
    return os.path.join(workdir(), f"{self.model}_s{self.seed}")

  def config(self) -> ExperimentConfig:
    c = load_config_file(CONFIG, self.model)
    c.train.seed = self.seed
    c.train.epochs = _EPOCHS.value
    return ExperimentConfig.from_dict(c)

  def finished(self) -> bool:
    return common.finished(self.config(), self.workdir)


def workdir() -> str:
  if _WORKDIR.value:
    return _WORKDIR.value
  return "runs/depth_regime" if _EPOCHS.value == 4 else f"runs/depth_regime_e{_EPOCHS.value}"


def out_dir() -> str:
  """Where the report goes: beside this file at depth.py's 4 epochs, else epochs<N>/."""
  out = HERE if _EPOCHS.value == 4 else os.path.join(HERE, f"epochs{_EPOCHS.value}")
  os.makedirs(out, exist_ok=True)
  return out


def _flags_text() -> str:
  return "" if _EPOCHS.value == 4 else f" --epochs={_EPOCHS.value} --nokd"


def planned_runs() -> list[Run]:
  """In order of value: a whole seed (early exit + both statics) at a time, then the recipe."""
  runs = [Run(m, s) for s in range(_SEEDS.value) for m in ("early_exit", *STATIC)]
  if _KD.value:
    runs += [Run("early_exit_kd", s) for s in range(_SEEDS.value)]
  return runs


# Sweeps, cached in each run's workdir (a finished run never changes).


def sweep_rows(run: Run) -> list[SweepRow]:
  """An early-exit run: full depth and every threshold under both KV policies."""
  def compute():
    res = sweep.run_sweep(run.workdir, THRESHOLDS, kv_policies=POLICIES)
    return [r for r in res.rows if r.kind in ("full", "threshold")]
  return common.cached_rows(os.path.join(run.workdir, "depth_sweep.json"), compute)


def static_row(run: Run, costed_by: Run) -> SweepRow:
  """A static run's PPL, costed in the 8-layer early-exit model's FLOPs (any seed's)."""
  def compute():
    res = sweep.run_sweep(costed_by.workdir, np.zeros(1, np.float32), kv_policies=("oracle",),
                          static_dirs=[run.workdir])
    return [r for r in res.rows if r.kind == "static"]
  return common.cached_rows(os.path.join(run.workdir, "static_row.json"), compute)[0]


# Frontier arithmetic.


def front(rows: list[SweepRow], policy: str) -> list[SweepRow]:
  """Pareto front of one KV policy's thresholds and full depth (no point above 100% FLOPs)."""
  return pareto_front([r for r in rows if r.kind == "full" or (
      r.kv_policy == policy and math.isfinite(r.threshold) and r.flops_fraction <= 1.0)])


def best_at(points: list[SweepRow], flops: float) -> float:
  """Lowest PPL among points costing at most `flops` (0.1% slack for float32 sums)."""
  ok = [r.ppl for r in points if r.flops_fraction <= flops * (1 + 1e-3)]
  return min(ok) if ok else math.inf


def all_at_exit(rows: list[SweepRow]) -> SweepRow:
  """Threshold 0: every token leaves at the exit layer (softmax confidence is >= 0)."""
  return next(r for r in rows if r.kind == "threshold" and r.kv_policy == "oracle"
              and r.threshold == 0.0)


@dataclasses.dataclass
class Level:
  """One compute level: each model family's front PPL there, one value per finished seed."""

  flops: float
  static: dict[int, float]  # seed -> PPL
  early: dict[str, dict[str, dict[int, float]]]  # model -> policy -> seed -> PPL


def levels(sweeps: dict[Run, list[SweepRow]], statics: dict[Run, SweepRow]) -> list[Level]:
  s4 = next((r.flops_fraction for run, r in statics.items() if run.model == "static4"), None)
  if s4 is None:
    return []
  seeds = sorted({run.seed for run in statics})
  out = []
  for c in (s4, *LEVELS):
    static = {s: best_at([r for run, r in statics.items() if run.seed == s], c) for s in seeds}
    early = {m: {p: {run.seed: best_at(front(rows, p), c) for run, rows in sorted(
        sweeps.items(), key=lambda kv: kv[0].seed) if run.model == m} for p in POLICIES}
        for m in EARLY_EXIT}
    early = {m: {p: _finite(d) for p, d in pd.items()} for m, pd in early.items()}
    out.append(Level(c, _finite(static), early))
  return out


# Report.


def _pct(x: float) -> str:
  return f"{100 * x:.1f}%"


def _finite(d: dict[int, float]) -> dict[int, float]:
  return {k: v for k, v in d.items() if math.isfinite(v)}


def _cmp_cell(a: dict[int, float], b: dict[int, float]) -> str:
  if not a:
    return "no point at this compute"
  if not b:
    return "no static point"
  gap, se, _ = common.compare("A", a, "B", b)
  if math.isnan(se):
    return f"{gap:+.3f} (1 seed)"
  verdict = ("**below**" if gap < -2 * se else "above" if gap > 2 * se else "no difference")
  return f"{gap:+.3f} ± {se:.3f}: {verdict}"


def plot(lv: list[Level], sweeps, statics, path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(13, 5.5), sharey=True)
  colors = {"early_exit": "tab:blue", "early_exit_kd": "tab:orange"}
  for ax, p in zip(axes, POLICIES, strict=True):
    for run, rows in sweeps.items():
      f = sorted(front(rows, p), key=lambda r: r.flops_fraction)
      ax.plot([100 * r.flops_fraction for r in f], [r.ppl for r in f], "-", lw=0.8,
              alpha=0.35, color=colors[run.model])
    for m in EARLY_EXIT:
      pts = [(100 * v.flops, v.early[m][p]) for v in lv if v.early[m][p]]
      if pts:
        ys = [list(y.values()) for _, y in pts]
        ax.errorbar([x for x, _ in pts], [statistics.mean(y) for y in ys],
                    yerr=[statistics.stdev(y) if len(y) > 1 else 0 for y in ys], fmt="o-",
                    drawstyle="steps-post",
                    capsize=3, color=colors[m], label=f"{LABELS[m]} front (mean ± std)")
    pts = [(100 * v.flops, list(v.static.values())) for v in lv if v.static]
    if pts:
      ax.errorbar([x for x, _ in pts], [statistics.mean(y) for _, y in pts],
                  yerr=[statistics.stdev(y) if len(y) > 1 else 0 for _, y in pts],
                  fmt="ks--", drawstyle="steps-post", capsize=3,
                  label="static front (4- / 8-layer, mean ± std)")
    for m in STATIC:
      xs = [(100 * r.flops_fraction, r.ppl) for run, r in statics.items() if run.model == m]
      ax.plot([x for x, _ in xs], [y for _, y in xs], "k.", alpha=0.4)
    ax.set_title(f"KV policy {p}")
    ax.set_xlabel("FLOPs / full-depth FLOPs of the 8-layer model (%)")
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("validation PPL (char-level, 50k chars)")
  axes[0].legend(fontsize=8)
  fig.suptitle("Depth regime: best PPL at <= each compute level (steps), mean ± std over seeds; "
               "thin lines: single seeds' fronts")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv):
  del argv
  runs = planned_runs()
  done = [r for r in runs if common.ensure_trained(r.config(), r.workdir,
                                                   train_missing=not _REPORT_ONLY.value)]
  missing = [r for r in runs if r not in done]
  ee_done = [r for r in done if r.model in EARLY_EXIT]
  if not ee_done:
    raise SystemExit("no early-exit run has finished yet: nothing to report")
  sweeps = {r: sweep_rows(r) for r in ee_done}
  statics = {r: static_row(r, ee_done[0]) for r in done if r.model in STATIC}
  lv = levels(sweeps, statics)
  write_seeds_csv(sweeps, statics, os.path.join(out_dir(), "seeds.csv"))
  write_points_csv(sweeps, statics, os.path.join(out_dir(), "points.csv"))
  plot(lv, sweeps, statics, os.path.join(out_dir(), "depth_regime.png"))
  write_results(done, missing, sweeps, statics, lv)
  print(open(os.path.join(out_dir(), "RESULTS.md")).read())


def seed_ppl(sweeps, statics) -> dict[str, list[tuple[int, float]]]:
  """model name (as in seeds.csv) -> [(seed, PPL)]."""
  out: dict[str, list[tuple[int, float]]] = {}
  for run, rows in sorted(sweeps.items(), key=lambda kv: (kv[0].model, kv[0].seed)):
    full = next(r for r in rows if r.kind == "full")
    out.setdefault(f"{run.model}_full", []).append((run.seed, full.ppl))
    out.setdefault(f"{run.model}_all_at_4", []).append((run.seed, all_at_exit(rows).ppl))
  for run, r in sorted(statics.items(), key=lambda kv: (kv[0].model, kv[0].seed)):
    out.setdefault(f"static_{run.model[6:]}", []).append((run.seed, r.ppl))
  return out


def write_seeds_csv(sweeps, statics, path: str) -> None:
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["model", "seed", "ppl"])
    for model, vals in seed_ppl(sweeps, statics).items():
      for seed, ppl in vals:
        w.writerow([model, seed, f"{ppl:.4f}"])


def write_points_csv(sweeps, statics, path: str) -> None:
  fields = ["model", "seed", "kind", "kv_policy", "threshold", "ppl", "shallow_exit",
            "layers_fraction", "flops_fraction"]
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=fields)
    w.writeheader()
    items = [(run, r) for run, rows in sweeps.items() for r in rows] + list(statics.items())
    for run, r in sorted(items, key=lambda x: (x[0].model, x[0].seed)):
      w.writerow({"model": run.model, "seed": run.seed, "kind": r.kind,
                  "kv_policy": r.kv_policy,
                  "threshold": "" if r.threshold is None else r.threshold,
                  "ppl": f"{r.ppl:.4f}", "shallow_exit": f"{r.shallow_exit:.4f}",
                  "layers_fraction": f"{r.layers_fraction:.4f}",
                  "flops_fraction": f"{r.flops_fraction:.4f}"})


def write_results(done, missing, sweeps, statics, lv) -> None:
  """RESULTS.md: every number in it comes from the finished runs' files."""
  ee_cfg = Run("early_exit", 0).config()
  first = read_eval_records(done[0].workdir)[0]
  steps_per_epoch = round(first["step"] / first["epoch"])
  ppl = {m: dict(vals) for m, vals in seed_ppl(sweeps, statics).items()}
  walls = {}
  for r in done:
    w = common.wall_seconds(r.workdir)
    if w is not None:
      walls.setdefault(r.model, []).append(w / 60)
  lines = [
      "# Depth regime: early exit vs static depth where depth pays"
      + ("" if _EPOCHS.value == 4 else f" ({_EPOCHS.value} epochs: the longer budget)"), "",
      "Regenerate (trains what is missing, resumable; then sweeps, tables, chart, CSVs):", "",
      "```bash",
      "DEEPEXIT_DATA_DIR=../shared/data python experiments/depth_regime/run.py"
      + _flags_text(),
      "# report from the runs finished so far, training nothing:",
      "DEEPEXIT_DATA_DIR=../shared/data python experiments/depth_regime/run.py --report_only"
      + _flags_text(),
      "```", "",
      "The same trainings run in the background, one at a time at low priority, with "
      "`nohup bash experiments/queue.sh > runs/queue.log 2>&1 &` (it also trains the "
      "seeded reference-size runs of experiments/threshold_sweep).", "",
      "## Setup", "",
      "- **Training text is the WikiText-2 *test* split**: its first 1,280,000 characters "
      "(`wiki.test.raw`), because the full train split is not available offline "
      "(`wiki.train.raw.prefix` holds only ~659 KB). Validation stays the first 50,000 "
      "characters of `wiki.valid.raw`. PPL is per character; every validation character "
      "is predicted once. Numbers here are not comparable with WikiText-2 results that "
      "train on the train split and test on the test split.",
      *common.recipe_lines(ee_cfg, steps_per_epoch),
      "- Static baselines `static_4` and `static_8`: the same model with 4 and 8 layers, "
      "final-layer loss only, same data, budget, recipe and seeds. The self-distillation "
      "variant adds the recipe study's best recipe (experiments/recipes/RESULTS.md: FREE "
      "self-distillation, kd_weight 0.5, temperature 1) to the same loss weights {4: 0.5, "
      "8: 0.5}, so it differs from the base early-exit model in that one option.",
      f"- Sweeps: softmax-confidence thresholds {', '.join(f'{x:g}' for x in THRESHOLDS)} "
      "at layer 4, under both KV policies (`oracle`: deeper layers see exited tokens' "
      "full-depth states; `copy`: an exited token's layer-4 state is copied upward and "
      "its skipped layers' K/V are paid for). FLOPs count the exit-head check "
      "(BUILD_NOTES.md). A front is the Pareto front of the thresholds and full depth; "
      "threshold 0 sends every token out at layer 4 (`early_exit_all_at_4`).",
      "- Statistics: mean ± standard deviation over seeds (the seed drives "
      "initialisation, data order and dropout). A model is said to beat another only "
      "where the mean gap exceeds twice its standard error, SE = sqrt(var_a/n_a + "
      "var_b/n_b), as if the seeds of different models were independent (conservative: "
      "one seed gives every model the same data order; the seed-paired gap is shown "
      "beside it); two settings of the same early-exit models are paired by seed (SE = "
      "std of the per-seed differences / sqrt(n)). Otherwise: \"no difference detected "
      "at this budget\".", "",
  ]
  if missing:
    lines += ["**Incomplete**: not yet trained: " + ", ".join(
        f"{LABELS[r.model]} seed {r.seed}" for r in missing) + ". Every figure below is over "
        "the seeds finished so far.", ""]
  lines += ["## Runs", "",
            "| model | seeds finished | training wall time per run (min, 2-core CPU "
            "shared with other jobs) |", "|---|---|---|"]
  for m in (*EARLY_EXIT, *STATIC):
    seeds = [r.seed for r in done if r.model == m]
    if seeds:
      w = walls.get(m, [])
      lines.append(f"| {LABELS[m]} | {', '.join(map(str, seeds))} | "
                   + (", ".join(f"{x:.1f}" for x in w) if w else "not recorded") + " |")
  lines += ["", "## Validation PPL over seeds", "",
            "| model | seeds | val PPL (mean ± std) | FLOPs % of 8-layer (oracle KV) |",
            "|---|---|---|---|"]
  flops = {}
  for run, rows in sweeps.items():
    flops[f"{run.model}_full"] = 1.0
    flops[f"{run.model}_all_at_4"] = all_at_exit(rows).flops_fraction
  for run, r in statics.items():
    flops[f"static_{run.model[6:]}"] = r.flops_fraction
  for m, vals in ppl.items():
    lines.append(f"| `{m}` | {len(vals)} | {common.mean_std(list(vals.values()))} | "
                 f"{_pct(flops[m])} |")
  lines += ["", "Every seed's value: `seeds.csv`; every sweep point of every seed: "
            "`points.csv`.", "", "Pairwise, by the 2-SE rule:", ""]
  pairs = [("static_8", "static_4"), ("early_exit_full", "static_8"),
           ("early_exit_all_at_4", "static_4"), ("early_exit_kd_full", "static_8"),
           ("early_exit_kd_all_at_4", "static_4"), ("early_exit_kd_full", "early_exit_full"),
           ("early_exit_kd_all_at_4", "early_exit_all_at_4"),
           ("early_exit_all_at_4", "early_exit_full")]
  for a, b in pairs:
    if ppl.get(a) and ppl.get(b):
      same = a.startswith("early_exit") and b.startswith("early_exit") and (
          a.startswith("early_exit_kd") == b.startswith("early_exit_kd"))
      lines.append("- " + common.compare(f"`{a}`", ppl[a], f"`{b}`", ppl[b],
                                         same_model=same)[2] + ".")
  if not any(ppl.get(a) and ppl.get(b) for a, b in pairs):
    lines.append("- (no pair of models has finished yet)")
  present = [m for m in EARLY_EXIT if any(r.model == m for r in sweeps)]
  lines += ["", "## Where the early-exit front sits against the static front", "",
            "At each compute level: the best early-exit front PPL costing no more, minus the "
            "best static model costing no more (static front: the 4-layer model until the "
            "8-layer one becomes affordable), mean gap ± SE over seeds; **below** = the "
            "early-exit front is lower by more than 2 SE.", "",
            "| FLOPs % | static front PPL | " + " | ".join(
                f"{LABELS[m]} {p}: front PPL | gap vs static" for m in present
                for p in POLICIES) + " |", "|---|---|" + "---|---|" * 2 * len(present)]
  if not lv:
    lines.append("| (no static model finished yet) |")
  for v in lv:
    cells = []
    for m in present:
      for p in POLICIES:
        e = v.early[m][p]
        cells += [common.mean_std(list(e.values())) if e else "—", _cmp_cell(e, v.static)]
    lines.append(f"| {_pct(v.flops)} | {common.mean_std(list(v.static.values()))} | "
                 + " | ".join(cells)
                 + " |")
  lines += ["", "![fronts with error bars](depth_regime.png)", "", "## Answer", ""]
  lines += answer(lv) or ["Needs finished static models."]
  lines += ["", "## Validation PPL per epoch (seed 0; is the budget converged?)", "",
            "| model | layer | " + " | ".join(f"epoch {e}" for e in range(1, _EPOCHS.value + 1))
            + " |", "|---|---|" + "---|" * _EPOCHS.value]
  for r in done:
    if r.seed != 0:
      continue
    recs = read_eval_records(r.workdir)
    n = len(recs[0]["layer_ppl"])
    for layer in sorted({*r.config().exit_layers, n}):
      lines.append(f"| {LABELS[r.model]} | L{layer} | "
                   + " | ".join(f"{x['layer_ppl'][layer - 1]:.3f}" for x in recs) + " |")
  seed0 = next((r for r in sweeps if r.model == "early_exit" and r.seed == 0), None)
  if seed0:
    lines += ["", "## Sweep of `early_exit` seed 0 (single seed)", "",
              "| threshold | policy | PPL | shallow exit | layers % | FLOPs % |",
              "|---|---|---|---|---|---|"]
    for r in sweeps[seed0]:
      thr = "full depth" if r.kind == "full" else f"{r.threshold:g}"
      lines.append(f"| {thr} | {r.kv_policy or '—'} | {r.ppl:.3f} | {_pct(r.shallow_exit)} | "
                   f"{_pct(r.layers_fraction)} | {_pct(r.flops_fraction)} |")
  report.write_results(out_dir(), lines)


def answer(lv: list[Level]) -> list[str]:
  """The question of the issue, answered from the level table."""
  out = []
  for m in EARLY_EXIT:
    for p in POLICIES:
      below, tied, above, single = [], [], [], []
      for v in lv:
        e = v.early[m][p]
        if not e or not v.static:
          continue
        gap, se, _ = common.compare("a", e, "b", v.static)
        if math.isnan(se):
          single.append(f"{_pct(v.flops)} ({gap:+.3f})")
        elif gap < -2 * se:
          below.append(f"{_pct(v.flops)} ({gap:+.3f} ± {se:.3f} PPL, "
                       f"{100 * gap / statistics.mean(v.static.values()):+.2f}%, "
                       f"{abs(gap) / se:.1f} SE)")
        elif gap > 2 * se:
          above.append(f"{_pct(v.flops)} ({gap:+.3f} ± {se:.3f}, {abs(gap) / se:.1f} SE)")
        else:
          tied.append(_pct(v.flops))
      if single:
        out.append(f"- {LABELS[m]}, `{p}` KV: one seed so far, no claim; single-seed gaps "
                   "(early exit − static front, PPL): " + ", ".join(single) + ".")
      if not (below or tied or above):
        continue
      out.append(f"- {LABELS[m]}, `{p}` KV: below the static front at "
                 + (", ".join(below) or "no compute level")
                 + "; no difference detected at " + (", ".join(tied) or "none")
                 + "; above (worse) at " + (", ".join(above) or "none") + ".")
  return out


if __name__ == "__main__":
  cli.quiet_library_logs()
  app.run(main)
