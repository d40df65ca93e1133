"""Real early-exit decoding benchmark: tokens/s of full-depth vs early-exit decoding.

Trains (or resumes) the reference model (4 layers, dim 32, exit at 2) and a deeper one
(experiments/configs/deep.py: 8 layers, dim 64, exits at 2, 4, 6), then decodes
validation-text prompts with `deepexit_jax.decoding.generate` at several softmax
thresholds, at batch 1 and batch 8, under both KV policies, and writes RESULTS.md and
speedup.png beside this file. Every figure comes from this run.

Timing is interleaved: within a group (model, batch, policy, batch rule) every round
times the full-depth baseline and each threshold once, in turn, so a noisy shared host
slows all of them alike; each entry reports the min and median over rounds and the
speedup is the ratio of medians measured in the same group. Every configuration is
timed at two lengths (the full decode and one step), so each row gives both the
end-to-end call speedup and the speedup of one decode step, (long - short) / (steps -
1), which leaves out what a call costs besides its steps (argument checks, graph split,
dispatch, full-depth prompt prefill: the same for both decoders). Process CPU time is
recorded beside wall-clock time: on a shared host it is the steadier of the two. The full-depth baseline is
the same decoder with no exit layer (same cache, loop and sampling, no conds).

Beside each model, a static model of its first exit's depth (2 layers, trained alone with
a final-layer loss at the same budget: experiments/configs/static.py, deep_static.py) is
decoded at full depth in the batch-1 and batch-8 `copy`/`sync` groups: what a shallow
model of that speed gives.

Quality: every row's teacher-forced validation PPL (`sweep.run_sweep` over the whole
validation text: `copy` rows are the `copy` emulation, `recompute` rows the `oracle` one,
which the incremental decoder reproduces exactly, tests/test_decoding.py), for every
training seed of the model and its static baseline (--seeds, default 3); seed 0's models
are the ones timed. The reference-size seeds are the threshold_sweep experiment's runs
(same configs: --reference_seed_workdir), so they are trained once.

Run from the repository root (about 10 minutes on a 2-core CPU for the timing, plus
the trainings that are missing: ~2-5 minutes each):
  DEEPEXIT_DATA_DIR=../shared/data python experiments/decoding/run.py
  DEEPEXIT_DATA_DIR=../shared/data python experiments/decoding/run.py --report_only
Flags: --workdir (default runs/decoding), --rounds (default 15), --seeds (default 3),
--quick (fewer groups; a smoke run), --report_only (time and train nothing: rebuild
RESULTS.md, results.csv and results.json from the committed results.json's timing and
the seeds finished so far).
Writes RESULTS.md, results.csv, results.json and speedup.png beside this file; prints
the table and, as its last line, JSON of every row.
"""

from __future__ import annotations

import dataclasses
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

import common  # noqa: E402

from deepexit_jax import checkpoint, data, decoding, sweep  # noqa: E402
from deepexit_jax.config import ExperimentConfig, load_config_file  # noqa: E402
from deepexit_jax.model import DeepSupervisionTransformer, ModelConfig  # noqa: E402

CONFIGS = os.path.join(HERE, "..", "configs")
_WORKDIR = flags.DEFINE_string("workdir", "runs/decoding", "Where the trained models go.")
_REF_SEEDS = flags.DEFINE_string(
    "reference_seed_workdir", "runs/threshold_sweep",
    "Where the reference model's and its static baseline's seeds >= 1 are (the "
    "threshold_sweep experiment's early_exit_s<seed>, static2_s<seed>: same configs).")
_ROUNDS = flags.DEFINE_integer("rounds", 15, "Interleaved timing rounds per group (15: the "
                                "committed RESULTS.md).")
_SEEDS = flags.DEFINE_integer("seeds", 3, "Training seeds of every model (PPL columns); seed "
                              "0's models are timed.")
_QUICK = flags.DEFINE_bool("quick", False, "Batch 1, copy only, 3 rounds: a smoke run.")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "Time and train nothing: rebuild the "
                                 "report from results.json and the seeds finished so far.")

# model name -> (config, static baseline config, static depth)
MODELS = {"reference": ("reference", "static", 2), "deep": ("deep", "deep_static", 2)}
THRESHOLDS = (0.9, 0.7, 0.5, 0.3, 0.0)
PROMPT_LEN = 16
BATCHES = (1, 8)


def truncated(model: DeepSupervisionTransformer, depth: int) -> DeepSupervisionTransformer:
  """The model's first `depth` layers and its head, as a model of its own."""
  from flax import nnx

  from deepexit_jax.model import create_model

  small = create_model(dataclasses.replace(model.config, num_layers=depth))
  state = nnx.state(model)
  small_state = nnx.state(small)
  flat = dict(nnx.to_flat_state(state))
  for path, var in nnx.to_flat_state(small_state):
    value = flat[path][...]
    var[...] = value[:depth] if path[0] == "blocks" else value
  nnx.update(small, small_state)
  return small


def _prompts(ckpt: checkpoint.Checkpoint, batch: int) -> np.ndarray:
  """`batch` prompts of PROMPT_LEN validation characters, spread over the text."""
  cfg = data.DataConfig.from_dict(ckpt.experiment["data"])
  val = data.prepare_dataset(cfg, tokenizer=ckpt.tokenizer).val_tokens
  starts = np.linspace(0, len(val) - PROMPT_LEN - 1, batch).astype(int)
  return np.stack([val[s:s + PROMPT_LEN] for s in starts]).astype(np.int32)


def _time(fn) -> tuple[float, float]:
  """(wall-clock, process CPU) seconds of one call."""
  start, cpu = time.perf_counter(), time.process_time()
  jax.block_until_ready(fn())
  return time.perf_counter() - start, time.process_time() - cpu


def _timed_rounds(runs: dict, steps: int, rounds: int) -> tuple[dict, dict]:
  """Interleaved timing of `runs[key](num_steps)` for num_steps in (steps, 1).

  Returns ({key: result of the long call}, {key: timing dict}) where each timing dict
  holds median wall-clock and CPU seconds of the long call (`call_s`, `call_cpu_s`), the
  marginal cost of one decode step, (long - short) / (steps - 1) (`step_s`,
  `step_cpu_s`), and what a call costs besides its steps (`fixed_s` = short - step_s:
  argument checks, graph split, dispatch and the full-depth prompt prefill, the same
  for full-depth and early-exit decoding).
  """
  calls = {(key, m): (lambda fn=fn, m=m: fn(m)) for key, fn in runs.items() for m in (steps, 1)}
  results = {key: fn() for key, fn in calls.items()}  # Compiles (once per length) and warms.
  wall = {key: [] for key in calls}
  cpu = {key: [] for key in calls}
  for _ in range(rounds):
    for key, fn in calls.items():
      w, c = _time(fn)
      wall[key].append(w)
      cpu[key].append(c)
  timing = {}
  for key in runs:
    long_w, short_w = (statistics.median(wall[(key, m)]) for m in (steps, 1))
    long_c, short_c = (statistics.median(cpu[(key, m)]) for m in (steps, 1))
    step_s = (long_w - short_w) / (steps - 1)
    timing[key] = {"call_s": long_w, "call_min_s": min(wall[(key, steps)]),
                   "call_walls": wall[(key, steps)],
                   "call_cpu_s": long_c, "step_s": step_s,
                   "step_cpu_s": (long_c - short_c) / (steps - 1), "fixed_s": short_w - step_s}
  return {key: results[(key, steps)] for key in runs}, timing


def bench_group(model, prompt_BP, steps, *, kv_policy, batch_exit, exit_layers, rounds,
                static=None):
  """Interleaved timing of full depth, every threshold and (if given) the static model at
  full depth; one row each."""
  n = model.config.num_layers

  def call(layers, thr):
    return lambda m: decoding.generate(model, prompt_BP, m, thr, exit_layers=layers,
                                       kv_policy=kv_policy, batch_exit=batch_exit)

  runs = {"full": call((n,), np.inf), **{thr: call(exit_layers, thr) for thr in THRESHOLDS}}
  if static is not None:
    d = static.config.num_layers
    runs["static"] = lambda m: decoding.generate(static, prompt_BP, m, np.inf,
                                                 exit_layers=(d,))
  results, timing = _timed_rounds(runs, steps, rounds)
  base = timing["full"]
  full_flops = decoding.decode_cost(model.config, results["full"]).full_depth
  b = prompt_BP.shape[0]
  rows = []
  for key in runs:
    res, tm = results[key], timing[key]
    if key == "static":
      # Costed against the early-exit model's full depth: its own full depth is all it runs.
      scost = decoding.decode_cost(static.config, res)
      cost = dataclasses.replace(scost, full_depth=full_flops)
    else:
      cost = decoding.decode_cost(model.config, res, kv_policy=kv_policy)
    method = {"full": "full depth", "static": f"static {static and static.config.num_layers}"
              "-layer model"}.get(key, "early exit")
    rows.append({
        "method": method, "threshold": key if method == "early exit" else None,
        "kv_policy": kv_policy,
        "batch": b, "batch_exit": batch_exit, "steps": steps,
        "tokens_per_s_median": b * steps / tm["call_s"],
        "tokens_per_s_best": b * steps / tm["call_min_s"],
        "decode_tokens_per_s": b / tm["step_s"], "fixed_ms": 1e3 * tm["fixed_s"],
        "seconds_median": tm["call_s"], "step_us": 1e6 * tm["step_s"],
        "measured_speedup": base["call_s"] / tm["call_s"],
        # Noise of the call speedup: full-depth / this call's time, paired by round
        # (the two are timed back to back), quartiles over the rounds.
        **dict(zip(("call_speedup_q25", "call_speedup_q75"), np.quantile(
            [f / t for f, t in zip(base["call_walls"], tm["call_walls"])], [0.25, 0.75]
        ).tolist())),
        "step_speedup": base["step_s"] / tm["step_s"],
        "cpu_seconds_median": tm["call_cpu_s"],
        "cpu_speedup": base["call_cpu_s"] / tm["call_cpu_s"],
        "cpu_step_speedup": base["step_cpu_s"] / tm["step_cpu_s"],
        "mean_exit_layer": cost.mean_exit_layer, "mean_layers_run": cost.mean_layers_run,
        "ideal_layers_speedup": n / cost.mean_exit_layer,
        "run_layers_speedup": n / cost.mean_layers_run,
        "ideal_flops_speedup": cost.ideal_flops_speedup,
        "executed_flops_speedup": cost.executed_flops_speedup,
        "recomputed_layers_per_step": float(np.mean(np.asarray(res.recomputed_layers))),
    })
  return rows


def breakdown(model, prompt_BP, steps, exit_layers, rounds):
  """Where the time of a decode step goes at batch 1: exits compared with truncated and
  full models (marginal CPU time per step, so per-call costs are left out)."""
  n, e = model.config.num_layers, exit_layers[0]
  trunc = truncated(model, e)
  gen = decoding.generate
  runs = {
      "full": lambda m: gen(model, prompt_BP, m, np.inf, exit_layers=(n,)),
      "truncated": lambda m: gen(trunc, prompt_BP, m, np.inf, exit_layers=(e,)),
      "checks_never_exit": lambda m: gen(model, prompt_BP, m, np.inf, exit_layers=exit_layers),
      "copy_all_exit": lambda m: gen(model, prompt_BP, m, 0.0, exit_layers=exit_layers),
      "recompute_all_exit": lambda m: gen(model, prompt_BP, m, 0.0, exit_layers=exit_layers,
                                          kv_policy="recompute"),
  }
  _, timing = _timed_rounds(runs, steps, rounds)
  return {"first_exit_layer": e, "num_layers": n,
          "cpu_us_per_step": {key: 1e6 * t["step_cpu_s"] for key, t in timing.items()},
          "fixed_ms": {key: 1e3 * t["fixed_s"] for key, t in timing.items()}}


def _config(cfg_name: str, seed: int, *args: str) -> ExperimentConfig:
  c = load_config_file(os.path.join(CONFIGS, cfg_name + ".py"), *args)
  c.train.seed = seed
  return ExperimentConfig.from_dict(c)


def seed_runs(name: str, seed: int) -> list[tuple[ExperimentConfig, str]]:
  """(config, workdir) of the early-exit model and of its static baseline, one seed."""
  cfg_name, static_cfg, depth = MODELS[name]
  if seed == 0:  # The timed models.
    dirs = (name, f"{name}_static{depth}")
    dirs = tuple(os.path.join(_WORKDIR.value, d) for d in dirs)
  elif name == "reference":
    dirs = (os.path.join(_REF_SEEDS.value, f"early_exit_s{seed}"),
            os.path.join(_REF_SEEDS.value, f"static{depth}_s{seed}"))
  else:
    dirs = (os.path.join(_WORKDIR.value, f"{name}_s{seed}"),
            os.path.join(_WORKDIR.value, f"{name}_static{depth}_s{seed}"))
  return [(_config(cfg_name, seed), dirs[0]), (_config(static_cfg, seed, str(depth)), dirs[1])]


def seed_ppl(name: str, seed: int) -> dict[str, float] | None:
  """One seed's teacher-forced validation PPLs (None until both its runs are finished):
  "full", "static" and "<emulated policy>@<threshold>", cached in the run's workdir."""
  (cfg, wd), (scfg, swd) = seed_runs(name, seed)
  if not (common.finished(cfg, wd) and common.finished(scfg, swd)):
    return None
  rows = common.cached_rows(
      os.path.join(wd, "decoding_sweep.json"),
      lambda: sweep.run_sweep(wd, np.array(THRESHOLDS, np.float32),
                              kv_policies=("oracle", "copy"), static_dirs=(swd,)).rows)
  out = {}
  for r in rows:
    if r.kind in ("full", "static"):
      out[r.kind] = r.ppl
    elif r.kind == "threshold":
      out[f"{r.kv_policy}@{r.threshold:g}"] = r.ppl
  return out


def ppl_key(row: dict) -> str | None:
  """Which teacher-forced PPL a timed row has: None for batch-8 `sync` exits, whose exits
  depend on which rows share the batch (not measured)."""
  if row["method"] == "full depth":
    return "full"
  if row["method"].startswith("static"):
    return "static"
  if row["batch"] > 1 and row["batch_exit"] == "sync":
    return None
  return f"{decoding.EMULATED_POLICY[row['kv_policy']]}@{row['threshold']:g}"


def with_ppl(rows: list[dict], ppls: dict[str, dict[int, dict[str, float]]]) -> list[dict]:
  out = []
  for r in rows:
    key = ppl_key(r)
    vals = {s: p[key] for s, p in ppls[r["model"]].items()} if key else {}
    out.append({**r, "ppl_key": key or "",
                "ppl_seed0": vals.get(0, ""),
                "ppl_mean": statistics.mean(vals.values()) if vals else "",
                "ppl_std": statistics.stdev(vals.values()) if len(vals) > 1 else "",
                "ppl_seeds": len(vals)})
  return out


def time_models() -> tuple[list[dict], dict, dict]:
  """Seed 0's models (trained if missing), timed: (rows, breakdowns, meta)."""
  rounds = 3 if _QUICK.value else _ROUNDS.value
  load_average = os.getloadavg()
  t0 = time.perf_counter()
  rows, breakdowns, models = [], {}, {}
  for name in MODELS:
    (cfg, wd), (scfg, swd) = seed_runs(name, 0)
    logging.info("training %s into %s (resumes; a finished run is only loaded)", name, wd)
    common.ensure_trained(cfg, wd)
    common.ensure_trained(scfg, swd)
    ckpt = checkpoint.load_checkpoint(wd)
    static = checkpoint.load_checkpoint(swd)
    model, exit_layers = ckpt.model, tuple(ckpt.experiment["exit_layers"])
    cfg: ModelConfig = model.config
    steps = cfg.max_len - PROMPT_LEN + 1  # Fills the cache.
    models[name] = {"model": cfg.to_dict(), "exit_layers": list(exit_layers),
                    "step": ckpt.step, "val_ppl": ckpt.metrics.get("layer_ppl"),
                    "static_layers": static.model.config.num_layers,
                    "static_step": static.step,
                    "train_wall_seconds": {"early_exit": common.wall_seconds(wd),
                                           "static": common.wall_seconds(swd)}}
    groups = [(1, "copy", "sync"), (1, "recompute", "sync"), (8, "copy", "sync"),
              (8, "copy", "row"), (8, "recompute", "row")]
    if _QUICK.value:
      groups = groups[:1]
    for batch, policy, rule in groups:
      logging.info("%s: batch %d, %s, %s", name, batch, policy, rule)
      with_static = static.model if (policy, rule) == ("copy", "sync") else None
      for row in bench_group(model, _prompts(ckpt, batch), steps, kv_policy=policy,
                             batch_exit=rule, exit_layers=exit_layers, rounds=rounds,
                             static=with_static):
        rows.append({"model": name, **row})
    breakdowns[name] = breakdown(model, _prompts(ckpt, 1), steps, exit_layers, rounds)
  meta = {"load_average_end": os.getloadavg(),
          "jax": jax.__version__, "backend": jax.default_backend(),
          "device": str(jax.devices()[0]), "cpu_count": os.cpu_count(),
          "machine": platform.machine(), "load_average": load_average, "rounds": rounds,
          "prompt_len": PROMPT_LEN, "thresholds": list(THRESHOLDS), "models": models,
          "timing_wall_seconds": time.perf_counter() - t0,
          "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
  return rows, breakdowns, meta


def _write_json(path: str, obj) -> None:
  with open(path + ".tmp", "w") as f:
    json.dump(obj, f, indent=1)
  os.replace(path + ".tmp", path)


def main(argv):
  del argv
  results_path = os.path.join(HERE, "results.json")
  if _REPORT_ONLY.value:
    with open(results_path) as f:
      saved = json.load(f)
    timing_rows, breakdowns, meta = saved["timing_rows"], saved["breakdown"], saved["meta"]
  else:
    timing_rows, breakdowns, meta = time_models()
    _write_json(results_path, {"timing_rows": timing_rows, "breakdown": breakdowns,
                               "meta": meta})  # Kept if a PPL step fails; --report_only.
  ppls: dict[str, dict[int, dict[str, float]]] = {name: {} for name in MODELS}
  for name in MODELS:
    for seed in range(_SEEDS.value):
      if not _REPORT_ONLY.value:
        for cfg, wd in seed_runs(name, seed):
          common.ensure_trained(cfg, wd)
      p = seed_ppl(name, seed)
      if p is None:
        logging.info("%s seed %d is not finished: left out of the PPL columns", name, seed)
      else:
        ppls[name][seed] = p
  rows = with_ppl(timing_rows, ppls)
  from report import write_results  # experiments/decoding/report.py, beside this file.

  write_results(HERE, rows, breakdowns, meta, ppls)
  _write_json(results_path, {"rows": rows, "timing_rows": timing_rows,
                             "breakdown": breakdowns, "meta": meta, "seed_ppl": ppls})
  print(open(os.path.join(HERE, "RESULTS.md")).read())
  print(json.dumps({"rows": rows, "breakdown": breakdowns, "meta": meta}))


if __name__ == "__main__":
  app.run(main)
