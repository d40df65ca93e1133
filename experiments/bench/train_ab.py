"""Training step of this checkout vs another commit's, interleaved in ONE process.

On a shared host the speed drifts by tens of percent between minutes, so two runs of
`train_throughput.py` cannot tell a 10% change from noise. This script loads the
other commit's package under another name (`deepexit_other`, a renamed copy in a
temporary directory), builds both trainers from their own reference configs and
times 20-step blocks of each in turn.

Run:
  git worktree add /tmp/old <commit>
  python experiments/bench/train_ab.py --other=/tmp/old [--rounds=8]

Prints the median and best ms/step of each and, as its last line, JSON with the
ratio of medians (other / this: > 1 means this checkout is faster).
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import sys
import tempfile
import time

import jax
import numpy as np
from absl import app, flags

_OTHER = flags.DEFINE_string("other", None, "Root of a checkout of the other commit.",
                             required=True)
_ROUNDS = flags.DEFINE_integer("rounds", 8, "Interleaved rounds of 20 steps each.")
_VOCAB = 171
HERE = os.path.dirname(os.path.abspath(__file__))


def _load_other(root: str) -> str:
  """Copies root/deepexit_jax to a temp dir as `deepexit_other`; returns its parent."""
  parent = tempfile.mkdtemp(prefix="deepexit_ab_")
  dst = os.path.join(parent, "deepexit_other")
  shutil.copytree(os.path.join(root, "deepexit_jax"), dst)
  for dirpath, _, files in os.walk(dst):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(dirpath, name)
        with open(path) as f:
          text = f.read()
        with open(path, "w") as f:
          f.write(re.sub(r"\bdeepexit_jax\b", "deepexit_other", text))
  return parent


def _trainer(pkg: str, config_path: str):
  config = importlib.import_module(f"{pkg}.config")
  train = importlib.import_module(f"{pkg}.train")
  cfg = config.ExperimentConfig.from_dict(config.load_config_file(config_path))
  return train.Trainer(cfg.with_vocab_size(_VOCAB), 1000)


def main(argv):
  del argv
  sys.path.insert(0, _load_other(_OTHER.value))
  from deepexit_jax import data

  trainers = {
      "this": _trainer("deepexit_jax", os.path.join(HERE, "..", "configs", "reference.py")),
      "other": _trainer("deepexit_other",
                        os.path.join(_OTHER.value, "experiments", "configs", "reference.py")),
  }
  stream = np.random.default_rng(0).integers(0, _VOCAB, 500_000).astype(np.int32)
  batches = data.TrainBatches(stream, 128, 32, seed=0)
  states = {k: t.initial_state for k, t in trainers.items()}
  for k, t in trainers.items():  # Compile and warm up.
    states[k], m = t.train_step(states[k], *batches.batch(0))
    jax.block_until_ready(m)
  times = {k: [] for k in trainers}
  for _ in range(_ROUNDS.value):
    for k, t in trainers.items():
      state, start = states[k], time.perf_counter()
      for i in range(20):
        state, m = t.train_step(state, *batches.batch(i))
      jax.block_until_ready(m)
      times[k].append((time.perf_counter() - start) / 20)
      states[k] = state
  result = {}
  for k, v in times.items():
    med = float(np.median(v))
    result[k] = {"median_ms": round(1e3 * med, 2), "best_ms": round(1e3 * min(v), 2),
                 "tokens_per_s_median": round(4096 / med)}
    print(f"{k}: median {1e3 * med:.2f} ms/step ({4096 / med:,.0f} tokens/s), "
          f"best {1e3 * min(v):.2f} ms")
  result["other_over_this"] = round(result["other"]["median_ms"] / result["this"]["median_ms"],
                                    3)
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)
