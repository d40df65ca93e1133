"""Data parallelism: a step sharded over 4 CPU devices equals the 1-device step."""

import dataclasses

import chex
import jax
import numpy as np
import pytest

from deepexit_jax import data, parallel
from deepexit_jax.errors import UserError
from deepexit_jax.train import Trainer


def _trainer(tiny_config, num_devices, **model):
  cfg = tiny_config(num_devices=num_devices).with_vocab_size(40)
  if model:
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **model))
  return Trainer(cfg, total_steps=10)


def _run(trainer, steps=3):
  batches = data.TrainBatches(
      np.random.default_rng(0).integers(0, 40, 20_000).astype(np.int32), 32, 8, seed=0)
  state, metrics = trainer.initial_state, []
  for step in range(steps):
    state, m = trainer.train_step(state, *trainer.shard(*batches.batch(step)))
    metrics.append(m)
  return state, metrics


def test_four_devices_equal_one(tiny_config):
  assert jax.device_count() == 4  # tests/conftest.py forces four host devices.
  one, four = _trainer(tiny_config, 1), _trainer(tiny_config, 4)
  assert one.mesh.size == 1 and four.mesh.size == 4
  (state1, m1), (state4, m4) = _run(one), _run(four)
  chex.assert_trees_all_close(m4, m1, rtol=2e-5, atol=1e-6)
  chex.assert_trees_all_close(state4.params, state1.params, rtol=2e-4, atol=1e-6)
  # Parameters stay replicated on all four devices; a batch is split over them.
  leaf = jax.tree.leaves(state4.params)[0]
  assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == 4
  inputs, _ = four.shard(np.zeros((8, 32), np.int32), np.zeros((8, 32), np.int32))
  assert {s.data.shape for s in inputs.addressable_shards} == {(2, 32)}


def test_default_uses_every_device(tiny_config):
  assert _trainer(tiny_config, 0).mesh.size == jax.device_count()


def test_evaluation_is_sharded_and_equal(tiny_config):
  one, four = _trainer(tiny_config, 1), _trainer(tiny_config, 4)
  tokens = np.random.default_rng(1).integers(0, 40, 3_000).astype(np.int32)
  ev = data.eval_batches(tokens, 32, 8)
  r1, r4 = one.evaluate(one.initial_state.params, ev), four.evaluate(four.initial_state.params, ev)
  np.testing.assert_allclose(r4["layer_nll"], r1["layer_nll"], rtol=1e-5)
  assert r4["tokens"] == r1["tokens"]


@pytest.mark.parametrize("num_devices, batch, match", [
    (3, 8, "not divisible by the 3"), (5, 8, "only 4 device"), (-1, 8, "num_devices")])
def test_bad_device_counts(tiny_config, num_devices, batch, match):
  with pytest.raises(UserError, match=match):
    cfg = tiny_config(num_devices=num_devices)
    Trainer(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_size=batch)),
            total_steps=10)


def test_mesh_axes_are_auto():
  mesh = parallel.data_mesh(2)
  assert mesh.axis_names == ("data",) and mesh.size == 2
  assert mesh.axis_types == (jax.sharding.AxisType.Auto,)


def _free_port() -> int:
  import socket

  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_train_like_one(config_dict, tmp_path):
  """Multi-host on one machine: 2 processes x 2 CPU devices train exactly as 1 x 4 does,
  and only process 0 writes the metrics."""
  import json
  import os
  import subprocess
  import sys

  cfg = config_dict(max_steps=6, eval_every=3, log_every=3)
  cfg["model"]["dropout"] = 0.0
  cfg_file = tmp_path / "cfg.py"
  cfg_file.write_text(f"import ml_collections\n\ndef get_config():\n"
                      f"  return ml_collections.ConfigDict({cfg!r})\n")

  def launch(workdir, devices, process_env):
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", **process_env}
    flags = ["--distributed"] if process_env else []
    return subprocess.Popen(
        [sys.executable, "-m", "deepexit_jax.main.train", f"--config={cfg_file}",
         f"--workdir={workdir}", *flags], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)

  port = _free_port()
  procs = [launch(tmp_path / "multi", 2, {"JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
                                          "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i)})
           for i in range(2)]
  procs.append(launch(tmp_path / "single", 4, {}))
  for p in procs:
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-2000:]

  def evals(workdir):
    with open(workdir / "metrics.jsonl") as f:
      records = [json.loads(line) for line in f]
    return [r["layer_nll"] for r in records if r["kind"] == "eval"], len(records)

  (multi, n_multi), (single, n_single) = evals(tmp_path / "multi"), evals(tmp_path / "single")
  assert n_multi == n_single  # Written once, not once per process.
  np.testing.assert_allclose(multi, single, rtol=1e-5)
