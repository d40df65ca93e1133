"""What every decoder shares: a model's split kept between calls, its jitted decoders, and
the checks of the token arrays a caller passes."""

from __future__ import annotations

import dataclasses
import functools
import math
import weakref
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepexit_jax import xla_options
from deepexit_jax.errors import UserError

Array = jax.Array

# A decoder: fn(model, *args, opts=...) -> result, traced under jit with the model merged
# from its state; `opts` is static (a hashable dataclass).
Decoder = Callable[..., Any]


@dataclasses.dataclass(frozen=True)
class ModelSplit:
  """A model's split, kept between decoding calls (see `split`).

  Attributes:
    fingerprint: `_fingerprint(model)` when it was split.
    graphdef, treedef: the model's structure and its state's tree structure.
    variables: the model's Variable objects, in the order of `treedef`'s leaves; their
      values are read at every call, so in-place parameter updates are seen.
  """

  fingerprint: tuple[int, ...]
  graphdef: nnx.GraphDef
  treedef: Any
  variables: list[Any]

  def values(self) -> list[Array]:
    return [v.get_value() for v in self.variables]


# model -> its last `ModelSplit`.
_SPLITS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _fingerprint(node: nnx.Module) -> tuple[int, ...]:
  """Identities of every submodule and Variable under `node`: what `nnx.split` would see,
  in a fraction of its time (values are not part of it: a split state holds the model's
  own Variable objects, so in-place updates reach it)."""
  ids = []
  for value in vars(node).values():
    kind = _node_kind(type(value))
    if kind:
      ids.append(id(value))
      if kind == "module":
        ids.extend(_fingerprint(value))
  return tuple(ids)


@functools.cache
def _node_kind(cls: type) -> str:
  """"module", "variable" or "" (cached per class: `isinstance` on NNX types is slow)."""
  if issubclass(cls, nnx.Variable):
    return "variable"
  return "module" if issubclass(cls, nnx.Module) else ""


def _is_variable(x: Any) -> bool:
  return isinstance(x, nnx.Variable)


def split(model: nnx.Module) -> ModelSplit | None:
  """The model's split, reused while its structure is unchanged.

  Splitting the model, flattening its state and hashing a fresh graphdef for jit's cache
  cost ~1.3 ms per call, more than half of a short decode (experiments/decoding). The
  reuse is keyed by the model object and checked against `_fingerprint`, so a replaced
  submodule or Variable is split anew. None for a traced model (under an outer
  transform), which is not kept.
  """
  fingerprint = _fingerprint(model)
  hit = _SPLITS.get(model)
  if hit is None or hit.fingerprint != fingerprint:
    graphdef, state = nnx.split(model)
    variables, treedef = jax.tree.flatten(state, is_leaf=_is_variable)
    if any(isinstance(v.get_value(), jax.core.Tracer) for v in variables):
      return None
    hit = _SPLITS[model] = ModelSplit(fingerprint, graphdef, treedef, variables)
  return hit


def _merged(fn: Decoder, graphdef: nnx.GraphDef, treedef: Any, values: list[Array], *args,
            opts: Any) -> Any:
  """`fn` with the model given as its flat state values."""
  return fn(nnx.merge(graphdef, jax.tree.unflatten(treedef, values)), *args, opts=opts)


@functools.cache
def jitted(fn: Decoder, graphdef: nnx.GraphDef, treedef: Any, nested: bool = False):
  """The jitted decoder `fn` of one model structure (models of equal graphdefs share it).

  Built at first use (the compiler options depend on the backend); under a caller's jit
  XLA takes no per-function options.
  """
  fn = functools.partial(_merged, fn, graphdef, treedef)
  if nested:
    return jax.jit(fn, static_argnames=("opts",))
  return xla_options.jit(fn, static_argnames=("opts",))


def decoder_of(fn: Decoder, model: nnx.Module):
  """The jitted `fn` that `call(fn, model, ...)` runs (for tests counting compiles)."""
  s = split(model)
  return jitted(fn, s.graphdef, s.treedef)


def call(fn: Decoder, model: nnx.Module, *args, opts: Any) -> Any:
  """Runs decoder `fn` on `model` in one jitted call, reusing the model's split."""
  s = split(model)
  if s is None or any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(args)):
    graphdef, state = nnx.split(model)  # Under a caller's transform: nothing is kept.
    values, treedef = jax.tree.flatten(state)
    return jitted(fn, graphdef, treedef, nested=True)(values, *args, opts=opts)
  return jitted(fn, s.graphdef, s.treedef)(s.values(), *args, opts=opts)


@functools.cache
def default_rng() -> Array:
  return jax.random.key(0)


def check_tokens(tokens: Any, what: str) -> Array:
  """int32 [B, T] token ids from an array or list ([T] becomes [1, T]); one-line errors."""
  # Host inputs stay NumPy (no device round trip for the checks); jit moves them once.
  tokens_BT = tokens if isinstance(tokens, jax.Array) else np.asarray(tokens)
  if not jnp.issubdtype(tokens_BT.dtype, jnp.integer):
    raise UserError(f"{what} must hold integer token ids, got dtype {tokens_BT.dtype}")
  tokens_BT = tokens_BT.astype(np.int32)
  if tokens_BT.ndim == 1:
    tokens_BT = tokens_BT[None]
  if tokens_BT.ndim != 2 or tokens_BT.shape[0] < 1 or tokens_BT.shape[1] < 1:
    raise UserError(f"{what} must be a non-empty [batch, time] array of token ids, got shape "
                    f"{tokens_BT.shape}: give at least one token")
  return tokens_BT


def check_vocab(tokens_BT: Array, vocab_size: int, what: str) -> None:
  """Every id in 0..vocab_size - 1 (skipped for traced tokens)."""
  if isinstance(tokens_BT, jax.core.Tracer):
    return
  lo, hi = int(tokens_BT.min()), int(tokens_BT.max())
  if lo < 0 or hi >= vocab_size:
    raise UserError(f"{what} holds token id {lo if lo < 0 else hi}, outside the model's "
                    f"vocabulary 0..{vocab_size - 1}")


def check_sampling(temperature: Any, top_k: Any, vocab_size: int) -> None:
  """A finite temperature >= 0 (0 = greedy) and a top_k in 0..V that needs temperature > 0."""
  if not (isinstance(temperature, (int, float, np.floating)) and math.isfinite(temperature)
          and temperature >= 0):
    raise UserError(f"temperature={temperature!r} must be a finite number >= 0 (0 = greedy)")
  if not isinstance(top_k, (int, np.integer)) or not 0 <= top_k <= vocab_size:
    raise UserError(f"top_k={top_k!r} must be an integer in 0..{vocab_size} (0 = no filter)")
  if top_k and temperature == 0:
    raise UserError("top_k needs temperature > 0 (greedy decoding takes the top token)")


def check_eos(eos_id: Any, vocab_size: int) -> int:
  """An end-of-sequence id in 0..V-1, or None (-1: no stop)."""
  if eos_id is None:
    return -1
  if (not isinstance(eos_id, (int, np.integer)) or isinstance(eos_id, bool)
      or not 0 <= eos_id < vocab_size):
    raise UserError(f"eos_id={eos_id!r} must be a token id in 0..{vocab_size - 1} (or None)")
  return int(eos_id)


def check_count(value: Any, name: str, lo: int = 1, hint: str = "") -> int:
  """An integer >= lo (not a bool), or a one-line error naming `name`."""
  if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < lo:
    raise UserError(f"{name}={value!r} must be an integer >= {lo}{hint}")
  return int(value)


def check_prompts(prompt: Any, prompt_lengths: Any, vocab_size: int, pad: int = 0
                  ) -> tuple[Array, np.ndarray | None]:
  """Prompts, possibly of different lengths, as (int32 [B, P] right-padded, lengths [B]).

  `prompt` is an int [B, P] (or [P]) array, or a list of B token sequences of any lengths
  >= 1 (ragged); `prompt_lengths` (int [B], 1..P) says how much of each row of an array
  is prompt. Padding is replaced by `pad`. The lengths are None when every row is P long
  (the decoders then take their equal-length path), and P is the longest prompt.
  One-line errors for bad input.
  """
  if (isinstance(prompt, (list, tuple)) and prompt
      and all(isinstance(row, (list, tuple, np.ndarray, jax.Array)) for row in prompt)
      and len({len(row) for row in prompt}) > 1):  # Ragged rows: pad them.
    if prompt_lengths is not None:
      raise UserError("give either a list of prompts of different lengths or a padded "
                      "array with prompt_lengths, not both")
    rows = [check_tokens(row, f"prompt row {i}") for i, row in enumerate(prompt)]
    if any(row.shape[0] != 1 for row in rows):
      raise UserError("a ragged prompt must be a list of 1-D token sequences")
    prompt_lengths = [row.shape[1] for row in rows]
    prompt = np.zeros((len(rows), max(prompt_lengths)), np.int32)
    for i, row in enumerate(rows):
      prompt[i, :row.shape[1]] = np.asarray(row[0])
  prompt_BP = check_tokens(prompt, "prompt")
  b, p = prompt_BP.shape
  if prompt_lengths is None:
    check_vocab(prompt_BP, vocab_size, "prompt")
    return prompt_BP, None
  lengths_B = np.asarray(prompt_lengths)
  if (lengths_B.shape != (b,) or not np.issubdtype(lengths_B.dtype, np.integer)
      or lengths_B.min() < 1 or lengths_B.max() > p):
    raise UserError(f"prompt_lengths must hold {b} integers in 1..{p} (one per prompt row), "
                    f"got {prompt_lengths!r}")
  lengths_B = lengths_B.astype(np.int32)
  p = int(lengths_B.max())
  valid_BP = np.arange(p)[None] < lengths_B[:, None]
  prompt_BP = np.where(valid_BP, np.asarray(prompt_BP)[:, :p], pad).astype(np.int32)
  check_vocab(prompt_BP, vocab_size, "prompt")
  return prompt_BP, (None if (lengths_B == p).all() else lengths_B)


def check_rng(rng: Any, batch: int) -> Array:
  """A typed PRNG key [] (one for the batch) or [B] (one per row); default `key(0)`."""
  if rng is None:
    return default_rng()
  if not jnp.issubdtype(getattr(rng, "dtype", None), jax.dtypes.prng_key):
    rng = jax.random.wrap_key_data(jnp.asarray(rng, jnp.uint32))  # Raw uint32 key data.
  if rng.shape not in ((), (batch,)):
    raise UserError(f"rng must be one PRNG key or one per prompt row ({batch}), got shape "
                    f"{rng.shape}")
  return rng


def fold_in(key: Array, data: Array) -> Array:
  """`jax.random.fold_in` for one key or a key per row ([B]; data [] or [B])."""
  if key.ndim == 0:
    return jax.random.fold_in(key, data)
  return jax.vmap(jax.random.fold_in, (0, 0 if jnp.ndim(data) else None))(key, data)


def categorical(key: Array, logits_BV: Array) -> Array:
  """int32 [B] draws; with a key per row, row b's draw depends only on its key and logits
  (so it equals that row's draw decoded alone)."""
  if key.ndim == 0:
    return jax.random.categorical(key, logits_BV).astype(jnp.int32)
  return jax.vmap(jax.random.categorical)(key, logits_BV).astype(jnp.int32)


def uniform(key: Array, shape: tuple[int, ...]) -> Array:
  """U[0, 1) of `shape` ([B, ...]); with a key per row, row b's from its own key."""
  if key.ndim == 0:
    return jax.random.uniform(key, shape)
  return jax.vmap(lambda k: jax.random.uniform(k, shape[1:]))(key)
