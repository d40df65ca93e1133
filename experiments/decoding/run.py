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

Run from the repository root (about 10 minutes on a 2-core CPU, training included):
  DEEPEXIT_DATA_DIR=../shared/data python experiments/decoding/run.py
Flags: --workdir (default runs/decoding), --rounds, --quick (fewer groups; a smoke run).
Prints a table and, as its last line, JSON of every row.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import time

import jax
import numpy as np
from absl import app, flags, logging

from deepexit_jax import checkpoint, data, decoding
from deepexit_jax.config import ExperimentConfig, load_config_file
from deepexit_jax.model import DeepSupervisionTransformer, ModelConfig
from deepexit_jax.train import train

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIGS = os.path.join(HERE, "..", "configs")
_WORKDIR = flags.DEFINE_string("workdir", "runs/decoding", "Where the trained models go.")
_ROUNDS = flags.DEFINE_integer("rounds", 15, "Interleaved timing rounds per group (15: the "
                                "committed RESULTS.md).")
_QUICK = flags.DEFINE_bool("quick", False, "Batch 1, copy only, 3 rounds: a smoke run.")

MODELS = {"reference": "reference", "deep": "deep"}
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
                   "call_cpu_s": long_c, "step_s": step_s,
                   "step_cpu_s": (long_c - short_c) / (steps - 1), "fixed_s": short_w - step_s}
  return {key: results[(key, steps)] for key in runs}, timing


def bench_group(model, prompt_BP, steps, *, kv_policy, batch_exit, exit_layers, rounds):
  """Interleaved timing of full depth and every threshold; one row per threshold."""
  n = model.config.num_layers

  def call(layers, thr):
    return lambda m: decoding.generate(model, prompt_BP, m, thr, exit_layers=layers,
                                       kv_policy=kv_policy, batch_exit=batch_exit)

  runs = {"full": call((n,), np.inf), **{thr: call(exit_layers, thr) for thr in THRESHOLDS}}
  results, timing = _timed_rounds(runs, steps, rounds)
  base = timing["full"]
  b = prompt_BP.shape[0]
  rows = []
  for key in runs:
    res, tm = results[key], timing[key]
    cost = decoding.decode_cost(model.config, res, kv_policy=kv_policy)
    rows.append({
        "threshold": None if key == "full" else key, "kv_policy": kv_policy,
        "batch": b, "batch_exit": batch_exit, "steps": steps,
        "tokens_per_s_median": b * steps / tm["call_s"],
        "tokens_per_s_best": b * steps / tm["call_min_s"],
        "decode_tokens_per_s": b / tm["step_s"], "fixed_ms": 1e3 * tm["fixed_s"],
        "seconds_median": tm["call_s"], "step_us": 1e6 * tm["step_s"],
        "measured_speedup": base["call_s"] / tm["call_s"],
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


def main(argv):
  del argv
  rounds = 3 if _QUICK.value else _ROUNDS.value
  load_average = os.getloadavg()
  rows, breakdowns, models = [], {}, {}
  for name, cfg_name in MODELS.items():
    wd = os.path.join(_WORKDIR.value, name)
    logging.info("training %s into %s (resumes; a finished run is only loaded)", name, wd)
    train(ExperimentConfig.from_dict(load_config_file(os.path.join(CONFIGS, cfg_name + ".py"))),
          wd, resume=True)
    ckpt = checkpoint.load_checkpoint(wd)
    model, exit_layers = ckpt.model, tuple(ckpt.experiment["exit_layers"])
    cfg: ModelConfig = model.config
    steps = cfg.max_len - PROMPT_LEN + 1  # Fills the cache.
    models[name] = {"model": cfg.to_dict(), "exit_layers": list(exit_layers),
                    "step": ckpt.step, "val_ppl": ckpt.metrics.get("layer_ppl")}
    groups = [(1, "copy", "sync"), (1, "recompute", "sync"), (8, "copy", "sync"),
              (8, "copy", "row"), (8, "recompute", "row")]
    if _QUICK.value:
      groups = groups[:1]
    for batch, policy, rule in groups:
      logging.info("%s: batch %d, %s, %s", name, batch, policy, rule)
      for row in bench_group(model, _prompts(ckpt, batch), steps, kv_policy=policy,
                             batch_exit=rule, exit_layers=exit_layers, rounds=rounds):
        rows.append({"model": name, **row})
    breakdowns[name] = breakdown(model, _prompts(ckpt, 1), steps, exit_layers, rounds)
  meta = {"jax": jax.__version__, "backend": jax.default_backend(),
          "device": str(jax.devices()[0]), "cpu_count": os.cpu_count(),
          "machine": platform.machine(), "load_average": load_average, "rounds": rounds, "prompt_len": PROMPT_LEN,
          "thresholds": list(THRESHOLDS), "models": models}
  from report import write_results  # experiments/decoding/report.py, beside this file.

  write_results(HERE, rows, breakdowns, meta)
  print(open(os.path.join(HERE, "RESULTS.md")).read())
  print(json.dumps({"rows": rows, "breakdown": breakdowns, "meta": meta}))


if __name__ == "__main__":
  app.run(main)
