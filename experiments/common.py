"""Shared by the experiment drivers: train-or-reuse a run, seed statistics, the whole recipe.

Imported by path (`sys.path.insert(0, experiments/)`), like `recipes/recipe.py`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import time

from deepexit_jax.checkpoint import read_json
from deepexit_jax.config import ExperimentConfig
from deepexit_jax.sweep import SweepRow
from deepexit_jax.train import read_eval_records, train

WALL_FILE = "wall_seconds"  # one line per training session; experiments/queue.sh writes it too


def interleaved(runs: dict, rounds: int) -> tuple[dict, dict]:
  """Times every `runs[key]()` once per round, in turn, so a drifting host slows all of
  them alike; each is first called once to compile and once to warm up.

  Returns:
    ({key: the compiling call's result}, {key: [seconds per round]}).
  """
  import jax

  results = {key: jax.block_until_ready(fn()) for key, fn in runs.items()}
  for fn in runs.values():
    jax.block_until_ready(fn())
  times = {key: [] for key in runs}
  for _ in range(rounds):
    for key, fn in runs.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times[key].append(time.perf_counter() - start)
  return results, times


def finished(config: ExperimentConfig, workdir: str) -> bool:
  """Whether `workdir` holds a run of `config` that reached its last step."""
  try:
    recs = read_eval_records(workdir)
  except OSError:
    return False
  if not recs:
    return False
  steps_per_epoch = round(recs[-1]["step"] / recs[-1]["epoch"])
  return recs[-1]["step"] == (config.train.max_steps or config.train.epochs * steps_per_epoch)


def ensure_trained(config: ExperimentConfig, workdir: str, *, train_missing: bool = True
                   ) -> bool:
  """Trains `config` into `workdir`, resumes it there, or reuses it if finished.

  Args:
    config: the run.
    workdir: its directory; an interrupted run continues from its last checkpoint
      (`train(resume=True)`, which refuses a workdir holding another config).
    train_missing: False only reports (the drivers' --report_only).

  Returns:
    True if the run is finished (now or before).
  """
  if finished(config, workdir) or not train_missing:
    return finished(config, workdir)
  t0 = time.perf_counter()
  train(config, workdir, resume=True)
  with open(os.path.join(workdir, WALL_FILE), "a") as f:
    f.write(f"{time.perf_counter() - t0:.0f}\n")
  return True


def wall_seconds(workdir: str) -> float | None:
  """Training wall time of a run, summed over its sessions (None if unrecorded)."""
  path = os.path.join(workdir, WALL_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return sum(float(x) for x in f.read().split())


def mean_std(xs: list[float], digits: int = 3) -> str:
  """"mean ± std (n seeds)"; one value is shown as such."""
  if not xs:
    return "n/a"
  if len(xs) == 1:
    return f"{xs[0]:.{digits}f} (1 seed)"
  return f"{statistics.mean(xs):.{digits}f} ± {statistics.stdev(xs):.{digits}f} ({len(xs)} seeds)"


def compare(name_a: str, a: dict[int, float], name_b: str, b: dict[int, float], *,
            same_model: bool = False) -> tuple[float, float, str]:
  """Mean difference a - b of two seed -> PPL samples, its standard error, and the verdict.

  Between two models the verdict uses SE = sqrt(var_a / n_a + var_b / n_b), as if
  their seeds were independent samples (conservative: a shared seed also shares the
  data order, which moves every model's PPL the same way); the seed-paired SE over
  the seeds both have is reported beside it. Two settings of the same trained
  models (`same_model`, e.g. full depth and every token at the exit) are paired by
  seed: SE = std(a_s - b_s) / sqrt(n). A claim that one beats the other is made only
  where |gap| > 2 SE.

  Returns:
    (gap, se, sentence); se is nan with fewer than 2 seeds on either side.
  """
  restricted = ""
  if set(a) != set(b):  # An unmatched seed (e.g. one still training) would bias the gap.
    keep = set(a) & set(b)
    a, b = {s: a[s] for s in keep}, {s: b[s] for s in keep}
    restricted = f" over the seeds both have ({', '.join(map(str, sorted(keep))) or 'none'})"
  if not a:
    return math.nan, math.nan, f"{name_a} vs {name_b}: no seed in common yet"
  gap = statistics.mean(a.values()) - statistics.mean(b.values())
  if len(a) < 2 or len(b) < 2:
    return gap, math.nan, (f"{name_a} − {name_b} = {gap:+.3f}{restricted} from a single "
                           "seed: no claim (fewer than 2 seeds)")
  common_seeds = sorted(set(a) & set(b))
  paired_se = (statistics.stdev([a[s] - b[s] for s in common_seeds]) / math.sqrt(
      len(common_seeds)) if len(common_seeds) > 1 else math.nan)
  paired_gap = (statistics.mean([a[s] - b[s] for s in common_seeds]) if common_seeds
                else math.nan)
  if same_model:
    gap, se, how, extra = paired_gap, paired_se, ", paired by seed", ""
  else:
    se = math.sqrt(statistics.variance(a.values()) / len(a)
                   + statistics.variance(b.values()) / len(b))
    how = ""
    extra = ("" if math.isnan(paired_se) else
             f"; paired by seed (shared data order): {paired_gap:+.3f} ± {paired_se:.3f}"
             + (", beyond 2 SE paired: a hint from "
                f"{len(common_seeds)} seeds, not claimed here"
                if abs(paired_gap) > 2 * paired_se and abs(gap) <= 2 * se else ""))
  text = f"{name_a} − {name_b} = {gap:+.3f} ± {se:.3f} SE{how}{restricted}"
  if abs(gap) > 2 * se:
    better, worse = (name_a, name_b) if gap < 0 else (name_b, name_a)
    return gap, se, f"{better} beats {worse} ({text}{extra})"
  return gap, se, (f"no difference detected at this budget between {name_a} and {name_b} "
                   f"({text}, within 2 SE{extra})")


def recipe_lines(cfg: ExperimentConfig, steps_per_epoch: int | None) -> list[str]:
  """The whole training recipe of `cfg` as Markdown bullets, read from the config."""
  m, d, t, r = cfg.model, cfg.data, cfg.train, cfg.recipe
  steps = (f"{t.epochs} epochs x {steps_per_epoch} steps = {t.epochs * steps_per_epoch} steps"
           if steps_per_epoch else f"{t.epochs} epochs")
  options = {k: v for k, v in dataclasses.asdict(r).items() if v != getattr(type(r)(), k)}
  return [
      f"- Model: {m.num_layers} layers, dim {m.dim}, {m.num_heads} heads, FFN {m.ffn_dim}, "
      f"context {m.max_len}, pre-LayerNorm blocks with a GELU MLP, one shared exit head "
      f"(final LayerNorm + unembedding) after every layer, dropout {m.dropout}, "
      f"tie_embeddings={m.tie_embeddings}, {m.dtype}; loss weights `{cfg.loss_weights}`, "
      f"exit layers {list(cfg.exit_layers)}"
      + (f"; recipe options {options}" if options else "") + ".",
      "- Initialisation: token and position embeddings, QKV, FFN-in and unembedding matrices "
      "normal(0.02); attention-out and FFN-out matrices normal(0.02 / sqrt(2 N)); biases 0, "
      "LayerNorm scale 1.",
      f"- Optimiser: AdamW, peak lr {t.learning_rate}, b1 {t.b1}, b2 {t.b2}, weight decay "
      f"{t.weight_decay} on weight matrices only (not biases, LayerNorm or embeddings), "
      f"global-norm clip {t.grad_clip}; linear warm-up from 0 over {t.warmup_steps} steps, "
      f"cosine decay to {t.min_lr_ratio} x peak at the last step.",
      f"- Data: {d.dataset} train split `{d.train_split}` ("
      + (f"first {d.train_chars:,} characters" if d.train_chars else "every character")
      + "), "
      f"validation `{d.val_split}` (first {d.val_chars:,}); {d.tokenizer} tokenizer fitted on "
      f"the training text; seq {d.seq_len}, batch {d.batch_size}. Each epoch is a seeded "
      "permutation of non-overlapping windows at a seeded offset; the seed also drives "
      "initialisation and dropout.",
      f"- Budget: {steps}; evaluation once per epoch on every validation character exactly "
      "once; the checkpoint kept is the one with the best validation PPL of the deepest "
      "supervised layer.",
  ]


def _row_from_json(d: dict) -> SweepRow:
  d = dict(d)
  if d["threshold"] == "inf":
    d["threshold"] = math.inf
  d["exit_fractions"] = tuple(d["exit_fractions"])
  return SweepRow(**d)


def _row_to_json(r: SweepRow) -> dict:
  d = dataclasses.asdict(r)
  if d["threshold"] is not None and math.isinf(d["threshold"]):
    d["threshold"] = "inf"
  return d


def cached_rows(path: str, compute) -> list[SweepRow]:
  """Sweep rows stored at `path` (JSON), computed by `compute()` the first time.

  A finished run never changes, so its sweep is computed once.
  """
  if not os.path.exists(path):
    rows = compute()
    with open(path + ".tmp", "w") as f:
      json.dump([_row_to_json(r) for r in rows], f)
    os.replace(path + ".tmp", path)
  return [_row_from_json(d) for d in read_json(path)]
