"""Hugging Face checkpoint directories: import into a `DeepSupervisionTransformer`, export back.

A directory holds config.json, the weights as model.safetensors or as shards listed in
model.safetensors.index.json, and optionally tokenizer.json. Tensors are read one at a
time through the `safetensors` library (NumPy, memory-mapped) and each of our
parameters is built per device shard (`jax.make_array_from_callback`): with a mesh, a
device receives only its slice, and the host never holds more than one layer's tensor
of one parameter, never the whole model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import os
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepexit_jax import tokenizers
from deepexit_jax.errors import UserError
from deepexit_jax.files import ensure_writable, read_json, write_json
from deepexit_jax.model import (
  COMPUTE_DTYPES,
  DeepSupervisionTransformer,
  abstract_model,
  pure_params,
)
from deepexit_jax.pretrained import architectures

CONFIG_JSON = "config.json"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
TOKENIZER_JSON = "tokenizer.json"


def is_hf_directory(path: str) -> bool:
  """True for a local directory with a Hugging Face config.json and safetensors weights
  (`checkpoint.load_checkpoint` prefers our model.json where a directory has both)."""
  return (os.path.isfile(os.path.join(path, CONFIG_JSON))
          and (os.path.exists(os.path.join(path, WEIGHTS))
               or os.path.exists(os.path.join(path, WEIGHTS_INDEX))))


def resolve(path: str) -> str:
  """A local directory for `path`: the directory itself, or a hub id ("org/name")
  downloaded (config, safetensors, tokenizer) when `huggingface_hub` is installed."""
  if os.path.isdir(path):
    return path
  if path.count("/") == 1 and not path.startswith((".", "/")):
    try:  # Optional (the `hub` extra): local directories need no hub client.
      huggingface_hub = importlib.import_module("huggingface_hub")
    except ImportError:
      raise UserError(f"{path} is not a directory, and huggingface_hub is not installed to "
                      "fetch it from the hub: download the checkpoint and pass its directory"
                      ) from None
    try:
      return huggingface_hub.snapshot_download(
          path, allow_patterns=["*.json", "*.safetensors"])
    except Exception as e:  # Network, authentication (gated models), unknown repository.
      raise UserError(f"cannot download {path} from the Hugging Face hub "
                      f"({type(e).__name__}: {str(e).splitlines()[0][:120]}): download it "
                      "yourself (huggingface-cli download) and pass the directory") from None
  raise UserError(f"{path} is not a directory: pass a Hugging Face checkpoint directory "
                  "(config.json + model.safetensors)")


def read_config(directory: str) -> dict[str, Any]:
  path = os.path.join(directory, CONFIG_JSON)
  if not os.path.isfile(path):
    raise UserError(f"{directory} has no {CONFIG_JSON}: pass a Hugging Face checkpoint "
                    "directory (config.json + model.safetensors)")
  try:
    return read_json(path)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise UserError(f"{path} is not valid JSON ({e})") from None


class _Tensors:
  """Named tensors of a checkpoint's safetensors file(s), opened lazily, read one by one."""

  def __init__(self, directory: str, stack: contextlib.ExitStack):
    from safetensors import safe_open

    self._open, self._handles, self._dir = safe_open, {}, directory
    index = os.path.join(directory, WEIGHTS_INDEX)
    if os.path.exists(index):
      self.files = dict(read_json(index)["weight_map"])
    elif os.path.exists(os.path.join(directory, WEIGHTS)):
      with safe_open(os.path.join(directory, WEIGHTS), framework="np") as f:
        self.files = {name: WEIGHTS for name in f.keys()}
    else:
      raise UserError(f"{directory} has no {WEIGHTS} or {WEIGHTS_INDEX}: deepexit_jax reads "
                      "safetensors weights (convert .bin checkpoints with transformers' "
                      "save_pretrained(safe_serialization=True))")
    self._stack = stack

  def __contains__(self, name: str) -> bool:
    return name in self.files

  def get(self, name: str) -> np.ndarray:
    if name not in self.files:
      raise UserError(f"{self._dir} has no tensor {name!r}: the checkpoint is incomplete "
                      "or not of the architecture its config.json names")
    file = self.files[name]
    if file not in self._handles:
      path = os.path.join(self._dir, file)
      if not os.path.exists(path):
        raise UserError(f"{path} is missing (named in {WEIGHTS_INDEX}): download every shard")
      self._handles[file] = self._stack.enter_context(self._open(path, framework="np"))
    return self._handles[file].get_tensor(name)


def _dtype_name(dtype: Any) -> str:
  if dtype is None:
    return "float32"
  name = dtype if isinstance(dtype, str) else jnp.dtype(dtype).name
  if name not in COMPUTE_DTYPES:
    raise UserError(f"dtype={dtype!r}: choose one of {', '.join(COMPUTE_DTYPES)}")
  return name  # The compute and the parameter dtypes have the same names.


def _sharding(mesh: jax.sharding.Mesh | None, axis: str, shape: tuple[int, ...],
              layered: bool) -> jax.sharding.Sharding:
  """One device; or on `mesh`, split along `axis` the largest dimension it divides (never
  the layer axis, which the scan walks), replicated when none does."""
  if mesh is None:
    return jax.sharding.SingleDeviceSharding(jax.devices()[0])
  spec: list[str | None] = [None] * len(shape)
  n = mesh.shape[axis]
  dims = [i for i in range(1 if layered else 0, len(shape)) if shape[i] % n == 0]
  if dims:
    spec[max(dims, key=lambda i: (shape[i], i))] = axis
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))


def _place(spec: architectures.TensorSpec, tensors: _Tensors, target: Any,
           sharding: jax.sharding.Sharding, num_layers: int, name: str) -> jax.Array:
  """Our parameter `name` built from its tensors, each device receiving only its slice."""
  shape, dtype = tuple(target.shape), target.dtype
  cache: dict[int, np.ndarray] = {}  # Layer -> our layout; one layer at a time.

  def build(layer: int | None) -> np.ndarray:
    key = -1 if layer is None else layer
    if key not in cache:
      cache.clear()
      xs = [tensors.get(n.format(i=layer)) for n in spec.names]
      value = np.asarray(spec.combine(xs))
      want = shape[1:] if spec.layered else shape
      if value.shape != want:
        raise UserError(f"tensor {spec.names[0].format(i=layer)!r} gives {name} of shape "
                        f"{value.shape}, but config.json implies {want}: the weights do not "
                        "match the config")
      cache[key] = value.astype(dtype)
    return cache[key]

  def callback(index: tuple[slice, ...]) -> np.ndarray:
    if not spec.layered:
      return build(None)[index]
    layers = range(num_layers)[index[0]]
    return np.stack([build(i)[index[1:]] for i in layers])

  return jax.make_array_from_callback(shape, sharding, callback)


def load_hf_checkpoint(path: str, *, dtype: Any = None, param_dtype: Any = None,
                       max_len: int | None = None, mesh: jax.sharding.Mesh | None = None,
                       model_axis: str = "model") -> DeepSupervisionTransformer:
  """Imports a Hugging Face LlamaForCausalLM or GPT2LMHeadModel checkpoint.

  The model's exit head is the checkpoint's own final norm + LM head, applied after
  every layer (LayerSkip's early exit). Parameters are float32 unless `param_dtype` says
  otherwise, whatever the checkpoint stores (bf16 weights convert to float32 exactly).

  Args:
    path: a local directory (config.json + model.safetensors or a sharded
      model.safetensors.index.json), or a hub id when huggingface_hub and network exist.
    dtype: compute dtype of the matmuls, None/"float32" or "bfloat16" (`ModelConfig.dtype`).
    param_dtype: storage dtype of the parameters, None/"float32" or "bfloat16" (half the
      memory; `ModelConfig.param_dtype`, for inference).
    max_len: longest sequence and the decoders' KV cache length; None: the checkpoint's
      (rotary models capped at `architectures.DEFAULT_MAX_LEN`).
    mesh: place every parameter directly onto this mesh, split along `model_axis`
      (see `_sharding`); None: the default device.
    model_axis: the mesh axis to split parameters along.

  Returns:
    The model (`all_layer_logits`, `predict_with_exit`, the decoders, training and
    `save_model` all take it).
  """
  directory = resolve(path)
  hf = read_config(directory)
  where = os.path.join(directory, CONFIG_JSON)
  config = dataclasses.replace(
      architectures.model_config(hf, where, dtype=_dtype_name(dtype), max_len=max_len),
      param_dtype=_dtype_name(param_dtype))
  arch = architectures.architecture_of(hf, where)
  if mesh is not None and model_axis not in mesh.shape:
    raise UserError(f"model_axis={model_axis!r} is not an axis of the mesh {dict(mesh.shape)}")
  abstract = abstract_model(config)
  graphdef, state = nnx.split(abstract)
  targets = state.to_pure_dict()
  with contextlib.ExitStack() as stack:
    tensors = _Tensors(directory, stack)
    prefix = "transformer." if "transformer.wte.weight" in tensors else ""
    specs = architectures.tensor_specs(arch, config, prefix)
    values: dict = {}
    for leaf_path, target in _leaves(targets):
      if leaf_path not in specs:
        raise UserError(f"no Hugging Face tensor for parameter {'/'.join(leaf_path)} of "
                        f"{arch}: unsupported configuration")
      spec = specs[leaf_path]
      value = _place(spec, tensors, target,
                     _sharding(mesh, model_axis, tuple(target.shape), spec.layered),
                     config.num_layers, "/".join(leaf_path))
      _set(values, leaf_path, value)
  nnx.replace_by_pure_dict(state, values)
  return nnx.merge(graphdef, state)


def _leaves(tree: dict, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _leaves(value, prefix + (str(key),))
    else:
      yield prefix + (str(key),), value


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def load_hf_tokenizer(path: str) -> tokenizers.BPETokenizer | None:
  """The directory's tokenizer.json through the `tokenizers` library (None if absent)."""
  file = os.path.join(resolve(path), TOKENIZER_JSON)
  if not os.path.exists(file):
    return None
  import tokenizers as hf

  try:
    return tokenizers.BPETokenizer(hf.Tokenizer.from_file(file))
  except Exception as e:  # The library raises its own exception type for bad files.
    raise UserError(f"{file} is not a tokenizers JSON file ({str(e)[:80]})") from None


def save_hf_checkpoint(model: DeepSupervisionTransformer, path: str, *,
                       tokenizer: tokenizers.Tokenizer | None = None) -> str:
  """Exports a model to a Hugging Face directory (config.json + model.safetensors, float32)
  that `transformers` loads as LlamaForCausalLM or GPT2LMHeadModel.

  Args:
    model: a model of a Llama- or GPT-2-shaped config (`architectures.export_architecture`
      says why another cannot be exported).
    path: the directory (created; existing files of the same names are replaced).
    tokenizer: a `BPETokenizer` (e.g. an imported one) is written as tokenizer.json.

  Returns:
    The directory.
  """
  from safetensors.numpy import save_file

  config = model.config
  hf = architectures.hf_config(config)
  arch = hf["architectures"][0]
  specs = architectures.tensor_specs(arch, config)
  params = pure_params(model)
  tensors: dict[str, np.ndarray] = {}
  for leaf_path, spec in specs.items():
    value = params
    for key in leaf_path:
      value = value[key]
    value = np.asarray(jax.device_get(value), np.float32)
    for i in range(config.num_layers) if spec.layered else [None]:
      parts = spec.split(value[i] if spec.layered else value)
      for name, part in zip(spec.names, parts):
        tensors[name.format(i=i)] = np.ascontiguousarray(part)
  ensure_writable(path)
  save_file(tensors, os.path.join(path, WEIGHTS), metadata={"format": "pt"})
  write_json(os.path.join(path, CONFIG_JSON), hf)
  if isinstance(tokenizer, tokenizers.BPETokenizer):
    with open(os.path.join(path, TOKENIZER_JSON), "w", encoding="utf-8") as f:
      f.write(tokenizer.to_json()["tokenizer"])
  elif tokenizer is not None:
    raise UserError(f"{type(tokenizer).__name__} has no Hugging Face tokenizer.json form: "
                    "export without tokenizer=")
  return path
