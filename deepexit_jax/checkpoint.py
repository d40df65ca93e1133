"""Checkpoints: orbax CheckpointManager directories for models and training state.

A model directory (what `save_model` writes, and what `deepexit-train --workdir`
holds) looks like:

  model.json       the ModelConfig
  tokenizer.json   the tokenizer the model was trained with (if given)
  config.json      the full experiment config (training runs only)
  best/<step>/     orbax: parameters of the best model, with its metrics
  latest/<step>/   orbax: parameters + optimizer state + step, for --resume (saved at
                   evaluations, every train.checkpoint_every steps and at the end)
  metrics.jsonl, events.out.tfevents.*   training runs: metrics, also for TensorBoard

Orbax writes each step to a temporary directory and renames it when complete,
so a killed run leaves the previous checkpoint intact. `load_checkpoint` / `load_model`
also read a Hugging Face directory (config.json + safetensors, no model.json) through
`deepexit_jax.pretrained`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from deepexit_jax import tokenizers
from deepexit_jax.errors import UserError
from deepexit_jax.files import ensure_writable, read_json, write_json
from deepexit_jax.model import (
  DeepSupervisionTransformer,
  ModelConfig,
  abstract_model,
  pure_params,
)
from deepexit_jax.pretrained import architectures, hf_directory

MODEL_JSON = "model.json"
TOKENIZER_JSON = "tokenizer.json"
CONFIG_JSON = "config.json"
BEST = "best"
LATEST = "latest"


def manager(path: str) -> ocp.CheckpointManager:
  """A synchronous manager keeping one step (the newest saved) under `path`."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=1, create=True, enable_async_checkpointing=False)
  handlers = {"params": ocp.StandardCheckpointHandler(),
              "opt_state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
  return ocp.CheckpointManager(os.path.abspath(path), options=options, item_handlers=handlers)


def write_model_config(directory: str, config: ModelConfig) -> None:
  """Writes model.json, refusing to overwrite one that describes another model.

  A stored config that differs only in execution options (`model.EXECUTION_FIELDS`,
  e.g. `remat`) describes the same model: it is replaced by the new one.
  """
  path = os.path.join(directory, MODEL_JSON)
  if os.path.exists(path):
    old = ModelConfig(**read_json(path))  # Newer fields take their defaults.
    old_arch, new_arch = old.architecture(), config.architecture()
    if old_arch != new_arch:
      diff = {k: (old_arch.get(k), v) for k, v in new_arch.items() if old_arch.get(k) != v}
      raise UserError(
          f"{directory} already holds a checkpoint of a different model {diff} "
          "(stored, new): use a new directory or the same model config")
    if old == config:
      return
  write_json(path, config.to_dict())


def save_model(model: DeepSupervisionTransformer, directory: str, *,
               tokenizer: tokenizers.Tokenizer | None = None, step: int = 0,
               metrics: dict[str, Any] | None = None) -> str:
  """Saves a model's config and parameters (and tokenizer) to `directory`.

  Args:
    model: the model to save.
    directory: created if needed; the parameters go to `directory/best/<step>`,
      replacing an older step there.
    tokenizer: saved as tokenizer.json so sweeps and probes decode the same way.
    step: training step the parameters belong to.
    metrics: JSON-serialisable metrics stored with the parameters.

  Returns:
    The directory.
  """
  ensure_writable(directory)
  write_model_config(directory, model.config)
  if tokenizer is not None:
    tokenizers.save_tokenizer(tokenizer, os.path.join(directory, TOKENIZER_JSON))
  with manager(os.path.join(directory, BEST)) as mgr:
    mgr.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(pure_params(model)),
        meta=ocp.args.JsonSave({"step": step, "metrics": metrics or {}})), force=True)
  return directory


def read_model_config(directory: str) -> ModelConfig:
  """The `ModelConfig` of a checkpoint directory (ours, or a Hugging Face one)."""
  path = os.path.join(directory, MODEL_JSON)
  if not os.path.exists(path) and _is_hf(directory):
    hf_path = os.path.join(directory, hf_directory.CONFIG_JSON)
    return architectures.model_config(hf_directory.read_config(directory), hf_path)
  if not os.path.exists(path):
    raise UserError(
        f"{directory} is not a deepexit checkpoint (no {MODEL_JSON}): pass the --workdir of a "
        "deepexit-train run or a directory written by save_model")
  return ModelConfig(**read_json(path))


def restore_params(mgr: ocp.CheckpointManager, step: int, target: Any, what: str,
                   **extra: ocp.args.CheckpointArgs) -> ocp.args.Composite:
  """Restores `params` (shaped like `target`) plus `extra` items of one step.

  Raises:
    UserError: the stored arrays do not have the shapes `target` expects (a
      checkpoint of another model config).
  """
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  stored, wanted = _shapes(mgr.item_metadata(step)["params"]), _shapes(abstract)
  if stored != wanted:
    diff = sorted(k for k in stored.keys() | wanted.keys() if stored.get(k) != wanted.get(k))
    first = diff[0]
    raise UserError(
        f"{what} does not match its model config ({first}: stored {stored.get(first)}, "
        f"config wants {wanted.get(first)}): the checkpoint belongs to another model; "
        "use the directory it was trained in")
  try:
    return mgr.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract), **extra))
  except (ValueError, KeyError) as e:
    first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
    raise UserError(
        f"{what} does not match its model config ({first}): the checkpoint belongs to "
        "another model; use the directory it was trained in") from None


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  # nnx.State is stored with a trailing "value" key per Variable; compare without it.
  if isinstance(tree, nnx.State):
    tree = tree.to_pure_dict()
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  names = ["/".join(str(getattr(k, "key", k)) for k in path) for path, _ in leaves]
  return {n.removesuffix("/value"): tuple(x.shape) for n, (_, x) in zip(names, leaves)}


@dataclasses.dataclass
class Checkpoint:
  """A loaded model with what was stored beside it."""

  model: DeepSupervisionTransformer
  tokenizer: tokenizers.Tokenizer | None
  step: int
  metrics: dict[str, Any]
  experiment: dict[str, Any] | None
  path: str

  @property
  def exit_layers(self) -> tuple[int, ...]:
    """The default 1-based exit layers: the training run's configured exit_layers, or
    for a checkpoint without a run (an imported Hugging Face model, whose every layer
    exits through the shared final norm + LM head) every layer 1..N."""
    if self.experiment is not None and "exit_layers" in self.experiment:
      return tuple(int(k) for k in self.experiment["exit_layers"])
    return tuple(range(1, self.model.config.num_layers + 1))


def _is_hf(directory: str) -> bool:
  """A Hugging Face directory that is not also one of ours (our model.json wins)."""
  return (not os.path.exists(os.path.join(directory, MODEL_JSON))
          and hf_directory.is_hf_directory(directory))


def _load_hf(directory: str) -> Checkpoint:
  """A Hugging Face directory as a `Checkpoint`: model + tokenizer.json, step 0, no training
  run (`experiment` None)."""
  local = hf_directory.resolve(directory)
  return Checkpoint(model=hf_directory.load_hf_checkpoint(local),
                    tokenizer=hf_directory.load_hf_tokenizer(local), step=0, metrics={},
                    experiment=None, path=os.path.abspath(local))


def load_checkpoint(directory: str) -> Checkpoint:
  """Loads the best saved parameters of `directory`, with tokenizer and metadata.

  A Hugging Face directory (config.json + model.safetensors, no model.json) is imported
  with `pretrained.load_hf_checkpoint` (step 0, no experiment config), so every binary's
  --checkpoint takes one.
  """
  if _is_hf(directory):
    return _load_hf(directory)
  config = read_model_config(directory)
  best_dir = os.path.join(directory, BEST)
  if not os.path.isdir(best_dir):
    raise UserError(f"{directory} has {MODEL_JSON} but no saved parameters in {BEST}/: "
                    "the run was stopped before its first evaluation; train it longer")
  model = abstract_model(config)
  graphdef, state = nnx.split(model)
  with manager(best_dir) as mgr:
    step = mgr.latest_step()
    if step is None:
      raise UserError(f"{best_dir} holds no complete checkpoint: train the model again")
    restored = restore_params(mgr, step, state.to_pure_dict(), best_dir,
                              meta=ocp.args.JsonRestore())
  nnx.replace_by_pure_dict(state, restored.params)
  tok_path = os.path.join(directory, TOKENIZER_JSON)
  cfg_path = os.path.join(directory, CONFIG_JSON)
  return Checkpoint(
      model=nnx.merge(graphdef, state),
      tokenizer=tokenizers.load_tokenizer(tok_path) if os.path.exists(tok_path) else None,
      step=int(restored.meta["step"]),
      metrics=restored.meta.get("metrics", {}),
      experiment=read_json(cfg_path) if os.path.exists(cfg_path) else None,
      path=os.path.abspath(directory),
  )


def load_model(directory: str) -> DeepSupervisionTransformer:
  """Loads the best saved model of a checkpoint directory (see `save_model`) or of a
  Hugging Face directory (`pretrained.load_hf_checkpoint`)."""
  return load_checkpoint(directory).model


def params_digest(model: nnx.Module) -> str:
  """Short SHA-256 of the parameters: identifies the exact checkpoint a sweep or a probe
  study used."""
  h = hashlib.sha256()
  for leaf in jax.tree.leaves(pure_params(model)):
    h.update(np.asarray(leaf).tobytes())
  return h.hexdigest()[:16]
