"""Tests for training: learning real text, checkpoints, exact resume, bad inputs, the binary."""

import dataclasses
import glob
import itertools
import json
import math
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from tensorboardX.proto import event_pb2

from deepexit_jax import checkpoint, data, tokenizers
from deepexit_jax.config import ExperimentConfig
from deepexit_jax.errors import UserError
from deepexit_jax.losses import deep_supervision_loss, token_nll
from deepexit_jax.model import ModelConfig, all_layer_logits, create_model
from deepexit_jax.train import Trainer, TrainingDiverged, layer_nll, train

# Matches the `config_dict` fixture: 40 steps, evaluations every 8.
STEPS = 40
EVAL_STEPS = [8, 16, 24, 32, 40]
# Exploding updates; only the train section differs, so a run can resume with it.
HUGE_LR = 1e30


@pytest.fixture(scope="module")
def trained(tiny_config, tmp_path_factory):
  """One uninterrupted training run shared by the tests below: (config, TrainResult)."""
  config = tiny_config()
  return config, train(config, str(tmp_path_factory.mktemp("trained") / "run"))


def _copy_run(trained, tmp_path) -> str:
  """A private copy of the shared run's workdir, for tests that try to misuse it."""
  workdir = str(tmp_path / "run")
  shutil.copytree(trained[1].workdir, workdir)
  return workdir


def _params(model):
  return nnx.state(model, nnx.Param)


def _latest(workdir: str):
  """(step, params, meta) of the resumable state in workdir/latest."""
  _, state = nnx.split(checkpoint.abstract_model(checkpoint.read_model_config(workdir)))
  path = os.path.join(workdir, checkpoint.LATEST)
  with checkpoint.manager(path) as mgr:
    step = mgr.latest_step()
    restored = checkpoint.restore_params(mgr, step, state, path, meta=ocp.args.JsonRestore())
  return step, restored.params, restored.meta


def _eval_records(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  return [{k: v for k, v in r.items() if k != "kind"} for r in records if r["kind"] == "eval"]


def _metrics(workdir: str) -> list[dict]:
  """Every record of metrics.jsonl, in file order."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _tensorboard(workdir: str) -> dict[str, dict[int, float]]:
  """What TensorBoard shows of the workdir's event files: {tag: {step: value}}.

  Reads the TFRecord framing (length, its CRC, the Event proto, its CRC) and applies
  TensorBoard's restart rule: a `SessionLog.START` at step s hides older values at
  steps >= s. Files are taken in the order they were started.
  """
  files = []
  for name in glob.glob(os.path.join(workdir, "events.out.tfevents.*")):
    with open(name, "rb") as f:
      raw, events, pos = f.read(), [], 0
    while pos < len(raw):
      (length,) = struct.unpack("<Q", raw[pos:pos + 8])
      events.append(event_pb2.Event.FromString(raw[pos + 12:pos + 12 + length]))
      pos += 12 + length + 4
    files.append(events)
  scalars: dict[str, dict[int, float]] = {}
  for event in itertools.chain(*sorted(files, key=lambda events: events[0].wall_time)):
    if event.session_log.status == event_pb2.SessionLog.START:
      scalars = {tag: {s: v for s, v in by_step.items() if s < event.step}
                 for tag, by_step in scalars.items()}
    for value in event.summary.value:
      scalars.setdefault(value.tag, {})[event.step] = value.simple_value
  return scalars


def _expected_tensorboard(records: list[dict]) -> dict[str, dict[int, float]]:
  """The scalars metrics.jsonl's records should appear as, at float32 precision."""
  expected: dict[str, dict[int, float]] = {}
  for r in records:
    prefix = {"train": "train", "eval": "val"}[r["kind"]]
    values = {"loss": r["loss"], **{f"ppl/layer_{i + 1}": p for i, p in enumerate(r["layer_ppl"])}}
    if r["kind"] == "train":
      values.update(learning_rate=r["learning_rate"], tokens_per_s=r["tokens_per_s"])
    for name, value in values.items():
      expected.setdefault(f"{prefix}/{name}", {})[r["step"]] = float(np.float32(value))
  return expected


# Learning and what a run leaves behind.


def test_training_lowers_the_validation_loss(trained):
  config, result = trained
  dataset = data.prepare_dataset(config.data)
  trainer = Trainer(config.with_vocab_size(dataset.vocab_size), STEPS)
  batches = data.eval_batches(dataset.val_tokens, config.data.seq_len, config.data.batch_size)
  untrained = trainer.evaluate(trainer.initial_state.params, batches)

  assert untrained["loss"] == pytest.approx(math.log(dataset.vocab_size), abs=0.3)
  assert result.best["loss"] < untrained["loss"] - 0.5
  for layer, (after, before) in enumerate(zip(result.best["layer_ppl"], untrained["layer_ppl"])):
    assert after < 0.6 * before, f"layer {layer + 1} did not learn"
  # The returned model is the one that scored `best`.
  again = trainer.evaluate(nnx.split(result.model)[1], batches)
  chex.assert_trees_all_close(again["layer_nll"], result.best["layer_nll"], rtol=1e-5)


def test_training_writes_history_metrics_and_checkpoints(trained):
  config, result = trained
  workdir = result.workdir
  assert result.steps == STEPS
  assert [r["step"] for r in result.history] == EVAL_STEPS
  for name in ("best", "latest"):
    assert os.path.isdir(os.path.join(workdir, name))
  for name in ("model.json", "tokenizer.json", "config.json", "metrics.jsonl"):
    assert os.path.isfile(os.path.join(workdir, name))
  assert _eval_records(workdir) == result.history
  # Best = lowest validation PPL of the deepest layer with a loss weight (layer 2).
  assert result.best == min(result.history, key=lambda r: r["layer_ppl"][1])
  assert all(r["selection_layer"] == 2 for r in result.history)

  step, latest_params, meta = _latest(workdir)
  assert step == STEPS and meta["step"] == STEPS and meta["history"] == result.history
  chex.assert_tree_all_finite(latest_params)


def test_tensorboard_events_hold_the_metrics_of_metrics_jsonl(trained):
  """`tensorboard --logdir WORKDIR` shows per-layer PPL (train and validation), the loss,
  the learning rate and tokens/s, with the values of metrics.jsonl."""
  config, result = trained
  records = _metrics(result.workdir)
  assert _tensorboard(result.workdir) == _expected_tensorboard(records)
  assert set(_tensorboard(result.workdir)) == {
      "train/loss", "train/learning_rate", "train/tokens_per_s", "train/ppl/layer_1",
      "train/ppl/layer_2", "val/loss", "val/ppl/layer_1", "val/ppl/layer_2"}
  # The rate logged at step s is the one of the update that made step s (the first is 0).
  schedule = optax.warmup_cosine_decay_schedule(0.0, 1e-2, 5, STEPS, 1e-3)
  for r in records:
    if r["kind"] == "train":
      assert r["learning_rate"] == pytest.approx(float(schedule(r["step"] - 1)), rel=1e-6)
      assert r["tokens_per_s"] > 0


def test_load_checkpoint_returns_the_trained_model_and_tokenizer(trained):
  config, result = trained
  ckpt = checkpoint.load_checkpoint(result.workdir)
  chex.assert_trees_all_equal(_params(ckpt.model), _params(result.model))
  assert ckpt.step == result.best["step"]
  assert ckpt.metrics == result.best
  assert ckpt.model.config == result.model.config
  assert ckpt.model.config.vocab_size == result.tokenizer.vocab_size
  assert ckpt.experiment == json.loads(json.dumps(
      config.with_vocab_size(result.tokenizer.vocab_size).to_dict()))

  assert ckpt.tokenizer == result.tokenizer
  text = data.load_corpus(config.data).val_text[:500]
  ids = ckpt.tokenizer.encode(text)
  np.testing.assert_array_equal(ids, result.tokenizer.encode(text))
  assert ckpt.tokenizer.decode(ids) == text
  # The loaded model and tokenizer work together: finite logits for real text.
  logits = all_layer_logits(ckpt.model, ids[None, :config.data.seq_len])
  chex.assert_shape(logits, (2, 1, config.data.seq_len, ckpt.tokenizer.vocab_size))
  chex.assert_tree_all_finite(logits)


@pytest.mark.parametrize("zero_weight_layers", [True, False])
def test_training_loss_equals_weighted_nll_of_all_layer_logits(zero_weight_layers):
  """The training loss (heads outside the scan, zero-weight layers frozen or skipped) is
  the plain one."""
  cfg = ModelConfig(vocab_size=19, num_layers=3, dim=16, num_heads=2, ffn_dim=24, max_len=16)
  graphdef, params = nnx.split(create_model(cfg))
  tokens = jax.random.randint(jax.random.key(0), (4, 17), 0, cfg.vocab_size)
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  mask = jnp.ones(inputs.shape).at[0, 10:].set(0.0)
  weights = np.asarray([0.0, 0.7, 0.3], np.float32)

  def training_loss(p):
    nll = layer_nll(nnx.merge(graphdef, p), inputs, targets, weights,
                    zero_weight_layers=zero_weight_layers)
    return deep_supervision_loss(nll, mask, jnp.asarray(weights))

  def reference_loss(p):
    nll = token_nll(all_layer_logits(nnx.merge(graphdef, p), inputs), targets[None])
    return deep_supervision_loss(nll, mask, jnp.asarray(weights))

  (loss, per_layer), grads = jax.jit(jax.value_and_grad(training_loss, has_aux=True))(params)
  (ref_loss, ref_per_layer), ref_grads = jax.jit(
      jax.value_and_grad(reference_loss, has_aux=True))(params)
  chex.assert_trees_all_close(loss, ref_loss, rtol=1e-5)
  if zero_weight_layers:  # Layer 1 has weight 0 but its NLL is still reported ...
    chex.assert_trees_all_close(per_layer, ref_per_layer, rtol=1e-5)
  else:  # ... or its head is skipped.
    assert float(per_layer[0]) == 0.0
    chex.assert_trees_all_close(per_layer[1:], ref_per_layer[1:], rtol=1e-5)
  chex.assert_trees_all_close(grads, ref_grads, atol=1e-6, rtol=1e-4)


def test_train_step_skips_zero_weight_heads_and_report_step_gives_every_layer(tiny_config):
  """The optimiser step runs no exit head for a zero-weight layer (its metric is NaN);
  `report_step`, which the loop calls on logging steps, gives every layer's NLL with the
  step's own dropout, equal to the step's NLL where both exist."""
  cfg = dataclasses.replace(tiny_config(num_devices=1), loss_weights="2:1").with_vocab_size(40)
  trainer = Trainer(cfg, total_steps=10)
  x = np.random.default_rng(0).integers(0, 40, (8, 32)).astype(np.int32)
  x, y = trainer.shard(x, np.roll(x, -1, 1))
  state = trainer.initial_state
  step = jnp.asarray(3, jnp.int32)
  state = state.replace(step=step)
  key = jax.random.fold_in(trainer.dropout_key, step)
  expected = layer_nll(trainer.model(state.params), x, y, dropout_rng=key).mean(axis=(1, 2))
  report = trainer.report_step(state.params, x, y, state.step)
  _, metrics = trainer.train_step(state, x, y)
  chex.assert_trees_all_close(report, expected, rtol=1e-5)
  assert np.isnan(metrics["layer_nll"][0]) and np.isfinite(metrics["layer_nll"][1])
  chex.assert_trees_all_close(metrics["layer_nll"][1], report[1], rtol=1e-5)
  chex.assert_trees_all_close(metrics["loss"], report[1], rtol=1e-5)
  # The loss runs the exit head (a matmul with V outputs) on layer 2's B * T states only.
  def head_rows(jaxpr):
    return sum(math.prod(e.outvars[0].aval.shape[:-1]) for e in jaxpr.eqns
               if e.primitive.name == "dot_general" and e.outvars[0].aval.shape[-1:] == (40,))
  state = trainer.initial_state
  mask = jnp.ones(x.shape, jnp.float32)
  assert head_rows(jax.make_jaxpr(trainer._loss)(state.params, x, y, mask, step).jaxpr) == x.size
  assert head_rows(jax.make_jaxpr(trainer._report_step)(
      state.params, x, y, step).jaxpr) == 2 * x.size


# Resuming.


def test_resume_after_a_kill_equals_an_uninterrupted_run(trained, tiny_config, tmp_path):
  config, uninterrupted = trained
  workdir = str(tmp_path / "run")
  # Killed at step 20, between the evaluations at 16 and 24; dropout is on (0.1), so
  # equality also needs the same dropout keys after the restart.
  partial = train(config, workdir, stop_at_step=20)
  assert partial.steps == 20
  assert [r["step"] for r in partial.history] == [8, 16]
  assert _latest(workdir)[0] == 20

  resumed = train(tiny_config(), workdir, resume=True)
  assert resumed.steps == STEPS
  chex.assert_trees_all_close(resumed.history, uninterrupted.history, rtol=1e-6)
  assert resumed.best["step"] == uninterrupted.best["step"]
  chex.assert_trees_all_close(_eval_records(workdir), _eval_records(uninterrupted.workdir),
                              rtol=1e-6)
  chex.assert_trees_all_close(_latest(workdir)[1], _latest(uninterrupted.workdir)[1],
                              atol=1e-6, rtol=1e-6)
  chex.assert_trees_all_close(_params(resumed.model), _params(uninterrupted.model),
                              atol=1e-6, rtol=1e-6)


# A training run that hangs before the step after HANG_AT (the test kills it there).
_HANGING_RUN = """
import json, sys, time
from deepexit_jax import data
from deepexit_jax.config import ExperimentConfig
from deepexit_jax.train import train

batch = data.TrainBatches.batch
def batch_or_hang(self, step):
  if step == int(sys.argv[3]):
    time.sleep(600)
  return batch(self, step)
data.TrainBatches.batch = batch_or_hang
train(ExperimentConfig.from_dict(json.loads(sys.argv[1])), sys.argv[2])
"""


def _state(workdir: str) -> tuple[int, dict]:
  """(step, everything) of the resumable state in workdir/latest, restored as stored."""
  path = os.path.join(workdir, checkpoint.LATEST)
  with checkpoint.manager(path) as mgr:
    step = mgr.latest_step()
    restored = mgr.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(), opt_state=ocp.args.StandardRestore(),
        meta=ocp.args.JsonRestore()))
  return step, dict(restored)


def test_kill_9_after_a_periodic_checkpoint_then_resume_equals_an_uninterrupted_run(
    trained, config_dict, tiny_config, tmp_path):
  """train.checkpoint_every=6 saves latest/ at 6, 12, 18 besides the evaluations (8, 16,
  ...). The run is killed with SIGKILL after logging step 20, so steps 19 and 20 and their
  metrics are lost; --resume continues from 18 to the uninterrupted run's exact state."""
  _, uninterrupted = trained
  workdir = tmp_path / "run"
  proc = subprocess.Popen(
      [sys.executable, "-c", _HANGING_RUN, json.dumps(config_dict(checkpoint_every=6)),
       str(workdir), "20"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.monotonic() + 120
    while not (workdir / "metrics.jsonl").exists() or '"step": 20' not in (
        workdir / "metrics.jsonl").read_text():
      assert proc.poll() is None, proc.communicate()[1][-3000:]
      assert time.monotonic() < deadline, "the run did not reach step 20"
      time.sleep(0.05)
  finally:
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
  assert proc.returncode == -signal.SIGKILL
  assert _state(str(workdir))[0] == 18  # The periodic checkpoint; 16 was the last evaluation.
  assert any(r["step"] == 20 for r in _metrics(str(workdir)))

  resumed = train(tiny_config(checkpoint_every=6), str(workdir), resume=True)
  assert resumed.steps == STEPS
  (step, state), (ref_step, ref_state) = _state(str(workdir)), _state(uninterrupted.workdir)
  assert step == ref_step == STEPS
  chex.assert_trees_all_equal(state, ref_state)  # Parameters, optimizer state, history.

  def timeless(records):  # Throughput is the one figure that differs between runs.
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records]

  records = _metrics(str(workdir))
  assert timeless(records) == timeless(_metrics(uninterrupted.workdir))
  shown = _tensorboard(str(workdir))
  assert shown == _expected_tensorboard(records)  # The lost step 20 is hidden, then redone.
  assert {t: v for t, v in shown.items() if t != "train/tokens_per_s"} == {
      t: v for t, v in _tensorboard(uninterrupted.workdir).items() if t != "train/tokens_per_s"}


def test_divergence_keeps_the_last_good_checkpoint_and_resume_recovers(
    trained, tiny_config, tmp_path):
  _, uninterrupted = trained
  workdir = str(tmp_path / "run")
  train(tiny_config(), workdir, stop_at_step=16)  # Evaluated and saved at step 16.

  with pytest.raises(TrainingDiverged) as info:
    train(tiny_config(learning_rate=HUGE_LR), workdir, resume=True)
  assert isinstance(info.value, UserError)
  message = str(info.value)
  for words in ("loss became", "step 16", "learning_rate", "--resume"):
    assert words in message

  step, params, meta = _latest(workdir)  # Intact and loadable.
  assert step == 16
  chex.assert_tree_all_finite(params)
  assert [r["step"] for r in meta["history"]] == [8, 16]
  assert checkpoint.load_checkpoint(workdir).step in (8, 16)

  # As the message says: resume with a sane learning rate; it continues exactly.
  recovered = train(tiny_config(), workdir, resume=True)
  chex.assert_trees_all_close(recovered.history, uninterrupted.history, rtol=1e-6)


def test_divergence_before_any_checkpoint_says_there_is_nothing_to_resume(tiny_config, tmp_path):
  workdir = str(tmp_path / "run")
  with pytest.raises(TrainingDiverged) as info:  # Explodes at step 3; the first save is at 8.
    train(tiny_config(learning_rate=HUGE_LR, log_every=1), workdir)
  message = str(info.value)
  for words in ("loss became", "before any checkpoint", "nothing to resume", "learning_rate",
                "train again"):
    assert words in message, message
  assert "None" not in message and "--resume" not in message
  assert checkpoint.manager(os.path.join(workdir, "latest")).latest_step() is None

  # As the message says: train again, in the same workdir; the diverged records are gone.
  train(tiny_config(), workdir, stop_at_step=8)
  assert [(r["kind"], r["step"]) for r in _metrics(workdir)] == [("train", 8), ("eval", 8)]
  assert _tensorboard(workdir) == _expected_tensorboard(_metrics(workdir))


def test_divergence_between_logging_steps_never_reaches_a_periodic_checkpoint(
    tiny_config, tmp_path):
  """checkpoint_every=1 saves at steps whose loss is never fetched (logging every 10): the
  update of step 2 explodes and step 3's is NaN; latest/ must keep a finite state."""
  workdir = str(tmp_path / "run")
  with pytest.raises(TrainingDiverged, match="non-finite.*kept the last good checkpoint"):
    train(tiny_config(learning_rate=HUGE_LR, checkpoint_every=1), workdir)
  chex.assert_tree_all_finite(_latest(workdir)[1])


def test_divergence_seen_first_by_an_evaluation_does_not_replace_the_good_checkpoint(
    tiny_config, tmp_path):
  """Evaluating every step: the update of step 2 explodes (step 1 has warm-up LR 0).

  The evaluation at step 2 is the first to see it; the step-2 state must not be saved
  over the good step-1 checkpoint that the divergence message promises to keep.
  """
  workdir = str(tmp_path / "run")
  with pytest.raises(TrainingDiverged):
    train(tiny_config(learning_rate=HUGE_LR, eval_every=1, log_every=1), workdir)
  step, params, meta = _latest(workdir)
  assert all(math.isfinite(r["loss"]) for r in meta["history"]), (
      f"latest/ (step {step}) holds a diverged state: {[r['loss'] for r in meta['history']]}")
  best = checkpoint.load_checkpoint(workdir)
  assert math.isfinite(best.metrics["loss"])


# Bad inputs.


def test_resume_may_change_execution_options(trained, config_dict, tmp_path):
  """remat and attention chunks change how, not what, the model computes: a run resumes
  under new ones (and model.json records them)."""
  workdir = _copy_run(trained, tmp_path)
  d = config_dict(max_steps=48)
  d["model"].update(remat="attention", attention_chunks=1)
  result = train(ExperimentConfig.from_dict(d), workdir, resume=True)
  assert result.steps == 48
  assert checkpoint.read_model_config(workdir).remat == "attention"


def test_reusing_a_workdir_without_resume_is_refused(trained, tmp_path):
  workdir = _copy_run(trained, tmp_path)
  with pytest.raises(UserError, match="already holds a training run.*--resume"):
    train(trained[0], workdir)


@pytest.mark.parametrize("section, changes, words", [
    ("model", {"dim": 16}, ["model", "differ"]),
    ("model", {"num_layers": 3}, ["model", "differ"]),
    ("data", {"seq_len": 16}, ["data", "differ"]),
    (None, {"loss_weights": "2:1"}, ["loss_weights", "differ"]),
])
def test_resume_with_another_config_is_refused(trained, config_dict, tmp_path, section, changes,
                                               words):
  workdir = _copy_run(trained, tmp_path)
  d = config_dict()
  (d[section] if section else d).update(changes)
  with pytest.raises(UserError) as info:
    train(ExperimentConfig.from_dict(d), workdir, resume=True)
  for word in words:
    assert word in str(info.value)
  assert _latest(workdir)[0] == STEPS  # Untouched.


@pytest.mark.parametrize("kind", ["parent_is_a_file", "workdir_is_a_file"])
def test_unwritable_workdir_is_refused(tiny_config, tmp_path, kind):
  # Tests run as root, which ignores permission bits: a regular file in the path
  # is what makes the directory impossible to create.
  a_file = tmp_path / "a_file"
  a_file.write_text("not a directory")
  workdir = a_file / "run" if kind == "parent_is_a_file" else a_file
  with pytest.raises(UserError, match="cannot write to directory.*writable --workdir"):
    train(tiny_config(), str(workdir))


@pytest.mark.parametrize("section, changes, words", [
    (None, {"loss_weights": "1:0.5,3:0.5"}, ["layer 3", "1..2", "loss.weights"]),
    (None, {"loss_weights": "0:1"}, ["layer 0", "1..2"]),
    (None, {"exit_layers": [3]}, ["exit_layers", "1..2"]),
    (None, {"exit_layers": [2, 1]}, ["exit_layers", "ascending"]),
    (None, {"exit_layers": []}, ["exit_layers", "non-empty"]),
    ("data", {"seq_len": 64}, ["data.seq_len=64", "model.max_len=32"]),
    ("model", {"num_heads": 3}, ["model.num_heads=3", "model.dim=32"]),
    ("train", {"learning_rate": -1.0}, ["train.learning_rate"]),
    ("train", {"warmup": 5}, ["unknown train field", "warmup"]),
    ("train", {"checkpoint_every": -1}, ["train.checkpoint_every", ">= 0", "-1"]),
])
def test_bad_experiment_config_is_refused(config_dict, section, changes, words):
  d = config_dict()
  (d[section] if section else d).update(changes)
  with pytest.raises(UserError) as info:
    ExperimentConfig.from_dict(d)
  for word in words:
    assert word in str(info.value)


@pytest.mark.parametrize("exists", [True, False])
def test_load_model_without_model_json_is_refused(tmp_path, exists):
  directory = tmp_path / "dir"
  if exists:
    directory.mkdir()
    (directory / "best").mkdir()
  with pytest.raises(UserError, match="not a deepexit checkpoint.*model.json"):
    checkpoint.load_model(str(directory))


@pytest.mark.parametrize("changes", [
    {"dim": 64}, {"num_layers": 3}, {"vocab_size": 50}, {"tie_embeddings": True},
])
def test_load_model_whose_model_json_was_edited_is_refused(trained, tmp_path, changes):
  workdir = _copy_run(trained, tmp_path)
  path = os.path.join(workdir, "model.json")
  with open(path) as f:
    stored = json.load(f)
  with open(path, "w") as f:
    json.dump({**stored, **changes}, f)
  with pytest.raises(UserError, match="does not match its model config.*another model"):
    checkpoint.load_model(workdir)


# Saving and loading a model directly.

_CONFIG = ModelConfig(vocab_size=19, num_layers=3, dim=16, num_heads=2, ffn_dim=24, max_len=16)


@pytest.mark.parametrize("tie", [False, True])
def test_save_model_load_model_round_trip(tmp_path, tie):
  cfg = dataclasses.replace(_CONFIG, tie_embeddings=tie)
  model = create_model(cfg, seed=3)
  tok = tokenizers.CharTokenizer.fit("the quick brown fox")
  directory = str(tmp_path / "model")
  assert checkpoint.save_model(model, directory, tokenizer=tok) == directory

  loaded = checkpoint.load_model(directory)
  assert loaded.config == cfg
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, cfg.vocab_size)
  chex.assert_trees_all_equal(all_layer_logits(loaded, tokens), all_layer_logits(model, tokens))
  ckpt = checkpoint.load_checkpoint(directory)
  assert ckpt.tokenizer == tok and ckpt.step == 0 and ckpt.metrics == {}

  # Saving the same model again (e.g. a better step) replaces the stored parameters.
  other = create_model(cfg, seed=4)
  checkpoint.save_model(other, directory, step=7, metrics={"loss": 1.5})
  ckpt = checkpoint.load_checkpoint(directory)
  assert ckpt.step == 7 and ckpt.metrics == {"loss": 1.5}
  chex.assert_trees_all_equal(_params(ckpt.model), _params(other))


def test_save_model_into_a_directory_of_another_model_is_refused(tmp_path):
  directory = str(tmp_path / "model")
  checkpoint.save_model(create_model(_CONFIG), directory)
  abstract_other = nnx.eval_shape(lambda: create_model(dataclasses.replace(_CONFIG, dim=32)))
  with pytest.raises(UserError, match="different model.*dim"):
    checkpoint.save_model(abstract_other, directory)
  assert checkpoint.read_model_config(directory) == _CONFIG


# The binary.

_ABSL_LOG_LINE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d")


def _run_binary(*args: str, cwd) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "deepexit_jax.main.train", *args], cwd=cwd,
                        capture_output=True, text=True, timeout=300)


def _write_config(path, d: dict) -> str:
  path.write_text("import ml_collections\n\n\ndef get_config():\n"
                  f"  return ml_collections.ConfigDict({d!r})\n")
  return str(path)


@pytest.mark.parametrize("case, words", [
    ("no_workdir", ["--workdir is required"]),
    ("missing_train_file", ["missing.txt", "not found", "train_file"]),
    ("missing_config_file", ["no_such_config.py"]),
    ("unknown_config_field", ["nope"]),
])
def test_binary_reports_bad_input_in_one_line(config_dict, tmp_path, case, words):
  d = config_dict()
  if case == "missing_train_file":
    d["data"]["train_file"] = str(tmp_path / "missing.txt")
  config = _write_config(tmp_path / "config.py", d)
  args = {
      "no_workdir": [f"--config={config}"],
      "missing_train_file": [f"--config={config}", f"--workdir={tmp_path / 'run'}"],
      "missing_config_file": [f"--config={tmp_path / 'no_such_config.py'}",
                              f"--workdir={tmp_path / 'run'}"],
      "unknown_config_field": [f"--config={config}", "--config.train.nope=3",
                               f"--workdir={tmp_path / 'run'}"],
  }[case]
  proc = _run_binary(*args, cwd=tmp_path)

  assert proc.returncode != 0
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  # Apart from log records, stderr is exactly one line: the error.
  lines = [line for line in proc.stderr.splitlines()
           if line.strip() and not _ABSL_LOG_LINE.match(line)]
  assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
  for word in words:
    assert word in lines[0]


def test_binary_trains_and_prints_the_best_validation_ppl(config_dict, tmp_path):
  config = _write_config(tmp_path / "config.py", config_dict())
  workdir = tmp_path / "run"
  proc = _run_binary(f"--config={config}", f"--workdir={workdir}", cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  match = re.search(r"^best validation PPL by layer \(step (\d+)\): L1 ([\d.]+) L2 ([\d.]+)$",
                    proc.stdout, re.MULTILINE)
  assert match, proc.stdout
  assert f"checkpoint: {workdir}" in proc.stdout
  ckpt = checkpoint.load_checkpoint(str(workdir))
  assert ckpt.step == int(match.group(1))
  assert [round(p, 2) for p in ckpt.metrics["layer_ppl"]] == [
      float(match.group(2)), float(match.group(3))]
