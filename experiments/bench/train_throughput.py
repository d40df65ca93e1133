"""Training throughput of the reference config, with a cost breakdown of one step.

Run:
  python experiments/bench/train_throughput.py [--steps=100] [--config=...]

Prints a human-readable breakdown, then ONE JSON object as its last line:
  {"tokens_per_s": ..., "step_ms": ..., "compile_s": ..., "compile_s_4_layers": ...,
   "compile_s_32_layers": ..., ...}
Data is a random token stream of the reference vocabulary size (171, the
characters of the first 500,000 characters of WikiText-2 train), so the figure
measures the model and the step, not the input pipeline (timed separately).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from deepexit_jax import data, xla_options
from deepexit_jax.config import ExperimentConfig, load_config_file
from deepexit_jax.train import Trainer

_STEPS = flags.DEFINE_integer("steps", 100, "Timed training steps.")
_VOCAB = flags.DEFINE_integer("vocab", 171, "Vocabulary size of the synthetic tokens.")
_CONFIG = flags.DEFINE_string(
    "config", os.path.join(os.path.dirname(__file__), "..", "configs", "reference.py"),
    "Experiment config file whose model and batch shape are measured.")


def _config(path: str, vocab: int, **model_overrides) -> ExperimentConfig:
  cfg = ExperimentConfig.from_dict(load_config_file(path)).with_vocab_size(vocab)
  if model_overrides:  # Another depth: the config's per-layer weights may not fit it.
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **model_overrides),
                              loss_weights="uniform", exit_layers=(1,))
  return cfg


def _time(fn, *args, repeats: int) -> float:
  """Median seconds of `fn(*args)` (blocking on the result) over `repeats` calls."""
  out = fn(*args)
  jax.block_until_ready(out)
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def _compile_seconds(cfg: ExperimentConfig, inputs, targets) -> float:
  trainer = Trainer(cfg, total_steps=1000)
  t0 = time.perf_counter()
  trainer.train_step.lower(trainer.initial_state, inputs, targets).compile()
  return time.perf_counter() - t0


def main(argv):
  del argv
  cfg = _config(_CONFIG.value, _VOCAB.value)
  b, s = cfg.data.batch_size, cfg.data.seq_len
  rng = np.random.default_rng(0)
  stream = rng.integers(0, cfg.model.vocab_size, 500_000).astype(np.int32)
  batches = data.TrainBatches(stream, s, b, seed=0)
  inputs, targets = batches.batch(0)

  trainer = Trainer(cfg, total_steps=1000)
  t0 = time.perf_counter()
  compiled = trainer.train_step.lower(trainer.initial_state, inputs, targets).compile()
  compile_s = time.perf_counter() - t0

  # Steady state: the real loop (host batch creation + dispatch + step, and every
  # `train.log_every` steps the all-layer NLL report that `train` logs), synced at the end.
  state = trainer.initial_state
  report = trainer.report_step.lower(state.params, inputs, targets, state.step).compile()
  jax.block_until_ready(report(state.params, inputs, targets, state.step))
  state, m = compiled(state, *batches.batch(0))
  jax.block_until_ready(m)
  t0 = time.perf_counter()
  for step in range(1, _STEPS.value + 1):
    x, y = batches.batch(step)
    if (step + 1) % cfg.train.log_every == 0:
      report(state.params, x, y, state.step)
    state, m = compiled(state, x, y)
  jax.block_until_ready(m)
  step_s = (time.perf_counter() - t0) / _STEPS.value

  # Breakdown of one step's parts, each timed alone.
  params = state.params
  mask = jnp.ones(inputs.shape, jnp.float32)
  step0 = jnp.zeros((), jnp.int32)
  fwd = xla_options.jit(lambda p, x, y: trainer._loss(p, x, y, mask, step0)[0])
  fwd_bwd = xla_options.jit(jax.grad(lambda p, x, y: trainer._loss(p, x, y, mask, step0)[0]))
  grads = fwd_bwd(params, inputs, targets)
  opt = xla_options.jit(lambda g, o, p: trainer.tx.update(g, o, p))
  noop = jax.jit(lambda x: x + 1)
  parts = {
      "data_ms": 1e3 * _time(batches.batch, 7, repeats=50),
      "dispatch_ms": 1e3 * _time(noop, jnp.zeros(()), repeats=200),
      "forward_ms": 1e3 * _time(fwd, params, inputs, targets, repeats=20),
      "forward_backward_ms": 1e3 * _time(fwd_bwd, params, inputs, targets, repeats=20),
      "optimizer_ms": 1e3 * _time(opt, grads, state.opt_state, params, repeats=20),
      # Once per `train.log_every` steps: every layer's NLL, zero-weight layers included.
      "report_ms": 1e3 * _time(report, params, inputs, targets, state.step, repeats=20),
  }
  parts["backward_ms"] = parts["forward_backward_ms"] - parts["forward_ms"]

  compile_4 = _compile_seconds(
      _config(_CONFIG.value, _VOCAB.value, num_layers=4), inputs, targets)
  cfg32 = _config(_CONFIG.value, _VOCAB.value, num_layers=32)
  compile_32 = _compile_seconds(cfg32, inputs, targets)

  n_params = sum(x.size for x in jax.tree.leaves(nnx.state(trainer.model(params), nnx.Param)))
  result = {
      "tokens_per_s": round(b * s / step_s),
      "step_ms": round(1e3 * step_s, 2),
      "compile_s": round(compile_s, 2),
      **{k: round(v, 3) for k, v in parts.items()},
      "compile_s_4_layers": round(compile_4, 2),
      "compile_s_32_layers": round(compile_32, 2),
      "params": int(n_params),
      "batch": b, "seq_len": s, "num_layers": cfg.model.num_layers, "dim": cfg.model.dim,
      "backend": jax.default_backend(), "devices": jax.device_count(),
  }
  print(f"reference config: {result['tokens_per_s']:,} training tokens/s, "
        f"{result['step_ms']} ms/step (batch {b} x seq {s}), compile {result['compile_s']} s")
  print("one step's parts, timed alone: " + ", ".join(f"{k} {v:.2f}" for k, v in parts.items()))
  print(f"compile time 4 vs 32 layers: {compile_4:.2f} s vs {compile_32:.2f} s")
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)
