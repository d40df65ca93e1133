"""Training loop for deep-supervision models (`train`); its binary is `deepexit_jax.main.train`."""

from __future__ import annotations

import dataclasses
import itertools
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
from absl import logging
from flax import nnx
from tensorboardX.event_file_writer import EventsWriter
from tensorboardX.proto import event_pb2, summary_pb2

from deepexit_jax import checkpoint, data, losses, parallel, tokenizers, xla_options
from deepexit_jax.config import INIT_OVERRIDABLE, ExperimentConfig, TrainConfig
from deepexit_jax.errors import UserError
from deepexit_jax.losses import deep_supervision_loss, resolve_loss_weights, token_nll
from deepexit_jax.model import DeepSupervisionTransformer, create_model

METRICS_JSONL = "metrics.jsonl"


class TrainingDiverged(UserError):
  """The loss or the training state became NaN or infinite; the last good checkpoint, if
  one was saved, is kept."""


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


def learning_rate_schedule(cfg: TrainConfig, total_steps: int) -> optax.Schedule:
  """Linear warm-up from 0, then cosine decay to learning_rate * min_lr_ratio.

  `schedule(k)` is the rate of the (k+1)-th optimiser update (the first has rate 0).
  """
  warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1),
      end_value=cfg.learning_rate * cfg.min_lr_ratio)


def make_optimizer(cfg: TrainConfig, total_steps: int) -> optax.GradientTransformation:
  """AdamW with linear warm-up, cosine decay and global-norm gradient clipping."""
  schedule = learning_rate_schedule(cfg, total_steps)

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
              dropout_rng: jax.Array | None = None,
              layer_keep_NB: jax.Array | None = None,
              *, zero_weight_layers: bool = True) -> jax.Array:
  """Every layer's per-token NLL [N, B, T] of `targets_BT`.

  The layer scan keeps only hidden states; the exit head then runs outside it as
  one batched matmul per group of layers. With `weights_N` (static numpy), layers
  of zero weight get no gradient: `zero_weight_layers=True` still computes their
  NLL under `stop_gradient` (reported, no backward pass through their head);
  False skips their head entirely and returns zeros for them (the training step:
  their NLL is only needed on logging steps, see `Trainer.report_step`).
  `layer_keep_NB` is the layer-dropout mask (`layer_keep_mask`), applied inside
  the scan.
  """
  hidden_NBTD = model(inputs_BT, per_layer_fn=lambda h: None,
                      dropout_rng=dropout_rng, layer_keep_NB=layer_keep_NB).hidden_NBTD
  n = hidden_NBTD.shape[0]
  trained = list(range(n)) if weights_N is None else [i for i in range(n) if weights_N[i] > 0]
  frozen = [i for i in range(n) if i not in trained] if zero_weight_layers else []
  nll_NBT = [jnp.zeros(targets_BT.shape, jnp.float32)] * n
  for group, h_GBTD in ((trained, hidden_NBTD[np.asarray(trained, np.int32)]),
                        (frozen, jax.lax.stop_gradient(hidden_NBTD[np.asarray(frozen, np.int32)]))):
    if group:
      nll_GBT = token_nll(model.head(h_GBTD), targets_BT[None])
      for j, i in enumerate(group):
        nll_NBT[i] = nll_GBT[j]
  return jnp.stack(nll_NBT)


@flax.struct.dataclass
class ExitTerms:
  """Per-layer, per-token training terms of the confidence and distillation recipes.

  Attributes:
    nll_NBT: each layer's NLL (zero-weight layers under `stop_gradient`).
    conf_NBT: each exit's max softmax probability (no gradient), or None.
    kd_NBT: `losses.distillation_kl` of each layer from the teacher, or None.
  """

  nll_NBT: jax.Array
  conf_NBT: jax.Array | None
  kd_NBT: jax.Array | None


def exit_terms(model: DeepSupervisionTransformer, inputs_BT: jax.Array, targets_BT: jax.Array,
               weights_N: np.ndarray, *, confidence: bool, kd_temperature: float | None,
               dropout_rng: jax.Array | None = None,
               layer_keep_NB: jax.Array | None = None) -> ExitTerms:
  """`layer_nll` plus the exits' confidences and the distillation terms.

  The teacher of the distillation is the deepest layer with a positive weight;
  its own KD row is zero. As in `layer_nll`, zero-weight layers get no gradient.

  Args:
    model, inputs_BT, targets_BT, weights_N, dropout_rng, layer_keep_NB: as `layer_nll`.
    confidence: also return `conf_NBT`.
    kd_temperature: the distillation temperature; None returns no `kd_NBT`.
  """
  hidden_NBTD = model(inputs_BT, per_layer_fn=lambda h: None,
                      dropout_rng=dropout_rng, layer_keep_NB=layer_keep_NB).hidden_NBTD
  trained = np.flatnonzero(weights_N > 0)
  grad_N = jnp.asarray(weights_N > 0)[:, None, None, None]
  h_NBTD = jnp.where(grad_N, hidden_NBTD, jax.lax.stop_gradient(hidden_NBTD))
  logits_NBTV = model.head(h_NBTD)
  nll_NBT = token_nll(logits_NBTV, targets_BT[None])
  conf_NBT = losses.token_confidence(logits_NBTV) if confidence else None
  kd_NBT = None
  if kd_temperature is not None:
    teacher_BTV = logits_NBTV[int(trained[-1])]
    kd_NBT = jax.vmap(lambda s: losses.distillation_kl(s, teacher_BTV, kd_temperature))(
        logits_NBTV)
    kd_NBT = kd_NBT.at[int(trained[-1])].set(0.0)
  return ExitTerms(nll_NBT=nll_NBT, conf_NBT=conf_NBT, kd_NBT=kd_NBT)


def layer_dropout_rates(num_layers: int, rate: float, schedule: str) -> np.ndarray:
  """LayerSkip's per-layer skip probabilities p_l = rate * D(l), float32 [N].

  D(l) for the 0-based layer l of N: "uniform" 1; "linear" l / (N - 1);
  "exponential" 2^(l / (N - 1)) - 1 (LayerSkip's e^(l ln 2 / (N - 1)) - 1). Both
  rising schedules leave layer 1 alone and give the last layer `rate`; a
  1-layer model gets `rate`.
  """
  l_N = np.arange(num_layers, dtype=np.float64)
  frac_N = l_N / (num_layers - 1) if num_layers > 1 else np.ones(1)
  if schedule == "uniform":
    d_N = np.ones(num_layers)
  elif schedule == "linear":
    d_N = frac_N
  elif schedule == "exponential":
    d_N = np.exp2(frac_N) - 1.0
  else:
    raise UserError(f"recipe.layer_dropout_schedule={schedule!r}: choose one of "
                    "uniform, linear, exponential")
  return (rate * d_N).astype(np.float32)


def layer_keep_mask(key: jax.Array, rates_N: np.ndarray, batch: int) -> jax.Array:
  """bool [N, B]: sample b runs block i unless an independent draw hits p_i."""
  return jax.random.uniform(key, (len(rates_N), batch)) >= jnp.asarray(rates_N)[:, None]


class Trainer:
  """Jitted training and evaluation steps for one experiment config."""

  def __init__(self, config: ExperimentConfig, total_steps: int,
               initial_params: dict[str, Any] | None = None):
    """Sets up the steps and the initial state.

    Args:
      config: the experiment.
      total_steps: the schedule's length.
      initial_params: parameters to start from (`checkpoint.pure_params` of a model of
        `config.model`'s architecture, e.g. an imported one); None: a fresh
        initialisation seeded by train.seed.
    """
    self.config = config
    self.weights_np = resolve_loss_weights(config.loss_weights, config.model.num_layers)
    if initial_params is None:
      model = create_model(config.model, seed=config.train.seed)
    else:
      model = checkpoint.abstract_model(config.model)
    self.graphdef, params = nnx.split(model)
    if initial_params is not None:
      nnx.replace_by_pure_dict(params, initial_params)
    self.tx = make_optimizer(config.train, total_steps)
    self.schedule = learning_rate_schedule(config.train, total_steps)
    self.mesh = parallel.data_mesh(config.train.num_devices)
    parallel.check_batch_size(self.mesh, config.data.batch_size)
    self.initial_state = parallel.replicate(
        TrainState(params=params, opt_state=self.tx.init(params), step=jnp.zeros((), jnp.int32)),
        self.mesh)
    self.dropout_key = jax.random.PRNGKey(config.train.seed + 1)
    self.recipe = config.recipe
    self.total_steps = total_steps
    # Its own stream (not a split of dropout_key), so residual dropout is unchanged by it.
    self.layer_dropout_key = jax.random.fold_in(jax.random.PRNGKey(config.train.seed), 0x1D)
    self.layer_dropout_rates = layer_dropout_rates(
        config.model.num_layers, config.recipe.layer_dropout,
        config.recipe.layer_dropout_schedule)
    self.train_step = xla_options.jit(self._train_step, donate_argnums=0)
    self.report_step = xla_options.jit(self._report_step)
    self.eval_step = xla_options.jit(self._eval_step)
    self.is_finite = jax.jit(_all_finite)

  def _randomness(self, step: jax.Array, batch: int) -> tuple[jax.Array | None, jax.Array | None]:
    """The dropout key and layer-dropout mask of training step `step` (None when off)."""
    key = None
    if self.config.model.dropout > 0:
      key = jax.random.fold_in(self.dropout_key, step)
    keep_NB = None
    if self.recipe.layer_dropout > 0:
      keep_NB = layer_keep_mask(jax.random.fold_in(self.layer_dropout_key, step),
                                self.layer_dropout_rates, batch)
    return key, keep_NB

  def _loss(self, params, inputs_BT, targets_BT, mask_BT, step):
    model = nnx.merge(self.graphdef, params)
    key, keep_NB = self._randomness(step, inputs_BT.shape[0])
    if self.recipe.is_default:
      nll_NBT = layer_nll(model, inputs_BT, targets_BT, self.weights_np, dropout_rng=key,
                          zero_weight_layers=False)
      return deep_supervision_loss(nll_NBT, mask_BT, jnp.asarray(self.weights_np))
    return self._recipe_loss(model, inputs_BT, targets_BT, mask_BT, key, keep_NB, step)

  def _recipe_loss(self, model, inputs_BT, targets_BT, mask_BT, key, keep_NB, step):
    """The training loss with `config.recipe`'s options (each costs nothing when off)."""
    r = self.recipe
    weights_N = jnp.asarray(self.weights_np)
    if r.curriculum != "none":
      on_N = losses.curriculum_mask(step, self.weights_np, r.curriculum,
                                    total_steps=self.total_steps,
                                    rotation_period=r.rotation_period,
                                    gradual_fraction=r.gradual_fraction)
      weights_N = losses.curriculum_weights(self.weights_np, on_N)
    if r.confidence_power == 0 and r.kd_weight == 0:
      nll_NBT = layer_nll(model, inputs_BT, targets_BT, self.weights_np, dropout_rng=key,
                          layer_keep_NB=keep_NB, zero_weight_layers=False)
      return deep_supervision_loss(nll_NBT, mask_BT, weights_N)
    terms = exit_terms(model, inputs_BT, targets_BT, self.weights_np,
                       confidence=r.confidence_power > 0,
                       kd_temperature=r.kd_temperature if r.kd_weight > 0 else None,
                       dropout_rng=key, layer_keep_NB=keep_NB)
    return losses.recipe_loss(
        terms.nll_NBT, mask_BT, weights_N, teacher_layer=int(np.flatnonzero(self.weights_np)[-1]),
        conf_NBT=terms.conf_NBT, confidence_power=r.confidence_power, kd_NBT=terms.kd_NBT,
        kd_weight=r.kd_weight)

  def _train_step(self, state: TrainState, inputs_BT, targets_BT):
    """One optimiser step. Its `layer_nll` metric is NaN for zero-weight layers: their exit
    heads are not run here (`report_step` gives every layer's NLL on logging steps)."""
    mask_BT = jnp.ones(inputs_BT.shape, jnp.float32)
    (loss, layer_nll_N), grads = jax.value_and_grad(self._loss, has_aux=True)(
        state.params, inputs_BT, targets_BT, mask_BT, state.step)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = TrainState(params=params, opt_state=opt_state, step=state.step + 1)
    layer_nll_N = jnp.where(jnp.asarray(self.weights_np) > 0, layer_nll_N, jnp.nan)
    return new_state, {"loss": loss, "layer_nll": layer_nll_N}

  def _report_step(self, params, inputs_BT, targets_BT, step):
    """Every layer's mean training NLL [N] on the batch of training step `step`, with that
    step's dropout and layer dropout: what the step's loss saw, zero-weight layers included."""
    key, keep_NB = self._randomness(step, inputs_BT.shape[0])
    nll_NBT = layer_nll(nnx.merge(self.graphdef, params), inputs_BT, targets_BT,
                        dropout_rng=key, layer_keep_NB=keep_NB)
    return losses.masked_mean(nll_NBT, jnp.ones(inputs_BT.shape, jnp.float32))

  def _eval_step(self, params, inputs_BT, targets_BT, mask_BT):
    model = nnx.merge(self.graphdef, params)
    nll_NBT = layer_nll(model, inputs_BT, targets_BT)
    return jnp.sum(nll_NBT * mask_BT, axis=(1, 2)), jnp.sum(mask_BT)

  def evaluate(self, params, batches: data.EvalBatches) -> dict[str, Any]:
    """Per-layer validation NLL and PPL over the whole validation text, once."""
    total_N, count = 0.0, 0.0
    for b in range(batches.inputs.shape[0]):
      s_N, c = self.eval_step(
          params, *self.shard(batches.inputs[b], batches.targets[b], batches.mask[b]))
      total_N, count = total_N + s_N, count + c
    nll = np.asarray(total_N) / float(count)
    weighted = float(np.dot(self.weights_np, nll))
    return {"layer_nll": nll.tolist(), "layer_ppl": np.exp(nll).tolist(), "loss": weighted,
            "tokens": int(count)}

  def shard(self, *arrays: np.ndarray) -> tuple[jax.Array, ...]:
    """Host batch arrays as global arrays split over the data-parallel devices."""
    return parallel.shard_batch(self.mesh, *arrays)

  def model(self, params) -> DeepSupervisionTransformer:
    return nnx.merge(self.graphdef, params)


def _all_finite(tree: Any) -> jax.Array:
  """True when no floating-point array of `tree` holds a NaN or infinity."""
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def selection_layer(config: ExperimentConfig) -> int:
  """1-based layer whose validation PPL picks the best checkpoint.

  The deepest layer with a positive loss weight: for the reference weights
  {2: 0.7, 4: 0.3} the full-depth layer 4, for a static model its last layer.
  """
  weights = resolve_loss_weights(config.loss_weights, config.model.num_layers)
  return int(np.nonzero(weights)[0][-1]) + 1


def format_ppl(layer_ppl: Sequence[float]) -> str:
  """Per-layer PPLs as one log/print field, e.g. "12.31 / 9.87"."""
  return " ".join(f"L{i + 1} {p:.2f}" for i, p in enumerate(layer_ppl))


def _diverged(what: str, step: int, latest: ocp.CheckpointManager,
              latest_dir: str) -> TrainingDiverged:
  """The error for `what` ("loss became nan") at `step`, naming the checkpoint to resume."""
  fix = "lower train.learning_rate or raise train.warmup_steps"
  kept = latest.latest_step()
  if kept is None:
    return TrainingDiverged(
        f"{what} at step {step}, before any checkpoint was saved (the first is saved at "
        f"the first evaluation or train.checkpoint_every): nothing to resume; {fix}, then "
        "train again")
  return TrainingDiverged(
      f"{what} at step {step}; kept the last good checkpoint (step {kept}) in "
      f"{latest_dir}: {fix}, then --resume")


def read_eval_records(workdir: str) -> list[dict[str, Any]]:
  """The evaluation records of a run's metrics.jsonl, one per step, in step order.

  A resumed run may log an evaluation twice; the last record of a step wins.
  """
  with open(os.path.join(workdir, METRICS_JSONL)) as f:
    recs = [json.loads(line) for line in f if line.strip()]
  by_step = {r["step"]: r for r in recs if r.get("kind") == "eval"}
  return [by_step[s] for s in sorted(by_step)]


def tensorboard_scalars(record: dict[str, Any]) -> dict[str, float]:
  """The TensorBoard scalars of one metrics.jsonl record, by tag.

  Tags: `train/` or `val/` (evaluations), then `loss`, `ppl/layer_<l>` (1-based) and,
  for training records, `learning_rate` and `tokens_per_s`.
  """
  prefix = {"train": "train", "eval": "val"}[record["kind"]]
  scalars = {f"{prefix}/loss": record["loss"]}
  scalars.update({f"{prefix}/ppl/layer_{i + 1}": p for i, p in enumerate(record["layer_ppl"])})
  scalars.update({f"{prefix}/{k}": record[k] for k in ("learning_rate", "tokens_per_s")
                  if k in record})
  return scalars


_EVENT_FILES = itertools.count()


def _record_step(line: str) -> float:
  """The step of a metrics.jsonl line; inf for a line a kill cut short (or a blank one)."""
  try:
    return json.loads(line)["step"]
  except (ValueError, KeyError, TypeError):
    return math.inf


class MetricsLog:
  """A run's metrics.jsonl and TensorBoard event files, written by process 0 only.

  Opening it drops the records after `start_step` from metrics.jsonl (a resumed run
  logs those steps again) and starts a new event file with TensorBoard's restart
  marker (a `SessionLog.START` at `start_step`), which hides what older files logged
  from that step on. Every record is flushed when written, so what a checkpoint
  precedes is on disk if the process is killed.
  """

  def __init__(self, workdir: str, start_step: int):
    self.path = os.path.join(workdir, METRICS_JSONL)
    self._events = None
    if not parallel.is_primary():  # One metrics file, however many hosts.
      return
    if os.path.exists(self.path):
      with open(self.path) as f:
        kept = [line for line in f if _record_step(line) <= start_step]
      tmp = self.path + ".tmp"
      with open(tmp, "w") as f:
        f.writelines(kept)
      os.replace(tmp, self.path)
    # tensorboardX's synchronous writer: SummaryWriter queues events for a thread and
    # its flush() does not wait for the queue, so a kill could lose logged records.
    # The suffix keeps two writers started in the same second apart (file names hold
    # whole seconds).
    self._events = EventsWriter(os.path.join(workdir, "events"),
                                f".{os.getpid()}.{next(_EVENT_FILES)}")
    self._write_event(event_pb2.Event(
        step=start_step, session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))

  def _write_event(self, event: event_pb2.Event) -> None:
    event.wall_time = time.time()
    self._events.write_event(event)
    self._events.flush()

  def write(self, record: dict[str, Any]) -> None:
    """Appends `record` (with "kind" and "step") to metrics.jsonl and the event file."""
    if self._events is None:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    summary = summary_pb2.Summary(value=[
        summary_pb2.Summary.Value(tag=tag, simple_value=value)
        for tag, value in tensorboard_scalars(record).items()])
    self._write_event(event_pb2.Event(step=record["step"], summary=summary))

  def close(self) -> None:
    if self._events is not None:
      self._events.close()
      self._events = None


def _initial_checkpoint(config: ExperimentConfig, init_from: str) -> checkpoint.Checkpoint:
  """The checkpoint a run starts from, checked against the run's model config."""
  ckpt = checkpoint.load_checkpoint(init_from)
  stored, wanted = ckpt.model.config.to_dict(), config.model.to_dict()
  conflicts = [f"{k}={wanted[k]!r} (checkpoint: {stored[k]!r})" for k in stored
               if k not in INIT_OVERRIDABLE and stored[k] != wanted[k]]
  if conflicts:
    raise UserError(f"--init_from={init_from}: the config's model differs from the "
                    f"checkpoint's: {', '.join(conflicts)}; build the config with "
                    "ExperimentConfig.from_dict(..., init_model=...) (deepexit-train does)")
  if ckpt.tokenizer is None:
    raise UserError(f"--init_from={init_from} has no tokenizer.json: continued training "
                    "needs the tokenizer the model was trained with")
  if ckpt.tokenizer.vocab_size > config.model.vocab_size:
    raise UserError(f"--init_from={init_from}: its tokenizer has {ckpt.tokenizer.vocab_size} "
                    f"ids but the model only {config.model.vocab_size}: the directory's "
                    "tokenizer.json belongs to another model")
  return ckpt


def train(config: ExperimentConfig, workdir: str, *, resume: bool = False,
          init_from: str | None = None, stop_at_step: int | None = None) -> TrainResult:
  """Trains a deep-supervision model, evaluating and checkpointing as configured.

  Args:
    config: the experiment.
    workdir: receives config.json, tokenizer.json, model.json, metrics.jsonl,
      TensorBoard event files (`MetricsLog`), best/ (best model by validation
      PPL) and latest/ (state for resuming: saved at every evaluation, every
      `train.checkpoint_every` steps and at the end).
    resume: continue from workdir/latest; the continuation equals an
      uninterrupted run (same data order, dropout keys and schedule).
    init_from: start from this checkpoint's weights and tokenizer (a `deepexit-train`
      workdir or a Hugging Face directory) instead of a fresh initialisation;
      `config.model` must be its model (`ExperimentConfig.from_dict(d,
      init_model=checkpoint.read_model_config(init_from))`). A resumed run continues
      from workdir/latest instead.
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
  tokenizer, initial_params = None, None
  config_path = os.path.join(workdir, checkpoint.CONFIG_JSON)
  if resume and has_state:
    stored = checkpoint.read_json(config_path)
    stored_cfg = ExperimentConfig.from_dict(stored)
    # Compared after validation, so fields added since the run started take defaults.
    new_cfg = config.with_vocab_size(stored_cfg.model.vocab_size)
    mismatch = [k for k in ("data", "loss_weights")
                if stored_cfg.to_dict()[k] != new_cfg.to_dict()[k]]
    if stored_cfg.model.architecture() != new_cfg.model.architecture():
      mismatch.insert(0, "model")  # Execution options (e.g. remat) may change on resume.
    if stored_cfg.recipe != config.recipe:
      mismatch.append("recipe")
    if mismatch:
      raise UserError(f"--resume with a config whose {', '.join(mismatch)} differ(s) from "
                      f"the run in {workdir}: resume with the config it was started with")
    tokenizer = tokenizers.load_tokenizer(
        os.path.join(workdir, checkpoint.TOKENIZER_JSON))

  if init_from and not (resume and has_state):
    init = _initial_checkpoint(config, init_from)
    tokenizer, initial_params = init.tokenizer, checkpoint.pure_params(init.model)
    logging.info("starting from the weights of %s (step %d)", init.path, init.step)
  dataset = data.prepare_dataset(config.data, tokenizer=tokenizer)
  if not init_from:  # A started model keeps its vocabulary (>= its tokenizer's).
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
  if parallel.is_primary():
    tokenizers.save_tokenizer(dataset.tokenizer, os.path.join(workdir, checkpoint.TOKENIZER_JSON))

  trainer = Trainer(config, total_steps, initial_params=initial_params)
  del initial_params  # The trainer's state holds them (replicated).
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
    # The loss is only fetched on logging steps: never let an exploded state replace
    # the last good checkpoint.
    if not bool(trainer.is_finite(state)):
      raise _diverged("the parameters became non-finite", step, latest, latest_dir)
    latest.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(state.params),
        opt_state=ocp.args.StandardSave(state.opt_state),
        meta=ocp.args.JsonSave({"step": step, "best": best, "history": history})), force=True)

  step = int(state.step)
  log = MetricsLog(workdir, start_step=step)  # Flushes every record: no close on errors.
  saved_step = step
  every = config.train.checkpoint_every
  tokens_per_step = config.data.seq_len * config.data.batch_size
  window_start, window_step = time.perf_counter(), step
  run_start, run_start_step = window_start, step
  end = total_steps if stop_at_step is None else min(total_steps, stop_at_step)
  while step < end:
    inputs, targets = trainer.shard(*batches.batch(step))
    is_eval = (step + 1) % eval_every == 0 or step + 1 == total_steps
    is_log = (step + 1) % config.train.log_every == 0 or is_eval or step + 1 == end
    if is_log:  # Before the step: the state's buffers are donated to it.
      # Fetched before the step is dispatched, so the two programs never run at once:
      # in a multi-process run their collectives must pair up in the same order.
      layer_nll_N = np.asarray(trainer.report_step(state.params, inputs, targets, state.step))
    state, metrics = trainer.train_step(state, inputs, targets)
    step += 1
    if is_log:
      loss = float(metrics["loss"])
      if not math.isfinite(loss):
        raise _diverged(f"loss became {loss}", step, latest, latest_dir)
      now = time.perf_counter()
      rate = (step - window_step) * tokens_per_step / max(now - window_start, 1e-9)
      eta = (end - step) * (now - run_start) / max(step - run_start_step, 1)
      layer_ppl = np.exp(layer_nll_N).tolist()
      logging.info("step %d/%d | loss %.4f | ppl %s | %.0f tok/s | ETA %s", step, total_steps,
                   loss, format_ppl(layer_ppl), rate, time.strftime("%H:%M:%S",
                                                                     time.gmtime(eta)))
      log.write({"kind": "train", "step": step, "loss": loss, "layer_ppl": layer_ppl,
                 "learning_rate": float(trainer.schedule(step - 1)), "tokens_per_s": rate})
      window_start, window_step = time.perf_counter(), step
    if is_eval:
      record = trainer.evaluate(state.params, eval_batches)
      record.update(step=step, epoch=step / steps_per_epoch, selection_layer=sel)
      if not math.isfinite(record["loss"]):
        raise _diverged(f"validation loss became {record['loss']}", step, latest, latest_dir)
      history.append(record)
      log.write({"kind": "eval", **record})
      improved = not best or record["layer_ppl"][sel - 1] < best["layer_ppl"][sel - 1]
      logging.info("eval step %d (epoch %.2f) | val ppl %s%s", step, record["epoch"],
                   format_ppl(record["layer_ppl"]), " | best" if improved else "")
      if improved:
        best = record
        checkpoint.save_model(trainer.model(state.params), workdir, step=step, metrics=record)
      save_latest(step)
      saved_step = step
      window_start = time.perf_counter()  # Evaluation time is not training throughput.
    if (every and step % every == 0 or step == end) and saved_step != step:
      save_latest(step)
      saved_step = step
      window_start = time.perf_counter()
  latest.close()
  log.close()
  if not best:
    raise UserError(f"training stopped at step {step} before its first evaluation: "
                    "nothing was saved as best; --resume to finish it")
  ckpt = checkpoint.load_checkpoint(workdir)
  return TrainResult(model=ckpt.model, tokenizer=dataset.tokenizer, history=history, best=best,
                     workdir=workdir, steps=step)
