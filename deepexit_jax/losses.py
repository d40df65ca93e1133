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
# LayerSkip's per-layer loss scales as functions of the 1-based layer index l,
# normalised to sum to 1 ("linear" is CALM's name for "l").
_SCALES = {
    "uniform": np.ones_like,
    "linear": lambda idx: idx,
    "l": lambda idx: idx,
    "sum_l": lambda idx: idx * (idx + 1) / 2,  # 1 + 2 + ... + l
    "sqrt_l": np.sqrt,
    "inv_l": lambda idx: 1.0 / idx,
    "inv_sqrt_l": lambda idx: 1.0 / np.sqrt(idx),
}
PRESETS = ("reference", "final", *_SCALES)


def resolve_loss_weights(spec: str | Mapping[int, float], num_layers: int) -> np.ndarray:
  """Turns a loss-weight spec into one weight per layer.

  Args:
    spec: a preset name — "reference" ({2: 0.7, 4: 0.3}), "final" (last layer
      only), or one of LayerSkip's scales of the 1-based layer index l, each
      normalised to sum to 1: "uniform" (1), "l" (l; CALM's weighting, also
      called "linear"), "sum_l" (1 + ... + l), "sqrt_l", "inv_l" (1 / l),
      "inv_sqrt_l" — or explicit 1-based weights, as a mapping or a string
      "2:0.7,4:0.3". Explicit weights are used as given.
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
    elif name in _SCALES:
      scale_N = _SCALES[name](np.arange(1, num_layers + 1, dtype=np.float64))
      spec = dict(enumerate((scale_N / scale_N.sum()).tolist(), start=1))
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


# Training recipes beyond fixed weights: early-exit curricula, confidence-aware
# weighting and self-distillation (see `config.RecipeConfig`).

CURRICULA = ("none", "rotational", "gradual")


def curriculum_mask(step: jax.Array | int, weights_N: np.ndarray, curriculum: str, *,
                    total_steps: int, rotation_period: int = 2,
                    gradual_fraction: float = 0.5) -> jax.Array:
  """Which supervised layers have a loss at `step` under an early-exit curriculum.

  The deepest supervised layer (highest positive weight index) always trains; the
  curriculum acts on the other supervised layers, the "early exits" (LayerSkip):
    rotational: the k-th early exit (k = 0, 1, ... in depth order) trains at the
      steps with (k + step) % rotation_period == 0, so a different subset trains
      each step and every early exit trains once per `rotation_period` steps.
    gradual: early exits are enabled from the top down; the exit at 0-based layer
      i of N joins at step >= gradual_fraction * total_steps * (N - i) / N, so the
      shallowest joins once `gradual_fraction` of training is done.

  Args:
    step: the 0-based training step (traced inside the jitted step).
    weights_N: the static per-layer loss weights (`resolve_loss_weights`).
    curriculum: one of `CURRICULA`.
    total_steps: training steps of the run (gradual).
    rotation_period: R of the rotational curriculum, >= 1.
    gradual_fraction: fraction of training over which gradual enables layers.

  Returns:
    bool [N]: True for layers whose loss counts at this step.
  """
  n = weights_N.shape[0]
  supervised = np.flatnonzero(weights_N > 0)
  early_N = np.zeros(n, bool)
  early_N[supervised[:-1]] = True
  step = jnp.asarray(step, jnp.int32)
  if curriculum == "none":
    return jnp.asarray(weights_N > 0)
  if curriculum == "rotational":
    rank_N = np.cumsum(early_N) - 1  # k of each early exit
    on_N = (jnp.asarray(rank_N) + step) % rotation_period == 0
  elif curriculum == "gradual":
    start_N = np.asarray([gradual_fraction * total_steps * (n - i) / n for i in range(n)])
    on_N = step.astype(jnp.float32) >= jnp.asarray(start_N, jnp.float32)
  else:
    raise UserError(f"recipe.curriculum={curriculum!r}: choose one of {', '.join(CURRICULA)}")
  return jnp.where(jnp.asarray(early_N), on_N, jnp.asarray(weights_N > 0))


def curriculum_weights(weights_N: np.ndarray, on_N: jax.Array) -> jax.Array:
  """Weights of the layers switched on, rescaled to keep the weights' total.

  For normalised presets this is LayerSkip's normalisation over the enabled
  layers (they sum to 1 at every step); explicit weights keep their sum.
  """
  w_N = jnp.asarray(weights_N) * on_N
  return w_N * (float(weights_N.sum()) / jnp.sum(w_N))


def token_confidence(logits_BTV: jax.Array) -> jax.Array:
  """Max softmax probability of each prediction, [B, T], float32, no gradient."""
  logits_BTV = jax.lax.stop_gradient(logits_BTV.astype(jnp.float32))
  return jnp.exp(jnp.max(logits_BTV, -1) - jax.nn.logsumexp(logits_BTV, -1))


def distillation_kl(student_BTV: jax.Array, teacher_BTV: jax.Array,
                    temperature: float) -> jax.Array:
  """FREE's shallow-deep distillation term per token, [B, T].

  T^2 * KL(softmax(teacher / T) || softmax(student / T)), the teacher under
  `stop_gradient` (the deep exit teaches, it is not pulled towards the shallow).
  """
  t_logp = jax.nn.log_softmax(
      jax.lax.stop_gradient(teacher_BTV.astype(jnp.float32)) / temperature, -1)
  s_logp = jax.nn.log_softmax(student_BTV.astype(jnp.float32) / temperature, -1)
  return temperature ** 2 * jnp.sum(jnp.exp(t_logp) * (t_logp - s_logp), -1)


def recipe_loss(nll_NBT: jax.Array, mask_BT: jax.Array, weights_N: jax.Array, *,
                teacher_layer: int, conf_NBT: jax.Array | None = None,
                confidence_power: float = 0.0, kd_NBT: jax.Array | None = None,
                kd_weight: float = 0.0) -> tuple[jax.Array, jax.Array]:
  """Deep-supervision loss with the confidence-aware and distillation recipes.

  For every early exit l (any layer but `teacher_layer`), the per-layer term is
    (1 - kd_weight) * CE_l + kd_weight * KD_l
  where CE_l is the token mean of the NLL weighted by conf^confidence_power
  (EE-LLM-style confidence-aware loss: the exit learns most from the tokens it is
  confident on, the ones it will serve; weights normalised to mean 1 over the
  batch, no gradient through them) and KD_l the mean `distillation_kl` from the
  teacher. The teacher layer keeps its plain mean NLL.

  Args:
    nll_NBT, mask_BT, weights_N: as `deep_supervision_loss` (weights may be traced).
    teacher_layer: 0-based index of the deepest supervised layer.
    conf_NBT: each exit's confidence (`token_confidence`); needed if
      confidence_power > 0.
    confidence_power: alpha >= 0; 0 disables the confidence weighting.
    kd_NBT: `distillation_kl` per layer (teacher row ignored); needed if kd_weight > 0.
    kd_weight: beta in [0, 1]; 0 disables distillation.

  Returns:
    (scalar loss, per-layer plain mean NLL [N] for reporting).
  """
  layer_nll_N = masked_mean(nll_NBT, mask_BT)
  early_N = jnp.arange(nll_NBT.shape[0]) != teacher_layer
  term_N = layer_nll_N
  if confidence_power > 0:
    tok_NBT = jnp.power(conf_NBT, confidence_power) * mask_BT
    tok_NBT = tok_NBT / jnp.maximum(jnp.sum(tok_NBT, (1, 2), keepdims=True), 1e-30)
    term_N = jnp.where(early_N, jnp.sum(tok_NBT * nll_NBT, (1, 2)), term_N)
  if kd_weight > 0:
    kd_N = masked_mean(kd_NBT, mask_BT)
    term_N = jnp.where(early_N, (1 - kd_weight) * term_N + kd_weight * kd_N, term_N)
  return jnp.dot(weights_N, term_N), layer_nll_N
