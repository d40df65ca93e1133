"""Importing a Hugging Face checkpoint: load time, memory, and the sweep's tokens/s on it.

Run:
  python experiments/bench/pretrained.py [--layers=4] [--dim=256] [--vocab=8192] [--tokens=8192]

A Llama-shaped model (RMSNorm, RoPE with Llama-3 scaling, SwiGLU, 8 query heads and 2
key/value heads, untied head: the fixture `llama` of tests/fixtures/hf, scaled up to a
few million parameters) with random weights is written as a Hugging Face directory
(config.json + model.safetensors, float32) in a temporary directory by a child process,
so this process's memory measures only the import. Then:
  load_s        `load_hf_checkpoint` wall time, first call (tracing the abstract model
                and reading every tensor) and a second call
  rss_mib       peak resident memory of this process before and after the import, and
                the parameters' own size (float32), in MiB
  sweep         `sweep.sweep_thresholds` over --tokens random tokens (windows of 256,
                batch 8), 11 softmax thresholds, exit layers 1..N-1, `oracle` and `copy`;
                tokens/s = evaluated tokens / median seconds of --rounds runs, the two
                policies interleaved (`experiments/common.interleaved`) after a warm-up
The last line is JSON.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

_LAYERS = flags.DEFINE_integer("layers", 4, "Transformer blocks.")
_DIM = flags.DEFINE_integer("dim", 256, "Model width.")
_VOCAB = flags.DEFINE_integer("vocab", 8192, "Vocabulary size.")
_TOKENS = flags.DEFINE_integer("tokens", 8192, "Tokens the sweep evaluates.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Timed sweeps per KV policy (interleaved).")
_MAKE = flags.DEFINE_string("make_dir", None, "Internal: write the checkpoint here and exit.")


def _config():
  from deepexit_jax.model import ModelConfig

  d = _DIM.value
  return ModelConfig(
      vocab_size=_VOCAB.value, num_layers=_LAYERS.value, dim=d, num_heads=8, ffn_dim=(8 * d) // 3,
      max_len=256, norm="rmsnorm", norm_eps=1e-5, positions="rope", rope_theta=500000.0,
      rope_scaling=8.0, rope_original_max_len=64, mlp="swiglu", num_kv_heads=2,
      attention_bias=False, mlp_bias=False, unembed_bias=False)


def _make(directory: str) -> None:
  from deepexit_jax.model import create_model
  from deepexit_jax.pretrained import save_hf_checkpoint

  save_hf_checkpoint(create_model(_config(), seed=0), directory)


def _peak_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv):
  del argv
  if _MAKE.value:
    _make(_MAKE.value)
    return
  import jax

  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  import common  # experiments/common.py

  from deepexit_jax import checkpoint, data, sweep
  from deepexit_jax.model import count_params
  from deepexit_jax.pretrained import load_hf_checkpoint

  jax.numpy.zeros(1).block_until_ready()  # JAX's own start-up outside the measurement.
  with tempfile.TemporaryDirectory() as tmp:
    hf_dir = os.path.join(tmp, "llama")
    subprocess.run([sys.executable, __file__, f"--make_dir={hf_dir}",
                    *(f"--{f.name}={f.value}" for f in (_LAYERS, _DIM, _VOCAB))], check=True)
    file_mib = os.path.getsize(os.path.join(hf_dir, "model.safetensors")) / 2**20
    rss_before = _peak_mib()
    t0 = time.perf_counter()
    model = load_hf_checkpoint(hf_dir)
    jax.block_until_ready(jax.tree.leaves(checkpoint.pure_params(model)))
    load_first = time.perf_counter() - t0
    rss_after = _peak_mib()
    t0 = time.perf_counter()
    load_hf_checkpoint(hf_dir)
    load_second = time.perf_counter() - t0

  cfg = model.config
  params = count_params(model)
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, _TOKENS.value).astype(np.int32)
  batches = data.eval_batches(tokens, 256, 8)
  thresholds = np.linspace(0.0, 1.0, 11).astype(np.float32)
  layers = tuple(range(1, cfg.num_layers))
  result = {
      "config": {k: v for k, v in cfg.to_dict().items()
                 if k in ("vocab_size", "num_layers", "dim", "num_heads", "num_kv_heads",
                          "ffn_dim", "max_len", "positions", "mlp", "norm")},
      "params": params, "safetensors_mib": round(file_mib, 1),
      "load_s": {"first": round(load_first, 2), "second": round(load_second, 2)},
      "rss_mib": {"before_import": round(rss_before), "after_import": round(rss_after),
                  "params_float32": round(params * 4 / 2**20, 1)},
      "sweep_tokens": int(batches.num_targets), "sweep_tokens_per_s": {},
  }
  _, times = common.interleaved({policy: lambda p=policy: sweep.sweep_thresholds(
      model, batches, thresholds, exit_layers=layers, kv_policy=p)
      for policy in ("oracle", "copy")}, rounds=_ROUNDS.value)
  for policy, seconds in times.items():
    result["sweep_tokens_per_s"][policy] = round(batches.num_targets / np.median(seconds))
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)
