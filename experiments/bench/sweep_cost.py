"""Cost of a threshold sweep relative to one full-depth evaluation pass.

Run:
  python experiments/bench/sweep_cost.py [--thresholds=11] [--tokens=50000]

Times, on the reference model shape (4 layers, dim 32, V=171) over a validation
text of --tokens tokens in eval batches of 32 x 128:
  eval_s       one full-depth evaluation pass (forward through all layers and the
               final head, NLL summed), what training's evaluation costs;
  oracle_s     the --thresholds-point sweep under the `oracle` KV policy
               (`sweep.sweep_thresholds`: one forward pass per batch for all thresholds);
  copy_s       the same sweep under `copy` (one layer scan per threshold).
Each is the median of --repeats runs after a warm-up (compilation excluded).
The last line is JSON: {"eval_s", "oracle_s", "copy_s", "oracle_over_eval", ...}.
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from deepexit_jax import data, sweep, xla_options
from deepexit_jax.losses import token_nll
from deepexit_jax.model import ModelConfig, create_model

_THRESHOLDS = flags.DEFINE_integer("thresholds", 11, "Number of thresholds in [0, 1].")
_TOKENS = flags.DEFINE_integer("tokens", 50_000, "Validation tokens.")
_REPEATS = flags.DEFINE_integer("repeats", 9, "Timed repetitions (median).")


def _median_seconds(fn, repeats: int) -> float:
  fn()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def main(argv):
  del argv
  cfg = ModelConfig(vocab_size=171, num_layers=4, dim=32, num_heads=2, ffn_dim=128,
                    max_len=128)
  model = create_model(cfg)
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, _TOKENS.value).astype(np.int32)
  batches = data.eval_batches(tokens, 128, 32)
  thresholds = np.linspace(0.0, 1.0, _THRESHOLDS.value).astype(np.float32)

  @xla_options.jit  # As training's evaluation step, with the same compiler options.
  def eval_batch(inputs_BT, targets_BT, mask_BT):
    out = model(inputs_BT, per_layer_fn=lambda h: None)
    return jnp.sum(token_nll(model.head(out.hidden_NBTD[-1]), targets_BT) * mask_BT)

  def full_eval():
    total = 0.0
    for b in range(batches.num_batches):
      total += eval_batch(batches.inputs[b], batches.targets[b], batches.mask[b])
    return float(total)

  def run(policy):
    return lambda: sweep.sweep_thresholds(model, batches, thresholds, exit_layers=(2,),
                                          kv_policy=policy)

  eval_s = _median_seconds(full_eval, _REPEATS.value)
  oracle_s = _median_seconds(run("oracle"), _REPEATS.value)
  copy_s = _median_seconds(run("copy"), _REPEATS.value)
  result = {
      "eval_s": round(eval_s, 4), "oracle_s": round(oracle_s, 4), "copy_s": round(copy_s, 4),
      "oracle_over_eval": round(oracle_s / eval_s, 3), "copy_over_eval": round(copy_s / eval_s, 3),
      "thresholds": len(thresholds), "tokens": int(batches.num_targets),
      "batches": batches.num_batches, "backend": jax.default_backend(),
  }
  print(f"{len(thresholds)}-threshold sweep over {result['tokens']:,} tokens: oracle "
        f"{oracle_s:.3f} s = {result['oracle_over_eval']}x one full-depth evaluation "
        f"({eval_s:.3f} s); copy {copy_s:.3f} s = {result['copy_over_eval']}x")
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)
