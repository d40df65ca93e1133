"""Speed vs quality: full depth, lossy early exit, self-speculative decoding, static models.

For the reference model (4 layers, dim 32, exit at 2) and the deep model (8 layers, dim
64, exits at 2, 4, 6), each trained (or resumed, or reused) into --workdir, with a static
model of the shallowest exit's depth trained alone at the same budget:
  (a) full-depth greedy `generate`;
  (b) lossy early exit (`generate`, softmax thresholds, `copy` KV, the run's exit
      layers) with its teacher-forced validation PPL (`run_sweep`, `copy` rows: the same
      semantics the decoder runs);
  (c) `speculative_generate` over a grid of draft layers E and draft lengths k (greedy:
      the full model's tokens, so its PPL is full depth's; `identical` is checked);
  (d) the static shallow model's full-depth decode and PPL;
  (e) adaptive drafting (a draft stops when its softmax confidence falls below a
      threshold) at the first exit layer and k = 6.
Batch 1, one validation prompt of 16 characters, 96 new tokens; greedy. Timing is
interleaved: every round times every configuration of a model once, in turn; figures
are medians over rounds, speedups ratios of medians measured in the same run.
Then the best speculative setting at batch 8 (8 prompts spread over the text).

Writes RESULTS.md, results.csv and speed_quality.png beside this file; every figure
comes from this command:
  DEEPEXIT_DATA_DIR=../shared/data python experiments/speculative/run.py
Flags: --workdir (default runs/decoding: the models the decoding benchmark trains),
--rounds (default 9).
"""

from __future__ import annotations

import csv
import json
import os
import platform
import statistics
import sys
import time

import jax
import numpy as np
from absl import app, flags, logging

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # experiments/common.py

from common import ensure_trained, interleaved, wall_seconds  # noqa: E402

from deepexit_jax import checkpoint, decoding, sweep  # noqa: E402
from deepexit_jax.config import ExperimentConfig, load_config_file  # noqa: E402

CONFIGS = os.path.join(HERE, "..", "configs")
_WORKDIR = flags.DEFINE_string("workdir", "runs/decoding", "Where the trained models go.")
_ROUNDS = flags.DEFINE_integer("rounds", 9, "Interleaved timing rounds.")

# model name -> (config file, static config file, static depth, draft layers)
MODELS = {"reference": ("reference", "static", 2, (1, 2, 3)),
          "deep": ("deep", "deep_static", 2, (2, 4, 6))}
DRAFT_LENS = (2, 4, 6)
THRESHOLDS = (0.9, 0.7, 0.5, 0.3)
DRAFT_THRESHOLDS = (0.5, 0.8)  # Adaptive drafting (softmax), at E = first exit, k = 6.
PROMPT_LEN, NEW_TOKENS = 16, 96


def _train(cfg_name: str, workdir: str, *args: str) -> float | None:
  cfg = ExperimentConfig.from_dict(load_config_file(os.path.join(CONFIGS, cfg_name + ".py"),
                                                    *args))
  ensure_trained(cfg, workdir)
  return wall_seconds(workdir)


def bench_model(name: str, workdir: str, rounds: int) -> tuple[list[dict], dict]:
  cfg_name, static_cfg, depth, draft_layers = MODELS[name]
  wd = os.path.join(workdir, name)
  static_wd = os.path.join(workdir, f"{name}_static{depth}")
  walls = {name: _train(cfg_name, wd), f"static_{depth}": _train(static_cfg, static_wd,
                                                                  str(depth))}
  ckpt = checkpoint.load_checkpoint(wd)
  model, n = ckpt.model, ckpt.model.config.num_layers
  exit_layers = tuple(ckpt.experiment["exit_layers"])
  static = checkpoint.load_checkpoint(static_wd).model
  report = sweep.run_sweep(wd, np.array(THRESHOLDS, np.float32), kv_policies=("copy",),
                           static_dirs=(static_wd,))
  ppl = {"full": next(r.ppl for r in report.rows if r.kind == "full"),
         "static": next(r.ppl for r in report.rows if r.kind == "static")}
  for row in report.rows:
    if row.kind == "threshold":
      ppl[round(row.threshold, 6)] = (row.ppl, row.flops_fraction)

  prompt_BP = decoding.validation_prompts(ckpt, 1, PROMPT_LEN)
  m = NEW_TOKENS
  gen = decoding.generate
  runs = {"full": lambda: gen(model, prompt_BP, m, np.inf, exit_layers=(n,)),
          "static": lambda: gen(static, prompt_BP, m, np.inf, exit_layers=(depth,))}
  for thr in THRESHOLDS:
    runs[("exit", thr)] = lambda thr=thr: gen(model, prompt_BP, m, thr,
                                              exit_layers=exit_layers)
  for e in draft_layers:
    for k in DRAFT_LENS:
      runs[("spec", e, k)] = lambda e=e, k=k: decoding.speculative_generate(
          model, prompt_BP, m, draft_layer=e, draft_len=k)
  e_adapt = exit_layers[0]
  for thr in DRAFT_THRESHOLDS:
    runs[("adaptive", thr)] = lambda thr=thr: decoding.speculative_generate(
        model, prompt_BP, m, draft_layer=e_adapt, draft_len=max(DRAFT_LENS),
        draft_threshold=thr)
  logging.info("%s: timing %d configurations, %d rounds", name, len(runs), rounds)
  results, times = interleaved(runs, rounds)
  sec = {key: statistics.median(t) for key, t in times.items()}
  full_tokens = np.asarray(results["full"].tokens)
  base = sec["full"]
  rows = [{"model": name, "method": "full depth", "setting": "", "batch": 1,
           "tokens_per_s": m / base, "speedup": 1.0, "ppl": ppl["full"], "flops_ratio": 1.0,
           "acceptance_rate": "", "tokens_per_cycle": "", "identical": True},
          {"model": name, "method": f"static {depth}-layer model", "setting": "", "batch": 1,
           "tokens_per_s": m / sec["static"], "speedup": base / sec["static"],
           "ppl": ppl["static"], "flops_ratio": "", "acceptance_rate": "",
           "tokens_per_cycle": "", "identical": ""}]
  for thr in THRESHOLDS:
    cost = decoding.decode_cost(model.config, results[("exit", thr)])
    exit_ppl, flops = ppl[round(float(np.float32(thr)), 6)]
    rows.append({"model": name, "method": "early exit (copy)", "setting": f"threshold {thr}",
                 "batch": 1, "tokens_per_s": m / sec[("exit", thr)],
                 "speedup": base / sec[("exit", thr)], "ppl": exit_ppl,
                 "flops_ratio": cost.executed / cost.full_depth, "acceptance_rate": "",
                 "tokens_per_cycle": "",
                 "identical": bool(np.array_equal(np.asarray(results[("exit", thr)].tokens),
                                                  full_tokens))})
  for e in draft_layers:
    for k in DRAFT_LENS:
      res = results[("spec", e, k)]
      rows.append({"model": name, "method": "self-speculative", "setting": f"E={e} k={k}",
                   "batch": 1, "tokens_per_s": m / sec[("spec", e, k)],
                   "speedup": base / sec[("spec", e, k)], "ppl": ppl["full"],
                   "flops_ratio": decoding.speculative_cost(model.config, res).flops_ratio,
                   "acceptance_rate": res.acceptance_rate,
                   "tokens_per_cycle": res.tokens_per_cycle,
                   "identical": bool(np.array_equal(np.asarray(res.tokens), full_tokens))})
  for thr in DRAFT_THRESHOLDS:
    res = results[("adaptive", thr)]
    rows.append({"model": name, "method": "self-speculative, adaptive draft",
                 "setting": f"E={e_adapt} k={max(DRAFT_LENS)} stop below {thr}", "batch": 1,
                 "tokens_per_s": m / sec[("adaptive", thr)],
                 "speedup": base / sec[("adaptive", thr)], "ppl": ppl["full"],
                 "flops_ratio": decoding.speculative_cost(model.config, res).flops_ratio,
                 "acceptance_rate": res.acceptance_rate,
                 "tokens_per_cycle": res.tokens_per_cycle,
                 "identical": bool(np.array_equal(np.asarray(res.tokens), full_tokens))})
  best = max((r for r in rows if r["method"] == "self-speculative"), key=lambda r: r["speedup"])
  e, k = (int(x.split("=")[1]) for x in best["setting"].split())
  prompt8 = decoding.validation_prompts(ckpt, 8, PROMPT_LEN)
  results8, times8 = interleaved({
      "full": lambda: gen(model, prompt8, m, np.inf, exit_layers=(n,)),
      "spec": lambda: decoding.speculative_generate(model, prompt8, m, draft_layer=e,
                                                    draft_len=k)}, rounds)
  sec8 = {key: statistics.median(t) for key, t in times8.items()}
  res8 = results8["spec"]
  rows.append({"model": name, "method": "self-speculative", "setting": f"E={e} k={k}",
               "batch": 8, "tokens_per_s": 8 * m / sec8["spec"],
               "speedup": sec8["full"] / sec8["spec"], "ppl": ppl["full"],
               "flops_ratio": decoding.speculative_cost(model.config, res8).flops_ratio,
               "acceptance_rate": res8.acceptance_rate,
               "tokens_per_cycle": res8.tokens_per_cycle,
               "identical": bool(np.array_equal(np.asarray(res8.tokens),
                                                np.asarray(results8["full"].tokens)))})
  meta = {"num_layers": n, "exit_layers": list(exit_layers), "static_depth": depth,
          "train_wall_seconds": walls, "step": ckpt.step,
          "baseline_tokens_per_s_batch8": 8 * m / sec8["full"]}
  return rows, meta


def _fmt(x, digits=2):
  if isinstance(x, bool) or x == "" or x is None:
    return str(x)
  return f"{x:,.{digits}f}" if isinstance(x, float) else str(x)


def write_report(rows: list[dict], meta: dict) -> None:
  with open(os.path.join(HERE, "results.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
  _chart(rows)
  lines = ["# Self-speculative decoding: speed vs quality", "",
           "Generated by `DEEPEXIT_DATA_DIR=../shared/data python experiments/speculative/run.py`"
           f" ({meta['wall_seconds']:.0f} s wall, training of missing models included; "
           f"{meta['rounds']} interleaved rounds; host load average "
           f"{', '.join(f'{x:.1f}' for x in meta['load_average'])} at the start; "
           f"{meta['backend']}, {meta['cpu_count']} cores, JAX {meta['jax']}). "
           "Data: results.csv; chart: speed_quality.png.", "",
           "Greedy decoding of one 16-character validation prompt, 96 new tokens, batch 1 "
           "(and the best speculative setting at batch 8). Speedup = median wall time of "
           "full-depth `generate` / the method's, timed in the same rounds (compile "
           "excluded). PPL is teacher-forced validation PPL of the method's outputs: full "
           "depth for speculation (it is lossless: `identical` = its tokens equal full "
           "depth's), the `copy`-policy sweep for early exit, the static model's own. "
           "FLOPs ratio = executed / full depth (`decode_cost`, `speculative_cost`: "
           "`exits.FlopCounter` formulas).", "",
           "Models (single training seed each, seed 0; the recipes are "
           "experiments/configs/reference.py, deep.py, static.py, deep_static.py: AdamW "
           "lr 3e-3, 50 warm-up steps, cosine to 0.1x, betas (0.9, 0.98), weight decay "
           "0.01, gradient clip 1, batch 32 x 128 characters of the first 500,000 "
           "characters of WikiText-2 train; reference 10 epochs, deep 3 epochs):", ""]
  for name, mm in meta["models"].items():
    lines.append(f"- {name}: {mm['num_layers']} layers, exits {mm['exit_layers']}, static "
                 f"baseline {mm['static_depth']} layers; training wall seconds "
                 f"{mm['train_wall_seconds']}")
  cols = ["method", "setting", "batch", "tokens_per_s", "speedup", "ppl", "flops_ratio",
          "acceptance_rate", "tokens_per_cycle", "identical"]
  for name in meta["models"]:
    lines += ["", f"## {name}", "", "| " + " | ".join(cols) + " |",
              "|" + "---|" * len(cols)]
    for r in rows:
      if r["model"] == name:
        lines.append("| " + " | ".join(_fmt(r[c], 0 if c == "tokens_per_s" else 3
                                                if c == "ppl" else 2) for c in cols) + " |")
    grid = [r for r in rows if r["model"] == name and r["method"] == "self-speculative"
            and r["batch"] == 1]
    layers = sorted({r["setting"].split()[0] for r in grid})
    lines += ["", f"Acceptance rate (speedup) by draft layer and draft length, {name}:", "",
              "| draft layer | " + " | ".join(f"k={k}" for k in DRAFT_LENS) + " |",
              "|---|" + "---|" * len(DRAFT_LENS)]
    for layer in layers:
      cells = [next(f"{r['acceptance_rate']:.2f} ({r['speedup']:.2f}x)" for r in grid
                    if r["setting"] == f"{layer} k={k}") for k in DRAFT_LENS]
      lines.append(f"| {layer} | " + " | ".join(cells) + " |")
  notes = os.path.join(HERE, "NOTES.md")
  if os.path.exists(notes):
    lines += ["", open(notes).read().strip()]
  with open(os.path.join(HERE, "RESULTS.md"), "w") as f:
    f.write("\n".join(lines) + "\n")


def _chart(rows: list[dict]) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  names = sorted({r["model"] for r in rows}, key=list(MODELS).index)
  fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4.5))
  styles = {"full depth": ("k", "s"), "early exit (copy)": ("tab:blue", "o"),
            "self-speculative": ("tab:red", "^"),
            "self-speculative, adaptive draft": ("tab:orange", "v")}
  for ax, name in zip(np.atleast_1d(axes), names):
    for r in rows:
      if r["model"] != name or r["batch"] != 1:
        continue
      color, marker = styles.get(r["method"], ("tab:green", "D"))
      ax.scatter(r["speedup"], r["ppl"], c=color, marker=marker, label=r["method"])
    handles, labels = ax.get_legend_handles_labels()
    uniq = dict(zip(labels, handles))
    ax.legend(uniq.values(), uniq.keys(), fontsize=8)
    ax.axvline(1.0, color="grey", lw=0.5)
    ax.set(title=f"{name} model, batch 1", xlabel="measured speedup over full depth (x)",
           ylabel="validation PPL (lower is better)")
  fig.tight_layout()
  fig.savefig(os.path.join(HERE, "speed_quality.png"), dpi=110)


def main(argv):
  del argv
  t0 = time.perf_counter()
  load = os.getloadavg()
  rows, models = [], {}
  for name in MODELS:
    model_rows, meta = bench_model(name, _WORKDIR.value, _ROUNDS.value)
    rows += model_rows
    models[name] = meta
  meta = {"models": models, "rounds": _ROUNDS.value, "load_average": load,
          "backend": jax.default_backend(), "cpu_count": os.cpu_count(), "jax": jax.__version__,
          "machine": platform.machine(), "wall_seconds": time.perf_counter() - t0}
  write_report(rows, meta)
  print(open(os.path.join(HERE, "RESULTS.md")).read())
  print(json.dumps({"rows": rows, "meta": meta}))


if __name__ == "__main__":
  app.run(main)
