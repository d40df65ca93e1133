"""Training continues from imported Hugging Face weights with our losses and LayerSkip's recipe.

The first tests drive `train()`'s `Trainer` (the jitted step it runs) with the imported
parameters as the initial state (`Trainer(initial_params=...)`, what
`train(init_from=...)` does); the last ones run `train(init_from=...)` itself.
"""

import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepexit_jax import checkpoint, data, losses
from deepexit_jax.config import ExperimentConfig, load_config_file
from deepexit_jax.errors import UserError
from deepexit_jax.model import all_layer_logits
from deepexit_jax.pretrained import load_hf_checkpoint
from deepexit_jax.train import Trainer, train

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "hf", "llama")


def _trainer(config_dict, model, recipe, steps):
  d = config_dict(max_steps=steps, learning_rate=1e-2, warmup_steps=0, num_devices=1)
  d["model"] = model.config.to_dict()
  d["data"]["batch_size"] = 2
  d["loss_weights"] = "sum_l"
  d["recipe"] = recipe
  # What train(init_from=...) builds: the trainer's initial state holds the weights.
  trainer = Trainer(ExperimentConfig.from_dict(d), steps,
                    initial_params=checkpoint.pure_params(model))
  return trainer, trainer.initial_state


def test_first_step_loss_is_sum_l_over_the_reference_exits(config_dict):
  """The training loss at the imported weights equals LayerSkip's sum_l-weighted
  cross-entropy computed from transformers' own per-layer logits."""
  model = load_hf_checkpoint(FIXTURE)
  ref = np.load(os.path.join(FIXTURE, "reference.npz"))
  tokens, logits_NBTV = ref["tokens"], ref["logits_NBTV"][:, :, :-1]
  targets_BT = tokens[:, 1:]
  logp_NBTV = jax.nn.log_softmax(jnp.asarray(logits_NBTV, jnp.float32), -1)
  nll_NBT = -np.take_along_axis(np.asarray(logp_NBTV), targets_BT[None, ..., None], -1)[..., 0]
  weights_N = losses.resolve_loss_weights("sum_l", model.config.num_layers)
  want = float(np.dot(weights_N, nll_NBT.mean(axis=(1, 2))))
  trainer, state = _trainer(config_dict, model, {}, steps=1)
  _, metrics = trainer.train_step(state, *trainer.shard(tokens[:, :-1], targets_BT))
  np.testing.assert_allclose(float(metrics["loss"]), want, rtol=1e-5)


def test_layerskip_recipe_trains_the_imported_model_and_saves_it(config_dict, tmp_path):
  """Rotational curriculum + exponential layer dropout + sum_l: the imported model's loss
  on a batch falls as it trains on it, and the result round-trips through save_model."""
  model = load_hf_checkpoint(FIXTURE)
  recipe = {"curriculum": "rotational", "layer_dropout": 0.2,
            "layer_dropout_schedule": "exponential"}
  trainer, state = _trainer(config_dict, model, recipe, steps=20)
  tokens = np.load(os.path.join(FIXTURE, "reference.npz"))["tokens"]
  batch = trainer.shard(tokens[:, :-1], tokens[:, 1:])
  mask = trainer.shard(np.ones(tokens[:, 1:].shape, np.float32))[0]
  before_N = trainer.eval_step(state.params, *batch, mask)[0]
  for _ in range(20):
    state, _ = trainer.train_step(state, *batch)
  after_N = trainer.eval_step(state.params, *batch, mask)[0]
  assert np.all(np.asarray(after_N) < 0.8 * np.asarray(before_N)), (before_N, after_N)
  trained = trainer.model(state.params)
  checkpoint.save_model(trained, str(tmp_path / "run"))
  chex.assert_trees_all_equal(checkpoint.pure_params(checkpoint.load_model(str(tmp_path / "run"))),
                              checkpoint.pure_params(trained))


GPT2 = os.path.join(os.path.dirname(__file__), "fixtures", "hf", "gpt2")  # Has tokenizer.json.


def _continued(config_dict, **model):
  """An experiment dict for `train(..., init_from=GPT2)`: no architecture fields."""
  d = config_dict(max_steps=1, eval_every=1, log_every=1, warmup_steps=0, num_devices=1)
  d["model"] = dict(dropout=0.0, **model)
  del d["exit_layers"]
  d["data"].update(train_chars=3000, val_chars=300, batch_size=2)  # seq_len 32 = max_len.
  d["loss_weights"] = "sum_l"
  return d


def _first_loss(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if '"train"' in line][0]["loss"]


def test_train_init_from_starts_at_the_imported_weights(config_dict, corpus_file, tmp_path):
  """deepexit-train --init_from: the first step's loss is the imported model's sum_l loss
  on the first batch (computed here from its per-layer logits); a fresh run's is not."""
  init_model = checkpoint.read_model_config(GPT2)
  cfg = ExperimentConfig.from_dict(_continued(config_dict), init_model=init_model)
  assert cfg.model.architecture() == init_model.architecture() and cfg.exit_layers == (1, 2)
  train(cfg, str(tmp_path / "init"), init_from=GPT2)

  ckpt = checkpoint.load_checkpoint(GPT2)
  with open(corpus_file, encoding="utf-8") as f:
    train_text = f.read()[:3000]  # The first train_chars of the leading 90%.
  inputs, targets = data.TrainBatches(ckpt.tokenizer.encode(train_text), 32, 2, 0).batch(0)
  logp_NBTV = jax.nn.log_softmax(all_layer_logits(ckpt.model, jnp.asarray(inputs)), -1)
  nll_NBT = -np.take_along_axis(np.asarray(logp_NBTV), targets[None, ..., None], -1)[..., 0]
  want = float(np.dot(losses.resolve_loss_weights("sum_l", 2), nll_NBT.mean(axis=(1, 2))))
  np.testing.assert_allclose(_first_loss(str(tmp_path / "init")), want, rtol=1e-5)
  # The run saved a checkpoint of the imported architecture with its tokenizer.
  assert checkpoint.load_checkpoint(str(tmp_path / "init")).model.config == cfg.model

  train(cfg, str(tmp_path / "fresh"))  # The same model config, initialised afresh.
  assert abs(_first_loss(str(tmp_path / "fresh")) - want) > 1e-2


def test_init_from_refuses_a_conflicting_model_section_in_one_line(config_dict, corpus_file):
  init_model = checkpoint.read_model_config(GPT2)
  with pytest.raises(UserError, match=r"conflicts with the checkpoint's model: .*"
                     r"num_heads=2 \(checkpoint: 4\).*drop these fields"):
    ExperimentConfig.from_dict(config_dict(), init_model=init_model)
  layerskip = load_config_file(os.path.join(os.path.dirname(__file__), os.pardir, "experiments",
                                            "configs", "layerskip_continue.py"))
  layerskip.data.train_file = corpus_file
  layerskip.data.seq_len = 32
  cfg = ExperimentConfig.from_dict(layerskip, init_model=init_model)
  assert cfg.loss_weights == "sum_l" and cfg.recipe.layer_dropout > 0
  assert cfg.recipe.curriculum == "rotational" and cfg.model.remat == "full"
