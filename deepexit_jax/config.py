"""Experiment configuration: the one place a ConfigDict becomes validated dataclasses."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
from collections.abc import Mapping
from typing import Any

import ml_collections

from deepexit_jax import exits, validation
from deepexit_jax.data import DataConfig
from deepexit_jax.errors import UserError
from deepexit_jax.losses import CURRICULA, resolve_loss_weights
from deepexit_jax.model import ModelConfig


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Optimisation and bookkeeping of one training run.

  Attributes:
    epochs: passes over the training text (an epoch = every non-overlapping
      window once, in a seeded random order).
    max_steps: if set, stop after this many steps instead (overrides epochs).
    learning_rate: peak AdamW learning rate.
    min_lr_ratio: the cosine schedule ends at learning_rate * min_lr_ratio.
    warmup_steps: linear warm-up steps from 0.
    weight_decay: AdamW decoupled weight decay (matrices only).
    grad_clip: global gradient-norm clip; 0 disables.
    b1, b2: Adam moments.
    seed: seeds parameters, data order and dropout.
    eval_every: evaluate on the validation text every this many steps; 0 means
      once per epoch (and always at the end).
    log_every: print a progress line every this many steps.
    checkpoint_every: also save the resumable state (workdir/latest) every this
      many steps, so a killed run loses at most this many; 0 saves it only at
      evaluations and at the end.
    num_devices: data-parallel devices (a ("data",) mesh; batches split over
      them, parameters replicated); 0 = every device of every host. The batch
      size must be divisible by it.
  """

  epochs: int = 1
  max_steps: int | None = None
  learning_rate: float = 3e-3
  min_lr_ratio: float = 0.1
  warmup_steps: int = 50
  weight_decay: float = 0.01
  grad_clip: float = 1.0
  b1: float = 0.9
  b2: float = 0.98
  seed: int = 0
  eval_every: int = 0
  log_every: int = 50
  checkpoint_every: int = 0
  num_devices: int = 0

  def __post_init__(self):
    validation.check_int("train.epochs", self.epochs, 1)
    validation.check_int("train.max_steps", self.max_steps, 1,
                         none_means="to train for train.epochs")
    validation.check_int("train.warmup_steps", self.warmup_steps, 0)
    validation.check_int("train.eval_every", self.eval_every, 0)
    validation.check_int("train.log_every", self.log_every, 1)
    validation.check_int("train.checkpoint_every", self.checkpoint_every, 0)
    validation.check_int("train.num_devices", self.num_devices, 0)
    validation.check_int("train.seed", self.seed, 0)
    validation.check_float("train.learning_rate", self.learning_rate, 0.0, math.inf,
                           low_open=True)
    validation.check_float("train.min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
    validation.check_float("train.weight_decay", self.weight_decay, 0.0, math.inf)
    validation.check_float("train.grad_clip", self.grad_clip, 0.0, math.inf)
    validation.check_float("train.b1", self.b1, 0.0, 1.0)
    validation.check_float("train.b2", self.b2, 0.0, 1.0)


LAYER_DROPOUT_SCHEDULES = ("uniform", "linear", "exponential")


@dataclasses.dataclass(frozen=True)
class RecipeConfig:
  """Training recipes on top of the loss weights (BUILD_NOTES.md, Training recipes).

  The defaults switch every recipe off; a run with them trains exactly as
  without this section.

  Attributes:
    curriculum: early-exit loss curriculum (LayerSkip): "none", "rotational" (a
      different subset of the early exits each step) or "gradual" (early exits
      enabled from the top down); see `losses.curriculum_mask`.
    rotation_period: rotational: each early exit trains every this many steps.
    gradual_fraction: gradual: the shallowest exit joins after this fraction
      of training.
    layer_dropout: LayerSkip layer dropout: the largest per-sample probability of
      skipping a block in training (0 disables; never applied in evaluation).
    layer_dropout_schedule: how the probability rises with depth, p_l =
      layer_dropout * D(l) for 0-based l of N: "uniform" D = 1, "linear"
      D = l / (N - 1), "exponential" D = 2^(l / (N - 1)) - 1.
    confidence_power: EE-LLM-style confidence-aware early-exit loss: tokens are
      weighted by the exit's max-probability to this power (0 disables).
    kd_weight: FREE's shallow-deep self-distillation: each early exit's term is
      (1 - kd_weight) * CE + kd_weight * KL(deepest supervised exit || exit)
      (0 disables).
    kd_temperature: softmax temperature of the distillation.
  """

  curriculum: str = "none"
  rotation_period: int = 2
  gradual_fraction: float = 0.5
  layer_dropout: float = 0.0
  layer_dropout_schedule: str = "exponential"
  confidence_power: float = 0.0
  kd_weight: float = 0.0
  kd_temperature: float = 1.0

  def __post_init__(self):
    validation.check_choice("recipe.curriculum", self.curriculum, CURRICULA)
    validation.check_choice("recipe.layer_dropout_schedule", self.layer_dropout_schedule,
                            LAYER_DROPOUT_SCHEDULES)
    validation.check_int("recipe.rotation_period", self.rotation_period, 1)
    validation.check_float("recipe.gradual_fraction", self.gradual_fraction, 0.0, 1.0)
    validation.check_float("recipe.layer_dropout", self.layer_dropout, 0.0, 0.99)
    validation.check_float("recipe.confidence_power", self.confidence_power, 0.0, 10.0)
    validation.check_float("recipe.kd_weight", self.kd_weight, 0.0, 1.0)
    validation.check_float("recipe.kd_temperature", self.kd_temperature, 0.0, 100.0, low_open=True)

  @property
  def is_default(self) -> bool:
    return self == RecipeConfig()


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  """Everything one training run needs.

  Attributes:
    model: the architecture; `vocab_size` is filled in from the tokenizer
      (`with_vocab_size`) once the data is loaded.
    data: corpus, tokenizer and batching.
    loss_weights: deep-supervision weights (see `losses.resolve_loss_weights`).
    exit_layers: 1-based layers at which tokens may exit (for sweeps).
    train: optimisation.
    recipe: curricula, layer dropout, confidence weighting, distillation.
  """

  model: ModelConfig
  data: DataConfig
  loss_weights: str
  exit_layers: tuple[int, ...]
  train: TrainConfig
  recipe: RecipeConfig = dataclasses.field(default_factory=lambda: RecipeConfig())

  def __post_init__(self):
    n = self.model.num_layers
    resolve_loss_weights(self.loss_weights, n)
    exits.check_exit_layers(self.exit_layers, n)  # The one check of exit layers.
    if self.data.seq_len > self.model.max_len:
      raise UserError(
          f"data.seq_len={self.data.seq_len} exceeds model.max_len={self.model.max_len}: "
          "raise model.max_len or shorten data.seq_len")

  def with_vocab_size(self, vocab_size: int) -> ExperimentConfig:
    return dataclasses.replace(
        self, model=dataclasses.replace(self.model, vocab_size=vocab_size))

  def to_dict(self) -> dict[str, Any]:
    return {
        "model": dataclasses.asdict(self.model),
        "data": dataclasses.asdict(self.data),
        "loss_weights": self.loss_weights,
        "exit_layers": list(self.exit_layers),
        "train": dataclasses.asdict(self.train),
        "recipe": dataclasses.asdict(self.recipe),
    }

  @classmethod
  def from_dict(cls, d: Mapping[str, Any] | ml_collections.ConfigDict, *,
                init_model: ModelConfig | None = None) -> ExperimentConfig:
    """Validates a (Config)dict with keys model, data, loss_weights, exit_layers, train
    and (optional) recipe.

    With `init_model` (the model of the checkpoint a run starts from, `--init_from`), the
    model is that one: the model section may be left out, and any field it gives must
    equal the checkpoint's except `INIT_OVERRIDABLE` ones; exit_layers default to every
    layer.
    """
    if isinstance(d, ml_collections.ConfigDict):
      d = d.to_dict()
    d = dict(d)
    unknown = set(d) - {"model", "data", "loss_weights", "exit_layers", "train", "recipe"}
    if unknown:
      raise UserError(f"unknown config section(s) {sorted(unknown)}: "
                      "allowed are model, data, loss_weights, exit_layers, train, recipe")
    model = dict(d.get("model") or {})
    if init_model is not None:
      model = initial_model_fields(model, init_model)
      if d.get("exit_layers") is None:
        d["exit_layers"] = tuple(range(1, init_model.num_layers + 1))
    model.setdefault("vocab_size", 1)  # Placeholder until the tokenizer is known.
    weights = d.get("loss_weights", "final")
    if isinstance(weights, Mapping):
      weights = ",".join(f"{k}:{v}" for k, v in weights.items())
    return cls(
        model=_build(ModelConfig, model, "model"),
        data=DataConfig.from_dict(dict(d.get("data", {}))),
        loss_weights=str(weights),
        exit_layers=tuple(int(e) for e in d.get("exit_layers", (model.get("num_layers", 1),))),
        train=_build(TrainConfig, dict(d.get("train", {})), "train"),
        recipe=_build(RecipeConfig, dict(d.get("recipe") or {}), "recipe"),
    )


# Model fields a run started from a checkpoint (`--init_from`) may set differently from
# the checkpoint's: they change how the model runs and trains, not its parameters.
INIT_OVERRIDABLE = ("remat", "attention_chunks", "dtype", "dropout")


def initial_model_fields(model: Mapping[str, Any], init_model: ModelConfig) -> dict[str, Any]:
  """The model section of a run that starts from a checkpoint of `init_model`: the
  checkpoint's fields, with the section's `INIT_OVERRIDABLE` ones.

  Raises:
    UserError: the section gives another field a value other than the checkpoint's (one
      line naming each, with both values).
  """
  stored = init_model.to_dict()
  unknown = sorted(set(model) - set(stored))
  if unknown:
    raise UserError(f"unknown model field(s) {unknown}; allowed: {sorted(stored)}")
  conflicts = [f"{k}={v!r} (checkpoint: {stored[k]!r})" for k, v in model.items()
               if k not in INIT_OVERRIDABLE and v != stored[k]]
  if conflicts:
    raise UserError(
        f"--init_from: the config's model section conflicts with the checkpoint's model: "
        f"{', '.join(conflicts)}; the model comes from the checkpoint: drop these fields "
        f"from the config (only {', '.join(INIT_OVERRIDABLE)} may differ)")
  return {**stored, **{k: model[k] for k in INIT_OVERRIDABLE if k in model}}


def _build(cls, fields: dict[str, Any], section: str):
  allowed = {f.name for f in dataclasses.fields(cls)}
  unknown = set(fields) - allowed
  if unknown:
    raise UserError(f"unknown {section} field(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
  try:
    return cls(**fields)
  except TypeError as e:
    raise UserError(f"bad {section} config: {e}") from None


def load_config_file(path: str, *args: str) -> ml_collections.ConfigDict:
  """`get_config(*args)` of a config file (what `--config=path.py:arg` loads).

  Raises:
    UserError: the file does not exist.
  """
  if not os.path.exists(path):
    raise UserError(f"config file {path} not found: give a path to an "
                    "experiments/configs/*.py file")
  name = os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(f"_deepexit_config_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(*args)


def sibling_config(this_file: str, name: str, *args: str) -> ml_collections.ConfigDict:
  """`get_config(*args)` of the config file `name`.py beside `this_file`.

  Config files are loaded by path (`--config=path.py`), not as a package, so one
  config builds on another through this instead of an import.
  """
  return load_config_file(
      os.path.join(os.path.dirname(os.path.abspath(this_file)), name + ".py"), *args)
