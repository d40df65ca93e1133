"""Peak device memory of the large-vocabulary paths: V = 32,768, 8 layers.

Run:
  python experiments/bench/memory.py [--vocab=32768] [--batch=32] [--seq_len=128]

Compiles (does not run) each computation for an 8-layer dim-64 model and reads
XLA's own buffer assignment (`compiled.memory_analysis()`): temporary + output
bytes, the device memory a call adds to its inputs. Compared:
  all_layer_logits   the full [N, B, T, V] logits (what a naive sweep would use);
  oracle_logits      `predict_with_exit` under `oracle` returning logits;
  sweep_oracle       the sweep path (`return_logits=False`, 11 thresholds, oracle);
  sweep_copy         the same under `copy`;
  probe_collection   `probes.layer_summaries` (probe collection, top-5 ids);
  train_step         one training step (heads of the supervised layers outside
                     the scan, uniform weights): the path still holding
                     [N, B, T, V] logits.
One [B, T, V] float32 block is printed as the unit. Last line: JSON.
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from deepexit_jax import exits, probes
from deepexit_jax.config import ExperimentConfig, TrainConfig
from deepexit_jax.data import DataConfig
from deepexit_jax.model import ModelConfig, create_model
from deepexit_jax.train import Trainer

_VOCAB = flags.DEFINE_integer("vocab", 32_768, "Vocabulary size.")
_BATCH = flags.DEFINE_integer("batch", 32, "Batch size.")
_SEQ = flags.DEFINE_integer("seq_len", 128, "Sequence length.")


def _bytes(compiled) -> int:
  """Temporary + output bytes: what the computation adds to device memory."""
  m = compiled.memory_analysis()
  return int(m.temp_size_in_bytes + m.output_size_in_bytes)


def _temp_bytes(fn, *args) -> int:
  return _bytes(jax.jit(fn).lower(*args).compile())


def main(argv):
  del argv
  config = ModelConfig(vocab_size=_VOCAB.value, num_layers=8, dim=64, num_heads=4, ffn_dim=256,
                       max_len=_SEQ.value, remat="full")
  model = create_model(config)
  graphdef, state = nnx.split(model)
  tokens = jnp.zeros((_BATCH.value, _SEQ.value), jnp.int32)
  thresholds = jnp.linspace(0.0, 1.0, 11)
  exit_layers = tuple(range(1, config.num_layers))

  def engine(kv_policy, return_logits, thr):
    opts = exits._Options(exit_layers=exit_layers, measure="softmax", kv_policy=kv_policy,
                          routing="token", seq_quantile=1.0, threshold_decay=0.0,
                          probe_flops=0, return_logits=return_logits)
    fn = functools.partial(exits._predict, graphdef, static_probe=None, opts=opts)
    return _temp_bytes(lambda s, x, t: fn(s, x, t, x, None), state, tokens, thr)

  results = {
      "all_layer_logits": _temp_bytes(
          lambda s, x: nnx.merge(graphdef, s)(x).per_layer, state, tokens),
      "oracle_logits": engine("oracle", True, thresholds[5]),
      "sweep_oracle": engine("oracle", False, thresholds),
      "sweep_copy": engine("copy", False, thresholds),
      "probe_collection": _temp_bytes(
          lambda s, x: probes.trace_layer_summaries(nnx.merge(graphdef, s), x, x, 5), state, tokens),
  }
  experiment = ExperimentConfig(model=config, data=DataConfig(seq_len=_SEQ.value,
                                                              batch_size=_BATCH.value),
                                loss_weights="uniform", exit_layers=exit_layers,
                                train=TrainConfig())
  trainer = Trainer(experiment, total_steps=10)
  results["train_step"] = _bytes(trainer.train_step.lower(
      trainer.initial_state, np.asarray(tokens), np.asarray(tokens)).compile())

  block = _BATCH.value * _SEQ.value * _VOCAB.value * 4
  print(f"V={_VOCAB.value}, 8 layers, batch {_BATCH.value} x seq {_SEQ.value}: one [B, T, V] "
        f"float32 block = {block / 2**20:.0f} MiB")
  for name, value in results.items():
    print(f"  {name:18s} {value / 2**20:9.1f} MiB = {value / block:5.2f} blocks")
  print(json.dumps({"vocab": _VOCAB.value, "num_layers": 8, "batch": _BATCH.value,
                    "seq_len": _SEQ.value, "block_bytes": block,
                    **{f"{k}_bytes": v for k, v in results.items()},
                    "backend": jax.default_backend()}))


if __name__ == "__main__":
  app.run(main)
