"""Tests for deep-supervision loss weights and the weighted per-layer cross entropy."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepexit_jax.errors import UserError
from deepexit_jax.losses import deep_supervision_loss, resolve_loss_weights, token_nll


@pytest.mark.parametrize("spec, num_layers, expected", [
    ("reference", 4, [0.0, 0.7, 0.0, 0.3]),
    ("reference", 6, [0.0, 0.7, 0.0, 0.3, 0.0, 0.0]),
    ("final", 4, [0.0, 0.0, 0.0, 1.0]),
    ("final", 1, [1.0]),
    ("uniform", 4, [0.25, 0.25, 0.25, 0.25]),
    ("linear", 4, [0.1, 0.2, 0.3, 0.4]),
    ("linear", 2, [1 / 3, 2 / 3]),
    ({2: 0.7, 4: 0.3}, 4, [0.0, 0.7, 0.0, 0.3]),
    ({"1": 2, 3: 0.5}, 3, [2.0, 0.0, 0.5]),  # Explicit weights are used as given.
    ("2:0.7,4:0.3", 4, [0.0, 0.7, 0.0, 0.3]),
    (" 2:0.7, 4:0.3 ", 5, [0.0, 0.7, 0.0, 0.3, 0.0]),
    ("3:1", 3, [0.0, 0.0, 1.0]),
])
def test_resolve_loss_weights(spec, num_layers, expected):
  weights = resolve_loss_weights(spec, num_layers)
  assert weights.dtype == np.float32
  chex.assert_shape(weights, (num_layers,))
  chex.assert_trees_all_close(weights, np.asarray(expected, np.float32), atol=1e-7)


@pytest.mark.parametrize("preset", ["final", "uniform", "linear"])
@pytest.mark.parametrize("num_layers", [1, 3, 8])
def test_presets_sum_to_one(preset, num_layers):
  assert resolve_loss_weights(preset, num_layers).sum() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("spec, num_layers, words", [
    ("2:-0.5", 4, ["layer 2", "-0.5", ">= 0"]),
    ({3: -1.0}, 4, ["layer 3", ">= 0"]),
    ("2:nan", 4, ["layer 2", "finite"]),
    ("1:inf,2:1", 4, ["layer 1", "finite"]),
    ("1:0,2:0", 4, ["all loss weights are zero"]),
    ({1: 0.0}, 2, ["all loss weights are zero"]),
    ("0:1", 4, ["layer 0", "1..4"]),
    ("5:1", 4, ["layer 5", "1..4"]),
    ({7: 1.0}, 6, ["layer 7", "1..6"]),
    ("reference", 3, ["layer 4", "1..3"]),  # The reference recipe needs 4 layers.
    ("2=0.7", 4, ["neither a preset", "layer:weight"]),
    ("2:0.7,", 4, ["neither a preset", "layer:weight"]),
    ("2:x", 4, ["neither a preset", "layer:weight"]),
    ("two:0.5", 4, ["neither a preset", "layer:weight"]),
    ("", 4, ["neither a preset", "layer:weight"]),
    ("Uniform", 4, ["neither a preset", "reference, final, uniform, linear"]),
])
def test_resolve_loss_weights_rejects(spec, num_layers, words):
  with pytest.raises(UserError) as info:
    resolve_loss_weights(spec, num_layers)
  for word in words:
    assert word in str(info.value)


def _log_softmax_np(x):
  x = x.astype(np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _problem(seed=0, n=3, b=2, t=5, v=7):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(n, b, t, v)).astype(np.float32) * 3
  targets = rng.integers(0, v, size=(b, t)).astype(np.int32)
  mask = np.ones((b, t), np.float32)
  mask[0, 3:] = 0.0  # Padding at the end of one row.
  mask[1, 0] = 0.0
  return logits, targets, mask


@pytest.mark.parametrize("weights", [[0.2, 0.0, 0.8], [1.0, 1.0, 1.0], [0.0, 0.0, 2.5]])
def test_deep_supervision_loss_matches_hand_computation(weights):
  logits, targets, mask = _problem()
  weights = np.asarray(weights, np.float32)

  logp = _log_softmax_np(logits)
  nll = -np.take_along_axis(logp, targets[None, :, :, None], axis=-1)[..., 0]  # [N, B, T]
  layer_nll = (nll * mask).sum(axis=(1, 2)) / mask.sum()
  expected_loss = float(weights @ layer_nll)

  nll_NBT = token_nll(jnp.asarray(logits), jnp.asarray(targets)[None])
  chex.assert_trees_all_close(nll_NBT, nll, rtol=1e-5, atol=1e-5)
  loss, per_layer = deep_supervision_loss(nll_NBT, jnp.asarray(mask), jnp.asarray(weights))
  chex.assert_shape(loss, ())
  chex.assert_trees_all_close(per_layer, layer_nll, rtol=1e-5, atol=1e-6)
  assert float(loss) == pytest.approx(expected_loss, rel=1e-5)


def test_padding_does_not_change_the_loss():
  logits, targets, mask = _problem(1)
  noisy = logits.copy()
  noisy[:, mask == 0] = 100.0  # Garbage logits at every padded position.
  weights = jnp.asarray([0.3, 0.3, 0.4])

  def loss(x):
    return deep_supervision_loss(token_nll(jnp.asarray(x), jnp.asarray(targets)[None]),
                                 jnp.asarray(mask), weights)

  chex.assert_trees_all_close(loss(logits), loss(noisy), rtol=1e-6)


def test_token_nll_is_float32_for_bfloat16_logits():
  logits, targets, _ = _problem(2)
  nll = token_nll(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(targets)[None])
  assert nll.dtype == jnp.float32


@pytest.mark.parametrize("weights", [[0.0, 0.7, 0.0, 0.3], [1.0, 0.0, 0.0, 0.0]])
def test_zero_weight_layers_get_zero_gradient(weights):
  logits, targets, mask = _problem(3, n=4)
  weights_N = jnp.asarray(weights)

  def loss(logits_NBTV):
    nll_NBT = token_nll(logits_NBTV, jnp.asarray(targets)[None])
    return deep_supervision_loss(nll_NBT, jnp.asarray(mask), weights_N)[0]

  grad = np.asarray(jax.grad(loss)(jnp.asarray(logits)))
  for n, w in enumerate(weights):
    if w == 0:
      assert np.all(grad[n] == 0.0), f"layer {n + 1} has weight 0 but gets gradient"
    else:
      assert np.all(np.abs(grad[n][mask == 1]).sum(-1) > 0), f"layer {n + 1} gets no gradient"
    assert np.all(grad[n][mask == 0] == 0.0), "padded positions must get no gradient"
