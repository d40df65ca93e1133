"""Deep-supervision loss: a weighted sum of every layer's cross entropy."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from deepexit_jax.errors import UserError

# The reference recipe: exit at layer 2, loss weights {2: 0.7, 4: 0.3}.
REFERENCE_WEIGHTS = {2: 0.7, 4: 0.3}
PRESETS = ("reference", "final", "uniform", "linear")


def resolve_loss_weights(spec: str | Mapping[int, float], num_layers: int) -> np.ndarray:
  """Turns a loss-weight spec into one weight per layer.

  Args:
    spec: a preset name — "reference" ({2: 0.7, 4: 0.3}), "final" (last layer
      only), "uniform" (1/N each), "linear" (weight proportional to the layer
      index, as CALM) — or explicit 1-based weights, as a mapping or a string
      "2:0.7,4:0.3". Explicit weights are used as given; presets sum to 1.
    num_layers: N.

  Returns:
    float32 array [N]; entry i is the weight of layer i + 1.

  Raises:
    UserError: unknown preset, malformed string, layer outside 1..N, negative
      or non-finite weights, or all weights zero.
  """
  if isinstance(spec, str):
    name = spec.strip()
    if name == "reference":
      spec = REFERENCE_WEIGHTS
    elif name == "final":
      spec = {num_layers: 1.0}
    elif name == "uniform":
      spec = {layer: 1.0 / num_layers for layer in range(1, num_layers + 1)}
    elif name == "linear":
      total = num_layers * (num_layers + 1) / 2
      spec = {layer: layer / total for layer in range(1, num_layers + 1)}
    else:
      spec = _parse_weight_string(name)
  weights = np.zeros(num_layers, np.float32)
  for layer, weight in dict(spec).items():
    layer, weight = int(layer), float(weight)
    if not 1 <= layer <= num_layers:
      raise UserError(
          f"loss weight given for layer {layer}, but the model has layers 1..{num_layers}: "
          "fix loss.weights or model.num_layers")
    if not np.isfinite(weight) or weight < 0:
      raise UserError(f"loss weight for layer {layer} is {weight}: weights must be finite and >= 0")
    weights[layer - 1] = weight
  if not weights.any():
    raise UserError("all loss weights are zero: give at least one layer a positive weight")
  return weights


def _parse_weight_string(text: str) -> dict[int, float]:
  out = {}
  for part in text.split(","):
    layer, sep, weight = part.partition(":")
    try:
      if not sep:
        raise ValueError
      out[int(layer)] = float(weight)
    except ValueError:
      raise UserError(
          f"loss.weights={text!r} is neither a preset ({', '.join(PRESETS)}) nor "
          "'layer:weight,...' (e.g. '2:0.7,4:0.3')") from None
  return out


def token_nll(logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
  """Negative log-likelihood of each target token, [B, T], computed in float32."""
  return optax.softmax_cross_entropy_with_integer_labels(
      logits_BTV.astype(jnp.float32), targets_BT)


def masked_mean(x_NBT: jax.Array, mask_BT: jax.Array) -> jax.Array:
  """Mean over the masked (B, T) positions, for every leading index: [N]."""
  return jnp.sum(x_NBT * mask_BT, axis=(-2, -1)) / jnp.maximum(jnp.sum(mask_BT), 1.0)


def deep_supervision_loss(nll_NBT: jax.Array, mask_BT: jax.Array,
                          weights_N: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Weighted sum of per-layer mean cross entropy.

  Args:
    nll_NBT: per-layer, per-token negative log-likelihood.
    mask_BT: 1 where a target counts, 0 for padding.
    weights_N: per-layer loss weights (`resolve_loss_weights`).

  Returns:
    (scalar loss, per-layer mean NLL [N]).
  """
  layer_nll_N = masked_mean(nll_NBT, mask_BT)
  return jnp.dot(weights_N, layer_nll_N), layer_nll_N
