"""Training loop and the `deepexit-train` binary for deep-supervision models.

Usage:
  deepexit-train --config=experiments/configs/reference.py --workdir=/tmp/ref
  deepexit-train --config=experiments/configs/reference.py --workdir=/tmp/ref --resume
  deepexit-train --config=experiments/configs/demo.py --config.train.epochs=2 ...
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import flags, logging
from flax import nnx
from ml_collections import config_flags

from deepexit_jax import checkpoint, cli, data, tokenizers, xla_options
from deepexit_jax.config import ExperimentConfig, TrainConfig
from deepexit_jax.errors import UserError
from deepexit_jax.losses import deep_supervision_loss, resolve_loss_weights, token_nll
from deepexit_jax.model import DeepSupervisionTransformer, create_model

METRICS_JSONL = "metrics.jsonl"


class TrainingDiverged(UserError):
  """The loss became NaN or infinite; the last good checkpoint is kept."""


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training, in one place."""

  params: nnx.State
  opt_state: optax.OptState
  step: jax.Array


@dataclasses.dataclass
class TrainResult:
  """What `train` returns.

  Attributes:
    model: the BEST model by validation PPL (the one saved in workdir/best).
    tokenizer: the tokenizer it was trained with.
    history: one dict per evaluation (step, epoch, layer_ppl, ...).
    best: the evaluation record of the best model.
    workdir: where checkpoints and metrics were written.
    steps: training steps run in total (including resumed ones).
  """

  model: DeepSupervisionTransformer
  tokenizer: Any
  history: list[dict[str, Any]]
  best: dict[str, Any]
  workdir: str
  steps: int


def make_optimizer(cfg: TrainConfig, total_steps: int) -> optax.GradientTransformation:
  """AdamW with linear warm-up, cosine decay and global-norm gradient clipping."""
  warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1),
      end_value=cfg.learning_rate * cfg.min_lr_ratio)

  def decay_mask(params):
    # Decay weight matrices only; biases, LayerNorm and embeddings are left alone.
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "kernel" in jax.tree_util.keystr(path), params)

  parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
  parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay,
                           mask=decay_mask))
  return optax.chain(*parts)


def layer_nll(model: DeepSupervisionTransformer, inputs_BT: jax.Array, targets_BT: jax.Array,
              weights_N: np.ndarray | None = None,
              dropout_rng: jax.Array | None = None) -> jax.Array:
  """Every layer's per-token NLL [N, B, T] of `targets_BT`.

  The layer scan keeps only hidden states; the exit head then runs outside it as
  one batched matmul per group of layers. With `weights_N` (static numpy), layers
  of zero weight are computed under `stop_gradient`: still reported, but no
  backward pass through their head.
  """
  hidden_NBTD = model(inputs_BT, per_layer_fn=lambda h: None,
                      dropout_rng=dropout_rng).hidden_NBTD
  n = hidden_NBTD.shape[0]
  trained = list(range(n)) if weights_N is None else [i for i in range(n) if weights_N[i] > 0]
  frozen = [i for i in range(n) if i not in trained]
  nll_NBT = [None] * n
  for group, h_GBTD in ((trained, hidden_NBTD[np.asarray(trained, np.int32)]),
                        (frozen, jax.lax.stop_gradient(hidden_NBTD[np.asarray(frozen, np.int32)]))):
    if group:
      nll_GBT = token_nll(model.head(h_GBTD), targets_BT[None])
      for j, i in enumerate(group):
        nll_NBT[i] = nll_GBT[j]
  return jnp.stack(nll_NBT)


class Trainer:
  """Jitted training and evaluation steps for one experiment config."""

  def __init__(self, config: ExperimentConfig, total_steps: int):
    self.config = config
    self.weights_np = resolve_loss_weights(config.loss_weights, config.model.num_layers)
    model = create_model(config.model, seed=config.train.seed)
    self.graphdef, params = nnx.split(model)
    self.tx = make_optimizer(config.train, total_steps)
    self.initial_state = TrainState(params=params, opt_state=self.tx.init(params),
                                    step=jnp.zeros((), jnp.int32))
    self.dropout_key = jax.random.PRNGKey(config.train.seed + 1)
    self.train_step = xla_options.jit(self._train_step, donate_argnums=0)
    self.eval_step = xla_options.jit(self._eval_step)

  def _loss(self, params, inputs_BT, targets_BT, mask_BT, key):
    model = nnx.merge(self.graphdef, params)
    nll_NBT = layer_nll(model, inputs_BT, targets_BT, self.weights_np, dropout_rng=key)
    return deep_supervision_loss(nll_NBT, mask_BT, jnp.asarray(self.weights_np))

  def _train_step(self, state: TrainState, inputs_BT, targets_BT):
    key = None
    if self.config.model.dropout > 0:
      key = jax.random.fold_in(self.dropout_key, state.step)
    mask_BT = jnp.ones(inputs_BT.shape, jnp.float32)
    (loss, layer_nll_N), grads = jax.value_and_grad(self._loss, has_aux=True)(
        state.params, inputs_BT, targets_BT, mask_BT, key)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = TrainState(params=params, opt_state=opt_state, step=state.step + 1)
    return new_state, {"loss": loss, "layer_nll": layer_nll_N}

  def _eval_step(self, params, inputs_BT, targets_BT, mask_BT):
    model = nnx.merge(self.graphdef, params)
    nll_NBT = layer_nll(model, inputs_BT, targets_BT)
    return jnp.sum(nll_NBT * mask_BT, axis=(1, 2)), jnp.sum(mask_BT)

  def evaluate(self, params, batches: data.EvalBatches) -> dict[str, Any]:
    """Per-layer validation NLL and PPL over the whole validation text, once."""
    total_N, count = 0.0, 0.0
    for b in range(batches.inputs.shape[0]):
      s_N, c = self.eval_step(params, batches.inputs[b], batches.targets[b], batches.mask[b])
      total_N, count = total_N + s_N, count + c
    nll = np.asarray(total_N) / float(count)
    weighted = float(np.dot(self.weights_np, nll))
    return {"layer_nll": nll.tolist(), "layer_ppl": np.exp(nll).tolist(), "loss": weighted,
            "tokens": int(count)}

  def model(self, params) -> DeepSupervisionTransformer:
    return nnx.merge(self.graphdef, params)


def selection_layer(config: ExperimentConfig) -> int:
  """1-based layer whose validation PPL picks the best checkpoint.

  The deepest layer with a positive loss weight: for the reference weights
  {2: 0.7, 4: 0.3} the full-depth layer 4, for a static model its last layer.
  """
  weights = resolve_loss_weights(config.loss_weights, config.model.num_layers)
  return int(np.nonzero(weights)[0][-1]) + 1


def _format_ppl(layer_ppl: Sequence[float]) -> str:
  return " ".join(f"L{i + 1} {p:.2f}" for i, p in enumerate(layer_ppl))


def _diverged(what: str, value: float, step: int, latest: ocp.CheckpointManager,
              latest_dir: str) -> TrainingDiverged:
  return TrainingDiverged(
      f"{what} became {value} at step {step}; kept the last good checkpoint (step "
      f"{latest.latest_step()}) in {latest_dir}: lower train.learning_rate or raise "
      "train.warmup_steps, then --resume")


def _append_jsonl(path: str, record: dict[str, Any]) -> None:
  with open(path, "a") as f:
    f.write(json.dumps(record) + "\n")


def train(config: ExperimentConfig, workdir: str, *, resume: bool = False,
          stop_at_step: int | None = None) -> TrainResult:
  """Trains a deep-supervision model, evaluating and checkpointing as configured.

  Args:
    config: the experiment.
    workdir: receives config.json, tokenizer.json, model.json, metrics.jsonl,
      best/ (best model by validation PPL) and latest/ (state for resuming).
    resume: continue from workdir/latest; the continuation equals an
      uninterrupted run (same data order, dropout keys and schedule).
    stop_at_step: stop (after checkpointing) once this step is reached, as if
      the run were killed there; used to test resumption.

  Returns:
    A `TrainResult` holding the best model.

  Raises:
    UserError: bad data or config, an unwritable or already used workdir, or a
      diverged loss (`TrainingDiverged`, after keeping the last good checkpoint).
  """
  checkpoint.ensure_writable(workdir)
  latest_dir = os.path.join(workdir, checkpoint.LATEST)
  has_state = os.path.isdir(latest_dir) and any(
      name.isdigit() for name in os.listdir(latest_dir))
  if has_state and not resume:
    raise UserError(f"{workdir} already holds a training run: pass --resume to continue it "
                    "or choose a new --workdir")
  tokenizer = None
  config_path = os.path.join(workdir, checkpoint.CONFIG_JSON)
  if resume and has_state:
    stored = checkpoint.read_json(config_path)
    stored_cfg = ExperimentConfig.from_dict(stored)
    mismatch = [k for k in ("model", "data", "loss_weights")
                if stored[k] != config.with_vocab_size(stored_cfg.model.vocab_size).to_dict()[k]]
    if mismatch:
      raise UserError(f"--resume with a config whose {', '.join(mismatch)} differ(s) from "
                      f"the run in {workdir}: resume with the config it was started with")
    tokenizer = tokenizers.load_tokenizer(
        os.path.join(workdir, checkpoint.TOKENIZER_JSON))

  dataset = data.prepare_dataset(config.data, tokenizer=tokenizer)
  config = config.with_vocab_size(dataset.tokenizer.vocab_size)
  batches = data.TrainBatches(dataset.train_tokens, config.data.seq_len,
                              config.data.batch_size, config.train.seed)
  eval_batches = data.eval_batches(dataset.val_tokens, config.data.seq_len,
                                   config.data.batch_size)
  steps_per_epoch = batches.steps_per_epoch
  total_steps = config.train.max_steps or config.train.epochs * steps_per_epoch
  eval_every = config.train.eval_every or steps_per_epoch
  sel = selection_layer(config)

  checkpoint.write_model_config(workdir, config.model)
  checkpoint.write_json(config_path, config.to_dict())
  tokenizers.save_tokenizer(dataset.tokenizer,
                                       os.path.join(workdir, checkpoint.TOKENIZER_JSON))
  metrics_path = os.path.join(workdir, METRICS_JSONL)

  trainer = Trainer(config, total_steps)
  state = trainer.initial_state
  best: dict[str, Any] = {}
  history: list[dict[str, Any]] = []
  latest = checkpoint.manager(latest_dir)
  if resume and has_state:
    step = latest.latest_step()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    restored = checkpoint.restore_params(
        latest, step, abstract.params, latest_dir,
        opt_state=ocp.args.StandardRestore(abstract.opt_state), meta=ocp.args.JsonRestore())
    state = TrainState(params=restored.params, opt_state=restored.opt_state,
                       step=jnp.asarray(restored.meta["step"], jnp.int32))
    best, history = restored.meta["best"], restored.meta["history"]
    logging.info("resumed %s at step %d", workdir, restored.meta["step"])

  logging.info("%s: %d train / %d validation tokens, vocab %d, %d steps/epoch, %d steps",
               dataset.corpus.description, dataset.train_tokens.size, dataset.val_tokens.size,
               dataset.tokenizer.vocab_size, steps_per_epoch, total_steps)

  def save_latest(step: int) -> None:
    latest.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(state.params),
        opt_state=ocp.args.StandardSave(state.opt_state),
        meta=ocp.args.JsonSave({"step": step, "best": best, "history": history})), force=True)

  step = int(state.step)
  tokens_per_step = config.data.seq_len * config.data.batch_size
  window_start, window_step = time.perf_counter(), step
  run_start, run_start_step = window_start, step
  end = total_steps if stop_at_step is None else min(total_steps, stop_at_step)
  while step < end:
    inputs, targets = batches.batch(step)
    state, metrics = trainer.train_step(state, inputs, targets)
    step += 1
    is_eval = step % eval_every == 0 or step == total_steps
    if step % config.train.log_every == 0 or is_eval or step == end:
      loss = float(metrics["loss"])
      if not math.isfinite(loss):
        raise _diverged("loss", loss, step, latest, latest_dir)
      now = time.perf_counter()
      rate = (step - window_step) * tokens_per_step / max(now - window_start, 1e-9)
      eta = (end - step) * (now - run_start) / max(step - run_start_step, 1)
      layer_ppl = np.exp(np.asarray(metrics["layer_nll"])).tolist()
      logging.info("step %d/%d | loss %.4f | ppl %s | %.0f tok/s | ETA %s", step, total_steps,
                   loss, _format_ppl(layer_ppl), rate, time.strftime("%H:%M:%S",
                                                                     time.gmtime(eta)))
      _append_jsonl(metrics_path, {"kind": "train", "step": step, "loss": loss,
                                   "layer_ppl": layer_ppl, "tokens_per_s": rate})
      window_start, window_step = time.perf_counter(), step
    if is_eval:
      record = trainer.evaluate(state.params, eval_batches)
      record.update(step=step, epoch=step / steps_per_epoch, selection_layer=sel)
      if not math.isfinite(record["loss"]):
        raise _diverged("validation loss", record["loss"], step, latest, latest_dir)
      history.append(record)
      _append_jsonl(metrics_path, {"kind": "eval", **record})
      improved = not best or record["layer_ppl"][sel - 1] < best["layer_ppl"][sel - 1]
      logging.info("eval step %d (epoch %.2f) | val ppl %s%s", step, record["epoch"],
                   _format_ppl(record["layer_ppl"]), " | best" if improved else "")
      if improved:
        best = record
        checkpoint.save_model(trainer.model(state.params), workdir, step=step, metrics=record)
      save_latest(step)
      window_start = time.perf_counter()  # Evaluation time is not training throughput.
  if step == end and (not history or history[-1]["step"] != step):
    save_latest(step)
  latest.close()
  if not best:
    raise UserError(f"training stopped at step {step} before its first evaluation: "
                    "nothing was saved as best; --resume to finish it")
  ckpt = checkpoint.load_checkpoint(workdir)
  return TrainResult(model=ckpt.model, tokenizer=dataset.tokenizer, history=history, best=best,
                     workdir=workdir, steps=step)


def run() -> None:
  """Console-script entry point; flags are defined here so importing stays flag-free."""
  config_flag = config_flags.DEFINE_config_file(
      "config", None, "Experiment config file (experiments/configs/*.py); fields can be "
      "overridden, e.g. --config.train.epochs=2.", lock_config=True)
  workdir_flag = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
  resume_flag = flags.DEFINE_bool("resume", False, "Continue the run in --workdir.")

  def main(argv: Sequence[str]) -> None:
    del argv
    if config_flag.value is None:
      raise UserError("--config is required, e.g. --config=experiments/configs/reference.py")
    if not workdir_flag.value:
      raise UserError("--workdir is required: the directory for checkpoints and metrics")
    cli.log_devices()
    try:
      experiment = ExperimentConfig.from_dict(config_flag.value)
    except OSError as e:  # config_flags reports an unloadable --config file only when used.
      raise UserError(f"cannot load --config: {' '.join(str(e).split())}") from None
    result = train(experiment, workdir_flag.value,
                   resume=resume_flag.value)
    best = result.best
    print(f"best validation PPL by layer (step {best['step']}): "
          f"{_format_ppl(best['layer_ppl'])}")
    print(f"checkpoint: {os.path.abspath(result.workdir)}")

  cli.run_main(main)


if __name__ == "__main__":
  run()
