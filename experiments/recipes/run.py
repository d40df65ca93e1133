"""Training recipes for early exit on one PPL-vs-FLOPs chart; writes RESULTS.md beside this file.

Trains (or resumes) on the reference model size, data and budget (4 layers, dim 32,
10 epochs of the first 500,000 training characters, seed 0):
  1. static models of depth 1..4 (final-layer loss only): one per exit depth;
  2. every recipe of recipe.py, swept under both KV policies (its exit layers
     with a threshold grid, plus every token exiting at each exit layer);
  3. seeds 1 and 2 of the two best recipes and of the static 2- and 4-layer models;
  4. the training-length study: the best recipe and the static 2- and 4-layer
     models trained for --long_epochs.
Finished runs are resumed (nothing retrained), so the command can be re-run after an
interruption; --report_only writes RESULTS.md from the runs finished so far.

Run from the repository root (about an hour on a 2-core CPU):
  DEEPEXIT_DATA_DIR=../shared/data python experiments/recipes/run.py
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import statistics
import sys
import time

import numpy as np
from absl import app, flags, logging

from deepexit_jax import cli, report, sweep
from deepexit_jax.checkpoint import read_json
from deepexit_jax.config import ExperimentConfig, load_config_file
from deepexit_jax.sweep import SweepRow, pareto_front
from deepexit_jax.train import read_eval_records

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
import common  # noqa: E402
from recipe import RECIPES  # noqa: E402

CONFIGS = os.path.join(HERE, "..", "configs")
THRESHOLDS = np.array([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0],
                      np.float32)
POLICIES = ("oracle", "copy")
TOLERANCE = 0.005  # "+0.5% PPL"
DEPTHS = (1, 2, 3, 4)
SEEDED_STATIC_DEPTHS = (2, 4)
LABELS = {"reference": "reference {2: 0.7, 4: 0.3}", "l": "l (CALM)",
          "layer_dropout": "layer dropout (exp, 0.2)", "confidence": "confidence-aware (EE-LLM)",
          "distill": "self-distillation (FREE)", "rotational": "rotational curriculum",
          "gradual": "gradual curriculum"}

_WORKDIR = flags.DEFINE_string("workdir", "runs/recipes", "Where the runs go.")
_EPOCHS = flags.DEFINE_integer("epochs", 10, "Training budget of every model (epochs).")
_LONG = flags.DEFINE_integer("long_epochs", 20, "Training-length study: epochs of the longer "
                             "runs (0 skips the study).")
_SEEDS = flags.DEFINE_integer("seeds", 3, "Seeds of the two best recipes and static models.")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "Train nothing; report finished runs.")
_RECIPES = flags.DEFINE_list("recipes", None, "Only these recipes (default: all of "
                             "recipe.RECIPES; 'reference' is always needed).")
_MAX_STEPS = flags.DEFINE_integer("max_steps", None, "Smoke test only: stop every run after "
                                  "this many steps (RESULTS.md is then not a result).")


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run: a recipe or a static model, a seed and a budget."""

  name: str  # a RECIPES key or "static<k>"
  seed: int
  epochs: int

  @property
  def static_depth(self) -> int | None:
    return int(self.name[6:]) if self.name.startswith("static") else None

  @property
  def label(self) -> str:
    d = self.static_depth
    return f"static {d}-layer" if d else LABELS.get(self.name, self.name)

  def workdir(self) -> str:
    return os.path.join(_WORKDIR.value, f"{self.name}_s{self.seed}_e{self.epochs}")

  def config(self) -> ExperimentConfig:
    d = self.static_depth
    c = (load_config_file(os.path.join(CONFIGS, "static.py"), str(d)) if d else
         load_config_file(os.path.join(HERE, "recipe.py"), self.name))
    c.train.seed = self.seed
    c.train.epochs = self.epochs
    c.train.max_steps = _MAX_STEPS.value
    return ExperimentConfig.from_dict(c)

  def finished(self) -> bool:
    return common.finished(self.config(), self.workdir())


def _ensure(run: Run, timing: dict[str, float]) -> bool:
  """Trains or resumes `run` unless --report_only; True if it is finished."""
  if _REPORT_ONLY.value or run.finished():
    return run.finished()
  logging.info("training %s (seed %d, %d epochs) into %s", run.label, run.seed, run.epochs,
               run.workdir())
  t0 = time.perf_counter()
  common.ensure_trained(run.config(), run.workdir())
  timing[run.workdir()] = timing.get(run.workdir(), 0.0) + time.perf_counter() - t0
  return True


# Sweeps, cached in each run's workdir.


def _row_from_json(d: dict) -> SweepRow:
  d = dict(d)
  if d["threshold"] == "inf":
    d["threshold"] = math.inf
  d["exit_fractions"] = tuple(d["exit_fractions"])
  return SweepRow(**d)


def _sweep_rows(run: Run) -> list[SweepRow]:
  """Full depth, threshold rows of both policies and the all-exit-at-layer-k rows."""
  path = os.path.join(run.workdir(), "recipe_sweep.json")
  if os.path.exists(path):
    return [_row_from_json(d) for d in read_json(path)]
  exits = tuple(run.config().exit_layers)
  main = sweep.run_sweep(run.workdir(), THRESHOLDS, exit_layers=exits, kv_policies=POLICIES)
  rows = [r for r in main.rows if r.kind in ("full", "threshold")]
  loaded = sweep.load_run(run.workdir())  # The same validation windows as the sweep's.
  ckpt, batches = loaded.checkpoint, loaded.batches
  for k in exits:
    for policy in POLICIES:
      # Softmax confidence is >= 0: threshold 0 exits every token at its one exit layer.
      (r,) = sweep.sweep_thresholds(ckpt.model, batches, np.zeros(1, np.float32),
                                    exit_layers=(k,), kv_policy=policy)
      rows.append(dataclasses.replace(r, kind="fixed", threshold=None,
                                      label=f"all exit at L{k}"))
  with open(path, "w") as f:
    json.dump([_clean(r) for r in rows], f)
  return rows


def _clean(r: SweepRow) -> dict:
  d = dataclasses.asdict(r)
  if d["threshold"] is not None and math.isinf(d["threshold"]):
    d["threshold"] = "inf"
  return d


def _static_rows(statics: list[Run], reference: Run) -> dict[Run, SweepRow]:
  """Each static model costed in the 4-layer model's units (one sweep of the reference)."""
  res = sweep.run_sweep(reference.workdir(), np.zeros(1, np.float32), kv_policies=("oracle",),
                        static_dirs=[s.workdir() for s in statics])
  rows = [r for r in res.rows if r.kind == "static"]
  return dict(zip(statics, rows, strict=True))


# The frontier arithmetic behind every number of RESULTS.md.


def points(rows: list[SweepRow], policy: str) -> list[SweepRow]:
  """Operating points of one KV policy: its threshold and fixed-exit rows, full depth.

  Points costing more than full depth (thresholds so high that nobody exits, paying
  only the checks) are left out: full depth is always available instead.
  """
  return [r for r in rows if r.kind == "full" or (
      r.kv_policy == policy and r.flops_fraction <= 1.0 and (r.kind == "fixed" or (
          r.kind == "threshold" and math.isfinite(r.threshold))))]


def best_ppl_at(front: list[SweepRow], flops: float) -> float:
  """Lowest PPL among points costing at most `flops` (inf if none does).

  0.1% slack: a fixed exit at layer k and the static k-layer model cost the same
  by formula, but the sweep sums per-token FLOPs in float32.
  """
  ok = [r.ppl for r in front if r.flops_fraction <= flops * (1 + 1e-3)]
  return min(ok) if ok else math.inf


def cheapest_within(front: list[SweepRow], ppl_limit: float) -> SweepRow | None:
  """The cheapest point whose PPL is at most `ppl_limit`."""
  ok = [r for r in front if r.ppl <= ppl_limit]
  return min(ok, key=lambda r: r.flops_fraction) if ok else None


def gaps(front: list[SweepRow], statics: dict[int, SweepRow]) -> dict[int, float]:
  """Relative PPL of the front versus the static front, at each static model's FLOPs.

  The static front at a compute level is the best static model costing no more, so a
  deeper static model that is worse than a shallower one does not count as the bar.
  """
  static_front = pareto_front(list(statics.values()))
  return {d: best_ppl_at(front, s.flops_fraction) / best_ppl_at(static_front, s.flops_fraction)
          - 1 for d, s in statics.items()}


def score(g: dict[int, float]) -> float:
  """Ranking: mean gap to the static models of depth 2..4 (all recipes reach them)."""
  return float(np.mean([g[d] for d in DEPTHS[1:]]))


@dataclasses.dataclass
class Analysis:
  """A recipe run's fronts and figures against one set of static models."""

  run: Run
  rows: list[SweepRow]
  fronts: dict[str, list[SweepRow]]
  gaps: dict[str, dict[int, float]]
  saved_vs_static: dict[str, SweepRow | None]
  saved_vs_own: dict[str, SweepRow | None]

  @property
  def full(self) -> SweepRow:
    return next(r for r in self.rows if r.kind == "full")

  def fixed(self, k: int) -> float | None:
    """PPL with every token exiting at layer k (oracle KV), if k is an exit layer."""
    for r in self.rows:
      if r.kv_policy == "oracle" and r.kind == "fixed" and r.label == f"all exit at L{k}":
        return r.ppl
    return None


def analyse(run: Run, statics: dict[int, SweepRow]) -> Analysis:
  rows = _sweep_rows(run)
  fronts = {p: pareto_front(points(rows, p)) for p in POLICIES}
  full_ppl = next(r for r in rows if r.kind == "full").ppl
  return Analysis(
      run=run, rows=rows, fronts=fronts,
      gaps={p: gaps(f, statics) for p, f in fronts.items()},
      saved_vs_static={p: cheapest_within(f, statics[4].ppl * (1 + TOLERANCE))
                       for p, f in fronts.items()},
      saved_vs_own={p: cheapest_within(f, full_ppl * (1 + TOLERANCE))
                    for p, f in fronts.items()})


# Report.


def _pct(x: float, signed: bool = False) -> str:
  if not math.isfinite(x):
    return "n/a"
  return f"{100 * x:+.2f}%" if signed else f"{100 * x:.1f}%"


def _saved(r: SweepRow | None) -> str:
  if r is None:
    return "none"
  return f"{_pct(1 - r.layers_fraction)} / {_pct(1 - r.flops_fraction)}"


def _mean_std(xs: list[float]) -> str:
  if len(xs) < 2:
    return f"{xs[0]:.3f} (1 seed)" if xs else "n/a"
  return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}"


def plot(analyses: list[Analysis], statics: dict[int, SweepRow], ref: list[dict],
         path: str) -> None:
  """One chart, a panel per KV policy: every recipe's front, static models, reference."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(15, 6), sharey=True)
  colors = plt.get_cmap("tab20").colors
  markers = "ov^<>sPXDdph*"
  for ax, policy in zip(axes, POLICIES, strict=True):
    for i, a in enumerate(analyses):
      f = sorted(a.fronts[policy], key=lambda r: r.flops_fraction)
      ax.plot([100 * r.flops_fraction for r in f], [r.ppl for r in f],
              marker=markers[i % len(markers)], color=colors[i % len(colors)], ms=5,
              lw=1.2, label=a.run.label)
    st = [statics[d] for d in sorted(statics)]
    ax.plot([100 * s.flops_fraction for s in st], [s.ppl for s in st], "ks", ms=9,
            label="static depth 1-4 (trained alone)", zorder=5)
    sf = pareto_front(st)  # best static model costing no more: a staircase
    ax.step([100 * s.flops_fraction for s in sf] + [100.0], [s.ppl for s in sf] + [sf[-1].ppl],
            "k--", where="post", lw=2, label="static front", zorder=4)
    for s in st:
      ax.annotate(f"static {s.depth}", (100 * s.flops_fraction, s.ppl), fontsize=7,
                  xytext=(4, 4), textcoords="offset points")
    ax.set_title(f"KV policy {policy}: Pareto front of each recipe")
    ax.set_xlabel("FLOPs / full-depth FLOPs of the 4-layer model (%)")
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("validation PPL (char-level, 50k chars)")
  twin = axes[0].twinx()
  twin.plot([100 * p["compute"] for p in ref], [p["ppl"] for p in ref], "x:", color="gray")
  twin.set_ylabel("reference table PPL (right axis; x = its layers-run compute)", color="gray")
  twin.tick_params(axis="y", colors="gray")
  axes[0].plot([], [], "x:", color="gray", label="reference table (right axis)")
  lo = min(s.ppl for s in statics.values())
  axes[0].set_ylim(lo * 0.97, max(statics[1].ppl, lo) * 1.06)
  axes[1].legend(*axes[0].get_legend_handles_labels(), fontsize=7, loc="upper right")
  fig.suptitle(f"Early-exit recipes vs static depth, same data, budget and seed "
               f"({analyses[0].run.epochs} epochs)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write_csv(analyses: list[Analysis], statics: dict[Run, SweepRow], path: str) -> None:
  fields = ["run", "seed", "epochs", "kind", "label", "kv_policy", "threshold", "ppl",
            "layers_fraction", "flops_fraction", "on_front"]
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=fields)
    w.writeheader()
    for a in analyses:
      on = {(p, id(r)) for p, fr in a.fronts.items() for r in fr}
      for r in a.rows:
        w.writerow({"run": a.run.name, "seed": a.run.seed, "epochs": a.run.epochs,
                    "kind": r.kind, "label": r.label, "kv_policy": r.kv_policy,
                    "threshold": "" if r.threshold is None else r.threshold,
                    "ppl": f"{r.ppl:.4f}", "layers_fraction": f"{r.layers_fraction:.4f}",
                    "flops_fraction": f"{r.flops_fraction:.4f}",
                    "on_front": ";".join(p for p in POLICIES if (p, id(r)) in on)})
    for run, r in statics.items():
      w.writerow({"run": run.name, "seed": run.seed, "epochs": run.epochs, "kind": "static",
                  "label": r.label, "kv_policy": "", "threshold": "", "ppl": f"{r.ppl:.4f}",
                  "layers_fraction": f"{r.layers_fraction:.4f}",
                  "flops_fraction": f"{r.flops_fraction:.4f}", "on_front": ""})


def _recipe_table(analyses: list[Analysis], statics: dict[int, SweepRow]) -> list[str]:
  head = ("| recipe | loss weights · options | full depth PPL | all at L1 / L2 / L3 | "
          "saved at <= +0.5% vs static 4-layer, oracle KV (layers / FLOPs) | same, copy KV | "
          "saved at <= +0.5% vs own full depth, oracle (layers / FLOPs) | front gap vs static "
          "front at 1 / 2 / 3 / 4-layer FLOPs (oracle) | at or below static front everywhere (oracle / copy) |")
  lines = [head, "|" + "---|" * 9]
  for a in sorted(analyses, key=lambda a: score(a.gaps["oracle"])):
    cfg = a.run.config()
    opts = {k: v for k, v in dataclasses.asdict(cfg.recipe).items()
            if v != getattr(type(cfg.recipe)(), k)}
    fixed = " / ".join("—" if a.fixed(k) is None else f"{a.fixed(k):.3f}" for k in (1, 2, 3))
    every = " / ".join("yes" if all(g <= 0 for g in a.gaps[p].values()) else "no"
                       for p in POLICIES)
    lines.append(
        f"| {a.run.label} | `{cfg.loss_weights}`"
        + (" · " + ", ".join(f"{k}={v}" for k, v in opts.items()) if opts else "")
        + f" | {a.full.ppl:.3f} | {fixed} | {_saved(a.saved_vs_static['oracle'])} | "
        f"{_saved(a.saved_vs_static['copy'])} | {_saved(a.saved_vs_own['oracle'])} | "
        + " / ".join(_pct(a.gaps["oracle"][d], True) for d in DEPTHS) + f" | {every} |")
  return lines


def _seed_table(groups: dict[str, list[Analysis]],
                static_seeds: dict[int, dict[int, SweepRow]]) -> list[str]:
  lines = ["| model | seeds | full depth PPL | all at L1 | all at L2 | all at L3 | "
           "front gap vs static 2-layer (oracle, same seed) | full depth − static 4-layer "
           "(same seed) |", "|" + "---|" * 8]
  for name, runs in groups.items():
    full = [a.full.ppl for a in runs]
    fixed = {k: [a.fixed(k) for a in runs if a.fixed(k) is not None] for k in (1, 2, 3)}
    paired_gap = _paired_gaps(runs, static_seeds)
    paired_full = [a.full.ppl - static_seeds[a.run.seed][4].ppl for a in runs
                   if 4 in static_seeds.get(a.run.seed, {})]
    pg = (f"{100 * statistics.mean(paired_gap):+.2f}% ± {100 * statistics.stdev(paired_gap):.2f}%"
          if len(paired_gap) > 1 else "n/a")
    lines.append(f"| {name} | {', '.join(str(a.run.seed) for a in runs)} | {_mean_std(full)} | "
                 + " | ".join(_mean_std(fixed[k]) for k in (1, 2, 3))
                 + f" | {pg} | {_mean_std(paired_full)} |")
  for d in SEEDED_STATIC_DEPTHS:
    ppl = [st[d].ppl for st in static_seeds.values() if d in st]
    seeds = [s for s, st in static_seeds.items() if d in st]
    lines.append(f"| static {d}-layer | {', '.join(map(str, seeds))} | {_mean_std(ppl)} | | | "
                 "| | |")
  return lines


def _paired_gaps(runs: list[Analysis], static_seeds: dict[int, dict[int, SweepRow]]
                 ) -> list[float]:
  """Per seed: the recipe's oracle front at the static 2-layer model's FLOPs vs that model."""
  gaps = []
  for a in runs:
    st = static_seeds.get(a.run.seed, {})
    if 2 in st:
      gaps.append(best_ppl_at(a.fronts["oracle"], st[2].flops_fraction) / st[2].ppl - 1)
  return gaps


def _history_table(runs: list[Run]) -> list[str]:
  lines = ["| model | epochs | " + " | ".join(f"epoch {e}" for e in range(1, 21)
                                               if e <= max(r.epochs for r in runs)) + " |"]
  width = max(r.epochs for r in runs)
  lines.append("|---|---|" + "---|" * width)
  for run in runs:
    if not run.finished():
      continue
    recs = read_eval_records(run.workdir())
    for layer in range(len(recs[0]["layer_ppl"])):
      if run.static_depth is None or layer == len(recs[0]["layer_ppl"]) - 1:
        cells = [f"{r['layer_ppl'][layer]:.2f}" for r in recs] + [""] * (width - len(recs))
        lines.append(f"| {run.label} L{layer + 1} | {run.epochs} | " + " | ".join(cells) + " |")
  return lines


def _findings(analyses, statics, groups, static_seeds) -> list[str]:
  """Measured statements the chart and tables support, computed, not written by hand."""
  out = []
  best_static = min(statics.values(), key=lambda r: r.ppl)
  deeper_worse = [d for d in statics if d > best_static.depth]
  out.append(
      f"- Depth: the best static model is the {best_static.depth}-layer one (PPL "
      f"{best_static.ppl:.3f}); " + (
          "deeper static models are no better at this budget ("
          + ", ".join(f"{d}-layer {statics[d].ppl:.3f}" for d in sorted(deeper_worse))
          + "), so the static front is flat from "
          f"{_pct(best_static.flops_fraction)} FLOPs on: there a recipe can only win by being "
          "a better model than the static one, not by skipping layers." if deeper_worse
          else "every extra layer lowers PPL."))
  for d in DEPTHS:
    beat = [a.run.label for a in analyses if a.gaps["oracle"][d] < 0]
    out.append(f"- At the static {d}-layer model's FLOPs, {len(beat)} of {len(analyses)} "
               "recipes' oracle-KV fronts are below the static front" + (f" ({', '.join(beat)})" if beat
                                                          else "") + ".")
  sds = []
  for runs in groups.values():
    if len(runs) > 1:
      sds.append(statistics.stdev([a.full.ppl for a in runs]))
  for d in SEEDED_STATIC_DEPTHS:
    ppl = [st[d].ppl for st in static_seeds.values() if d in st]
    if len(ppl) > 1:
      sds.append(statistics.stdev(ppl))
  if sds:
    scores = sorted(score(a.gaps["oracle"]) for a in analyses)
    out.append(
        f"- Noise: seed-to-seed standard deviation of a model's PPL is "
        f"{min(sds):.3f}-{max(sds):.3f} (models with >= 2 seeds); the recipes' mean front "
        f"gaps (depths 2-4) span {_pct(scores[0], True)} to {_pct(scores[-1], True)}.")
  return out


def main(argv):
  del argv
  timing_path = os.path.join(_WORKDIR.value, "timing.json")
  os.makedirs(_WORKDIR.value, exist_ok=True)
  timing = read_json(timing_path) if os.path.exists(timing_path) else {}

  def ensure(run: Run) -> bool:
    ok = _ensure(run, timing)
    with open(timing_path, "w") as f:
      json.dump(timing, f, indent=1)
    return ok

  e = _EPOCHS.value
  statics0 = [Run(f"static{d}", 0, e) for d in DEPTHS]
  recipes0 = [Run(name, 0, e) for name in _RECIPES.value or RECIPES]
  done_static = [r for r in statics0 if ensure(r)]
  done_recipes = [r for r in recipes0 if ensure(r)]
  if len(done_static) < len(DEPTHS) or "reference" not in {r.name for r in done_recipes}:
    raise SystemExit("the static models and the reference recipe must finish before a report")
  ref_run = next(r for r in done_recipes if r.name == "reference")
  static_rows = _static_rows(done_static, ref_run)
  statics = {r.static_depth: row for r, row in static_rows.items()}
  analyses = [analyse(r, statics) for r in done_recipes]
  ranked = sorted(analyses, key=lambda a: score(a.gaps["oracle"]))
  best_two = [a.run.name for a in ranked[:2]]
  logging.info("best two recipes by front gap: %s", best_two)

  # Seeds of the best two recipes and of the seeded static depths.
  extra_static = [Run(f"static{d}", s, e) for s in range(1, _SEEDS.value)
                  for d in SEEDED_STATIC_DEPTHS]
  extra_recipes = [Run(n, s, e) for n in best_two for s in range(1, _SEEDS.value)]
  for r in extra_recipes + extra_static:
    ensure(r)
  # Training length.
  long_runs = []
  if _LONG.value:
    long_runs = [Run(best_two[0], 0, _LONG.value)] + [
        Run(f"static{d}", 0, _LONG.value) for d in SEEDED_STATIC_DEPTHS]
    for r in long_runs:
      ensure(r)

  seeded_static = [r for r in extra_static if r.finished()]
  long_static = [r for r in long_runs if r.static_depth and r.finished()]
  more = _static_rows(seeded_static + long_static, ref_run) if (
      seeded_static or long_static) else {}
  all_static = {**static_rows, **more}
  static_seeds: dict[int, dict[int, SweepRow]] = {}
  for run, row in all_static.items():
    if run.epochs == e:
      static_seeds.setdefault(run.seed, {})[run.static_depth] = row
  groups = {LABELS.get(n, n): [a for a in analyses if a.run.name == n] + [
      analyse(r, statics) for r in extra_recipes if r.name == n and r.finished()]
      for n in best_two}

  long_an = None
  if long_runs and all(r.finished() for r in long_runs):
    long_statics = dict(statics)
    for run, row in more.items():
      if run.epochs == _LONG.value:
        long_statics[run.static_depth] = row
    long_an = (analyse(long_runs[0], long_statics), long_statics)

  ref = read_json(os.path.join(HERE, "..", "threshold_sweep", "reference_table.json"))
  plot(analyses, statics, ref, os.path.join(HERE, "recipes.png"))
  write_csv(analyses + [a for g in groups.values() for a in g[1:]] +
            ([long_an[0]] if long_an else []), all_static, os.path.join(HERE, "points.csv"))
  write_results(analyses, statics, groups, static_seeds, long_an, timing,
                [r for r in recipes0 + statics0 if not r.finished()], best_two,
                long_runs)
  print(open(os.path.join(HERE, "RESULTS.md")).read())


def write_results(analyses, statics, groups, static_seeds, long_an, timing, missing,
                  best_two, long_runs) -> None:
  """RESULTS.md: every number in it comes from this run's files."""
  cfg = analyses[0].run.config()
  first = read_eval_records(analyses[0].run.workdir())[0]
  m, d, t = cfg.model, cfg.data, cfg.train
  s4 = statics[4]
  static_front = pareto_front(list(statics.values()))
  st_saved = cheapest_within(static_front, s4.ppl * (1 + TOLERANCE))
  ranked = sorted(analyses, key=lambda a: score(a.gaps["oracle"]))
  goal = {p: [a.run.label for a in analyses
              if all(g <= 0 for g in a.gaps[p].values()) and a.saved_vs_static[p] is not None
              and 1 - a.saved_vs_static[p].flops_fraction >= 0.4] for p in POLICIES}
  hours = sum(timing.values()) / 3600
  lines = [
      "# Training recipes: quality/compute frontier against static depth", "",
      "Regenerate everything here (models, sweeps, tables, chart, CSV) with:", "",
      "```bash", "DEEPEXIT_DATA_DIR=../shared/data python experiments/recipes/run.py",
      "```", "",
      "## Setup", "",
      "The whole recipe shared by every model (shown for the reference-weights run; the "
      "recipes below change only the loss weights, exit layers and recipe options, the "
      "static models the depth and use a final-layer loss):", "",
      *common.recipe_lines(cfg, round(first["step"] / first["epoch"])), "",
      f"- Model: {m.num_layers} layers, dim {m.dim}, {m.num_heads} heads, FFN {m.ffn_dim}; "
      f"{t.epochs} epochs of {d.train_chars:,} training characters (char-level WikiText-2, "
      f"seq {d.seq_len}, batch {d.batch_size}), AdamW lr {t.learning_rate}, warm-up "
      f"{t.warmup_steps}, cosine decay — our reference-size budget (the reference notes state "
      "neither the learning rate nor the epochs; 10 epochs at this lr are this project's "
      "choice), identical for every model; "
      "seed 0 unless stated.",
      "- Recipes (experiments/recipes/recipe.py): LayerSkip loss scales (uniform, l = CALM, "
      "sum_l, sqrt_l, inv_l, inv_sqrt_l, normalised), the reference's explicit weights, and "
      "on uniform weights: rotational curriculum (R=2), gradual curriculum (over the first "
      "half), layer dropout (exponential, p_max 0.2), confidence-aware loss (power 1), "
      "self-distillation (KD weight 0.5, T=1). Options were fixed before any run.",
      "- Each recipe exits at every supervised layer below the last ((1, 2, 3); the "
      f"reference at 2). Softmax-confidence thresholds {', '.join(f'{x:g}' for x in THRESHOLDS)}"
      " under both KV policies, plus every token exiting at each exit layer. A recipe's "
      "front is the Pareto front of those points and its full depth (FLOPs counted as in "
      "BUILD_NOTES.md: exit-head checks included; `copy` also pays skipped layers' K/V).",
      f"- Static models: depth 1-4, final-layer loss only, same data, budget and seed; "
      f"costed in the 4-layer model's FLOPs. Validation: {d.val_chars:,} characters, "
      "each predicted once.",
      f"- \"Saved at <= +0.5%\": the cheapest front point with PPL <= 1.005 x the static "
      f"4-layer model ({s4.ppl:.3f}); shown as layers saved / FLOPs saved. \"Front gap\": "
      "the best front PPL at a static model's FLOPs relative to the static front there (the "
      "best static model costing no more; negative = the recipe is better). Recipes are "
      "ranked by the mean gap at depths 2-4 (oracle).",
      f"- Wall time of the training in this directory's runs: {hours:.2f} h on this 2-core "
      "CPU (shared).", "",
  ]
  if missing:
    lines += ["**Incomplete**: not yet trained: " + ", ".join(
        f"{r.label} (seed {r.seed})" for r in missing) + ".", ""]
  lines += [
      "## PPL vs FLOPs", "",
      "![every recipe's front, the static models and the reference points](recipes.png)", "",
      "All points: `points.csv`.", "",
      "## Static-depth models (same budget)", "",
      "| depth | val PPL | FLOPs % of 4-layer | layers % |", "|---|---|---|---|",
      *[f"| {k} | {s.ppl:.3f} | {_pct(s.flops_fraction)} | {_pct(s.layers_fraction)} |"
        for k, s in sorted(statics.items())], "",
      "Static front within +0.5% of the static 4-layer model: "
      + (f"the {st_saved.depth}-layer model ({_pct(1 - st_saved.flops_fraction)} FLOPs saved)."
         if st_saved else "none."), "",
      "## Recipes (seed 0), best first", "",
      *_recipe_table(analyses, statics), "",
      "## Seed-to-seed spread", "",
      f"The two best recipes ({', '.join(LABELS.get(n, n) for n in best_two)}) and the static "
      "2- and 4-layer models, mean ± standard deviation over seeds. Paired columns compare a "
      "recipe with the static model of the same seed.", "",
      *_seed_table(groups, static_seeds), "",
  ]
  lines += ["## Training length", ""]
  if long_an:
    la, ls = long_an
    lines += [
        f"The best recipe ({la.run.label}) and the static 2- and 4-layer models trained "
        f"for {la.run.epochs} instead of {t.epochs} epochs (same everything else, seed 0):",
        "", "| epochs | static 2-layer | static 4-layer | recipe full depth | recipe all at L1 / "
        "L2 / L3 | saved at <= +0.5% vs static 4-layer (oracle) | front gap vs static "
        "front at 1 / 2 / 3 / 4-layer FLOPs (oracle) |", "|---|---|---|---|---|---|---|"]
    a10 = next(a for a in analyses if a.run.name == la.run.name)
    for a, st in ((a10, statics), (la, ls)):
      fx = " / ".join("—" if a.fixed(k) is None else f"{a.fixed(k):.3f}" for k in (1, 2, 3))
      lines.append(f"| {a.run.epochs} | {st[2].ppl:.3f} | {st[4].ppl:.3f} | {a.full.ppl:.3f} | "
                   f"{fx} | {_saved(a.saved_vs_static['oracle'])} | "
                   + " / ".join(_pct(a.gaps["oracle"][k], True) for k in DEPTHS) + " |")
    lines += ["", f"(The {la.run.epochs}-epoch row's gaps at depths 1 and 3 use the "
              f"{t.epochs}-epoch static models, which were not retrained.)", ""]
  else:
    lines += ["Not yet run (--long_epochs).", ""]
  lines += ["Validation PPL per epoch (per exit for the recipe; static models at their last "
            "layer):", "", *_history_table(
                [Run(best_two[0], 0, t.epochs)] + [Run(f"static{k}", 0, t.epochs)
                                                   for k in SEEDED_STATIC_DEPTHS]
                + [r for r in long_runs if r.finished()]), ""]
  lines += ["## Answer to the goal", ""]
  best = ranked[0]
  lines.append(
      "Goal: a front at or below the static front at every compute level with >= 40% FLOPs "
      "saved at <= +0.5% PPL vs the static 4-layer model. Met at seed 0 by: "
      + "; ".join(f"{', '.join(goal[p]) or 'no recipe'} ({p} KV)" for p in POLICIES) + ". "
      f"Best recipe: {best.run.label}, front gap vs the static front at 1/2/3/4-layer FLOPs "
      + " / ".join(_pct(best.gaps["oracle"][k], True) for k in DEPTHS)
      + " (oracle), " + " / ".join(_pct(best.gaps["copy"][k], True) for k in DEPTHS)
      + " (copy).")
  for name, runs in groups.items():
    gaps = _paired_gaps(runs, static_seeds)
    if len(gaps) > 1:
      mean, std = statistics.mean(gaps), statistics.stdev(gaps)
      verdict = ("below the static 2-layer model on average" if mean + std < 0 else
                 "not distinguishable from it" if mean - std <= 0 else
                 "above it (worse) on average")
      lines.append(
          f"Across seeds {', '.join(str(a.run.seed) for a in runs)}, {name}'s oracle front at "
          f"the static 2-layer model's FLOPs is {100 * mean:+.2f}% ± {100 * std:.2f}% vs the "
          f"static 2-layer model of the same seed: {verdict}, so the seed-0 result "
          + ("holds." if mean + std < 0 else "is not evidence that it beats static depth."))
  lines += ["", *_findings(analyses, statics, groups, static_seeds)]
  report.write_results(HERE, lines)


if __name__ == "__main__":
  cli.quiet_library_logs()
  app.run(main)
