"""Tests for the training recipes: loss scales, curricula, layer dropout, KD, confidence."""

import dataclasses
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_model
from flax import nnx

from deepexit_jax import losses
from deepexit_jax.config import ExperimentConfig, RecipeConfig
from deepexit_jax.errors import UserError
from deepexit_jax.losses import curriculum_mask, curriculum_weights, resolve_loss_weights
from deepexit_jax.model import ModelConfig, all_layer_logits, create_model
from deepexit_jax.train import (
    Trainer,
    deep_supervision_loss,
    exit_terms,
    layer_dropout_rates,
    layer_keep_mask,
    layer_nll,
    train,
)

VOCAB = 40
TOTAL_STEPS = 80


def _config(tiny_config, loss_weights=None, num_layers=None, **recipe) -> ExperimentConfig:
  cfg = tiny_config()
  model = cfg.model if num_layers is None else dataclasses.replace(cfg.model,
                                                                   num_layers=num_layers)
  cfg = dataclasses.replace(cfg, model=dataclasses.replace(model, vocab_size=VOCAB),
                            recipe=RecipeConfig(**recipe))
  return dataclasses.replace(cfg, loss_weights=loss_weights or cfg.loss_weights)


def _batch(seed=0, b=4, t=16):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.integers(0, VOCAB, (b, t)), jnp.int32),
          jnp.asarray(rng.integers(0, VOCAB, (b, t)), jnp.int32))


# Per-layer loss scales (LayerSkip), normalised.


def _norm(x):
  x = np.asarray(x, np.float64)
  return x / x.sum()


@pytest.mark.parametrize("spec, num_layers, expected", [
    ("uniform", 4, [0.25, 0.25, 0.25, 0.25]),
    ("l", 4, [0.1, 0.2, 0.3, 0.4]),
    ("linear", 4, [0.1, 0.2, 0.3, 0.4]),  # CALM's weighting is LayerSkip's "l".
    ("sum_l", 4, [0.05, 0.15, 0.3, 0.5]),  # 1, 1+2, 1+2+3, 1+...+4 over 20.
    ("sum_l", 3, [0.1, 0.3, 0.6]),
    ("sqrt_l", 4, _norm([1, math.sqrt(2), math.sqrt(3), 2])),
    ("inv_l", 4, [12 / 25, 6 / 25, 4 / 25, 3 / 25]),  # 1, 1/2, 1/3, 1/4 over 25/12.
    ("inv_sqrt_l", 4, _norm([1, 1 / math.sqrt(2), 1 / math.sqrt(3), 0.5])),
    ("inv_l", 1, [1.0]),
])
def test_loss_scale_presets_are_exact_and_normalised(spec, num_layers, expected):
  weights = resolve_loss_weights(spec, num_layers)
  chex.assert_trees_all_close(weights, np.asarray(expected, np.float32), atol=1e-7)
  assert weights.sum() == pytest.approx(1.0, abs=1e-6)


def test_scales_order_layers_as_named():
  inc = [resolve_loss_weights(s, 6) for s in ("l", "sum_l", "sqrt_l")]
  dec = [resolve_loss_weights(s, 6) for s in ("inv_l", "inv_sqrt_l")]
  assert all(np.all(np.diff(w) > 0) for w in inc)
  assert all(np.all(np.diff(w) < 0) for w in dec)


# Curricula.


def _on(step, weights, curriculum, **kw):
  return np.asarray(curriculum_mask(step, np.asarray(weights, np.float32), curriculum,
                                    total_steps=TOTAL_STEPS, **kw)).tolist()


@pytest.mark.parametrize("period", [1, 2, 3])
def test_rotational_covers_every_early_exit_once_per_cycle(period):
  weights = resolve_loss_weights("uniform", 6)
  counts = np.zeros(6, int)
  for step in range(10 * period, 11 * period):  # any full cycle
    on = _on(step, weights, "rotational", rotation_period=period)
    assert on[-1]  # the final layer always trains
    counts += on
  np.testing.assert_array_equal(counts, [1] * 5 + [period])


def test_rotational_masks_per_step():
  uniform = resolve_loss_weights("uniform", 4)
  assert _on(0, uniform, "rotational") == [True, False, True, True]
  assert _on(1, uniform, "rotational") == [False, True, False, True]
  assert _on(2, uniform, "rotational") == [True, False, True, True]
  # Only supervised layers rotate; zero-weight layers never train.
  ref = resolve_loss_weights("2:0.7,4:0.3", 4)
  assert _on(0, ref, "rotational") == [False, True, False, True]
  assert _on(1, ref, "rotational") == [False, False, False, True]


def test_gradual_enables_early_exits_top_down_on_schedule():
  w = resolve_loss_weights("uniform", 4)
  # fraction 0.5 of 80 steps: layer i (0-based) joins at 40 * (4 - i) / 4 = 40, 30, 20.
  expected = {0: [0, 0, 0, 1], 19: [0, 0, 0, 1], 20: [0, 0, 1, 1], 29: [0, 0, 1, 1],
              30: [0, 1, 1, 1], 39: [0, 1, 1, 1], 40: [1, 1, 1, 1], 79: [1, 1, 1, 1]}
  jitted = jax.jit(lambda s: curriculum_mask(s, w, "gradual", total_steps=TOTAL_STEPS,
                                             gradual_fraction=0.5))
  for step, on in expected.items():
    assert _on(step, w, "gradual", gradual_fraction=0.5) == [bool(x) for x in on]
    assert np.asarray(jitted(jnp.int32(step))).tolist() == [bool(x) for x in on]
  assert _on(0, w, "gradual", gradual_fraction=0.0) == [True] * 4


def test_curriculum_weights_renormalise_over_enabled_layers():
  w = resolve_loss_weights("sum_l", 4)  # 0.05, 0.15, 0.3, 0.5
  got = curriculum_weights(w, jnp.asarray([True, False, True, True]))
  chex.assert_trees_all_close(got, jnp.asarray([0.05, 0.0, 0.3, 0.5]) / 0.85, atol=1e-6)
  explicit = np.asarray([0.0, 0.7, 0.0, 0.3], np.float32)  # explicit weights keep their sum
  chex.assert_trees_all_close(curriculum_weights(explicit, jnp.asarray([0, 0, 0, 1]) > 0),
                              jnp.asarray([0.0, 0.0, 0.0, 1.0]), atol=1e-6)


# Layer dropout.


@pytest.mark.parametrize("schedule, expected", [
    ("uniform", [0.2, 0.2, 0.2, 0.2]),
    ("linear", [0.0, 0.2 / 3, 0.4 / 3, 0.2]),
    ("exponential", [0.0, 0.2 * (2 ** (1 / 3) - 1), 0.2 * (2 ** (2 / 3) - 1), 0.2]),
])
def test_layer_dropout_rates_per_schedule(schedule, expected):
  chex.assert_trees_all_close(layer_dropout_rates(4, 0.2, schedule),
                              np.asarray(expected, np.float32), atol=1e-7)


@pytest.mark.parametrize("schedule", ["uniform", "linear", "exponential"])
def test_layer_keep_mask_rate_per_depth_per_sample(schedule):
  rates = layer_dropout_rates(4, 0.5, schedule)
  keep = np.asarray(layer_keep_mask(jax.random.PRNGKey(3), rates, 20_000))
  assert keep.shape == (4, 20_000)
  np.testing.assert_allclose(1 - keep.mean(1), rates, atol=0.015)
  for i in np.flatnonzero(rates > 0):  # drawn per sample, not one coin per layer
    assert 0 < keep[i].mean() < 1
  again = np.asarray(layer_keep_mask(jax.random.PRNGKey(3), rates, 20_000))
  np.testing.assert_array_equal(keep, again)  # deterministic by key
  other = np.asarray(layer_keep_mask(jax.random.PRNGKey(4), rates, 20_000))
  assert (keep != other).any() or not rates.any()


@pytest.mark.parametrize("use_scan", [True, False])
def test_dropped_layer_passes_its_input_through_for_that_sample_only(use_scan):
  model = create_model(ModelConfig(vocab_size=VOCAB, num_layers=3, dim=16, num_heads=2,
                                   max_len=16, remat="full"), seed=1)
  tokens, _ = _batch(b=2)
  keep = jnp.asarray([[True, True], [False, True], [True, True]])  # sample 0 skips layer 2
  hidden = nnx.jit(lambda m, k: m(tokens, layer_keep_NB=k, use_scan=use_scan).hidden_NBTD)
  full, dropped = hidden(model, None), hidden(model, keep)
  chex.assert_trees_all_close(dropped[1, 0], dropped[0, 0])
  chex.assert_trees_all_close(dropped[:, 1], full[:, 1], atol=1e-6)
  assert not np.allclose(dropped[2, 0], full[2, 0], atol=1e-3)


def _count(jaxpr, primitive: str) -> int:
  """Equations of `primitive` in a jaxpr, nested jaxprs (scan and remat bodies) included."""
  n = 0
  for eqn in jaxpr.eqns:
    n += eqn.primitive.name == primitive
    for v in eqn.params.values():
      for j in v if isinstance(v, tuple | list) else (v,):
        inner = j if hasattr(j, "eqns") else getattr(j, "jaxpr", None)
        if inner is not None and hasattr(inner, "eqns"):
          n += _count(inner, primitive)
  return n


def _scan_body(jaxpr):
  (eqn,) = [e for e in jaxpr.eqns if e.primitive.name == "scan"]
  return eqn.params["jaxpr"].jaxpr


def test_layer_dropout_runs_inside_the_one_scan_and_is_off_at_eval(tiny_config):
  cfg = _config(tiny_config, num_layers=3, loss_weights="uniform", layer_dropout=0.5,
                layer_dropout_schedule="uniform")
  trainer = Trainer(cfg, TOTAL_STEPS)
  params = trainer.initial_state.params
  x, y = _batch()
  mask = jnp.ones(x.shape, jnp.float32)
  plain = Trainer(dataclasses.replace(cfg, recipe=RecipeConfig()), TOTAL_STEPS)
  jaxprs = [jax.make_jaxpr(lambda p, t=t: t._loss(p, x, y, mask, jnp.int32(5))[0])(
      params).jaxpr for t in (trainer, plain)]
  assert _count(jaxprs[0], "scan") == 1
  # The keep mask is applied in the scan body: one more select there than without it.
  assert _count(_scan_body(jaxprs[0]), "select_n") == _count(_scan_body(jaxprs[1]),
                                                             "select_n") + 1
  loss = jax.jit(lambda p, step: trainer._loss(p, x, y, mask, step)[0])
  loss_a, loss_b, loss_c = (loss(params, jnp.int32(s)) for s in (5, 5, 6))
  assert float(loss_a) == float(loss_b)  # deterministic by (seed, step)
  assert float(loss_a) != float(loss_c)  # a new mask each step
  chex.assert_trees_all_equal(trainer.eval_step(params, x, y, mask),
                              plain.eval_step(params, x, y, mask))


# Self-distillation and confidence-aware weighting against a direct computation.


def _log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


@pytest.mark.parametrize("recipe", [
    dict(kd_weight=0.3, kd_temperature=2.0),
    dict(confidence_power=1.5),
    dict(kd_weight=0.5, kd_temperature=1.0, confidence_power=1.0),
])
def test_kd_and_confidence_losses_match_a_direct_computation(tiny_config, recipe):
  cfg = _config(tiny_config, num_layers=3, loss_weights="1:0.2,2:0.3,3:0.5", **recipe)
  cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dropout=0.0))
  trainer = Trainer(cfg, TOTAL_STEPS)
  # Every parameter random: layers disagree, so the KD and confidence terms are far from
  # their values at initialisation (KL ~ 0, confidence ~ 1/V).
  params = nnx.state(random_model(cfg.model, seed=2), nnx.Param)
  x, y = _batch(seed=1)
  mask = np.ones(x.shape, np.float32)
  mask[-1, 10:] = 0  # padding is excluded from every mean
  loss, layer_nll_N = jax.jit(trainer._loss)(params, x, y, jnp.asarray(mask), jnp.int32(0))

  logits = np.asarray(all_layer_logits(trainer.model(params), x), np.float64)
  logp = _log_softmax(logits)
  nll = -np.take_along_axis(logp, np.asarray(y)[None, ..., None], -1)[..., 0]
  conf = np.exp(logp.max(-1))
  t = recipe.get("kd_temperature", 1.0)
  t_logp, s_logp = _log_softmax(logits[-1] / t), _log_softmax(logits / t)
  kd = t * t * (np.exp(t_logp) * (t_logp - s_logp)).sum(-1)
  alpha, beta = recipe.get("confidence_power", 0.0), recipe.get("kd_weight", 0.0)
  expected = 0.0
  for i, w in enumerate([0.2, 0.3, 0.5]):
    tok = conf[i] ** alpha * mask if (alpha > 0 and i < 2) else mask
    term = (tok * nll[i]).sum() / tok.sum()
    if i < 2:
      term = (1 - beta) * term + beta * (kd[i] * mask).sum() / mask.sum()
    expected += w * term
  assert float(loss) == pytest.approx(expected, rel=2e-5)
  np.testing.assert_allclose(layer_nll_N, (nll * mask).sum((1, 2)) / mask.sum(), rtol=2e-5)


def test_recipe_gradient_treats_confidence_weights_and_teacher_as_constants():
  """The training loss's gradient (`exit_terms` + `recipe_loss`, as the train step calls
  them) equals the gradient of the same loss in which each token's confidence weight and
  the distillation teacher are precomputed constants."""
  config = ModelConfig(vocab_size=VOCAB, num_layers=3, dim=16, num_heads=2, max_len=16)
  model = random_model(config, seed=2)  # confident and varied: the weights matter
  graphdef, params = nnx.split(model, nnx.Param)
  recipe = dict(kd_weight=0.5, kd_temperature=2.0, confidence_power=1.5)
  weights = np.array([0.2, 0.3, 0.5], np.float32)
  x, y = _batch(seed=1)
  mask = np.ones(x.shape, np.float32)
  mask[-1, 10:] = 0
  alpha, beta = recipe.get("confidence_power", 0.0), recipe.get("kd_weight", 0.0)
  t = recipe.get("kd_temperature", 1.0)

  def loss(p):
    terms = exit_terms(nnx.merge(graphdef, p), x, y, weights, confidence=True,
                       kd_temperature=t if beta else None)
    return losses.recipe_loss(terms.nll_NBT, jnp.asarray(mask), jnp.asarray(weights),
                              teacher_layer=2, conf_NBT=terms.conf_NBT,
                              confidence_power=alpha, kd_NBT=terms.kd_NBT, kd_weight=beta)[0]

  logits0 = np.asarray(all_layer_logits(model, x), np.float64)
  conf = jnp.asarray(np.exp(_log_softmax(logits0).max(-1)), jnp.float32)  # constants
  teacher_logp = jnp.asarray(_log_softmax(logits0[-1] / t), jnp.float32)

  def reference(p):
    logits = nnx.merge(graphdef, p)(x).per_layer
    logp = jax.nn.log_softmax(logits, -1)
    nll = -jnp.take_along_axis(logp, y[None, ..., None], -1)[..., 0]
    total = weights[2] * (nll[2] * mask).sum() / mask.sum()
    for i in (0, 1):
      tok = conf[i] ** alpha * mask
      kd = t * t * (jnp.exp(teacher_logp) * (teacher_logp - jax.nn.log_softmax(
          logits[i] / t, -1))).sum(-1)
      total += weights[i] * ((1 - beta) * (tok * nll[i]).sum() / tok.sum()
                             + beta * (kd * mask).sum() / mask.sum())
    return total

  value, grad = jax.jit(jax.value_and_grad(loss))(params)
  expected_value, expected = jax.jit(jax.value_and_grad(reference))(params)
  # Measured max |difference| 1.2e-7 (float32 rounding); a gradient through the
  # weights moves entries by 0.1-0.3.
  chex.assert_trees_all_close(grad, expected, atol=1e-6, rtol=0)
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(expected)) > 1e-2
  assert float(value) == pytest.approx(float(expected_value), rel=1e-5)


def test_distillation_does_not_pull_the_teacher():
  s, t = np.random.default_rng(0).normal(size=(2, 3, 5, 7)).astype(np.float32)
  g_s, g_t = jax.jit(jax.grad(lambda s, t: losses.distillation_kl(s, t, 2.0).sum(),
                              argnums=(0, 1)))(s, t)
  assert not np.asarray(g_t).any() and np.asarray(g_s).any()
  assert float(losses.distillation_kl(t, t, 2.0).max()) == pytest.approx(0.0, abs=1e-6)


def test_exit_terms_nll_equals_layer_nll(tiny_config):
  cfg = _config(tiny_config, num_layers=3, loss_weights="2:1")
  model = create_model(cfg.model, seed=0)
  x, y = _batch()
  w = resolve_loss_weights("2:1", 3)
  terms = nnx.jit(lambda m: exit_terms(m, x, y, w, confidence=True, kd_temperature=1.0))(model)
  chex.assert_trees_all_close(terms.nll_NBT, nnx.jit(lambda m: layer_nll(m, x, y, w))(model),
                              atol=1e-5)
  assert not np.asarray(terms.kd_NBT[1]).any()  # the teacher (layer 2) has no KD term


# Defaults cost nothing and train as before.


def test_default_recipe_traces_the_plain_deep_supervision_loss(tiny_config):
  cfg = _config(tiny_config)
  trainer = Trainer(cfg, TOTAL_STEPS)
  params = trainer.initial_state.params
  x, y = _batch()
  mask = jnp.ones(x.shape, jnp.float32)
  w = trainer.weights_np
  assert cfg.model.dropout > 0  # so the step's dropout key is part of the trace

  def plain(p):
    model = nnx.merge(trainer.graphdef, p)
    key = jax.random.fold_in(trainer.dropout_key, jnp.int32(3))
    return deep_supervision_loss(
        layer_nll(model, x, y, w, dropout_rng=key, zero_weight_layers=False), mask,
        jnp.asarray(w))

  ours = jax.make_jaxpr(lambda p: trainer._loss(p, x, y, mask, jnp.int32(3)))(params)
  assert str(ours) == str(jax.make_jaxpr(plain)(params))


@pytest.mark.parametrize("recipe, words", [
    (dict(curriculum="cyclic"), ["recipe.curriculum", "rotational"]),
    (dict(rotation_period=0), ["recipe.rotation_period", ">= 1"]),
    (dict(gradual_fraction=1.5), ["recipe.gradual_fraction", "[0.0, 1.0]"]),
    (dict(layer_dropout=1.0), ["recipe.layer_dropout"]),
    (dict(layer_dropout_schedule="cosine"), ["recipe.layer_dropout_schedule", "exponential"]),
    (dict(kd_weight=-0.1), ["recipe.kd_weight"]),
    (dict(kd_temperature=0.0), ["recipe.kd_temperature"]),
    (dict(confidence_power=float("nan")), ["recipe.confidence_power"]),
    (dict(warmup=3), ["unknown recipe field", "warmup"]),
])
def test_bad_recipe_options_are_one_line_errors(config_dict, recipe, words):
  d = config_dict()
  d["recipe"] = recipe
  with pytest.raises(UserError) as e:
    ExperimentConfig.from_dict(d)
  assert "\n" not in str(e.value)
  for w in words:
    assert w in str(e.value)


def test_a_run_with_every_recipe_trains_and_resume_checks_the_recipe(config_dict, tmp_path):
  d = config_dict(max_steps=6, eval_every=3, log_every=3)
  d["recipe"] = dict(curriculum="rotational", layer_dropout=0.3, confidence_power=1.0,
                     kd_weight=0.5, kd_temperature=2.0)
  result = train(ExperimentConfig.from_dict(d), str(tmp_path / "run"), stop_at_step=3)
  assert all(math.isfinite(p) for p in result.best["layer_ppl"])
  d["recipe"]["kd_weight"] = 0.1
  with pytest.raises(UserError, match="recipe"):
    train(ExperimentConfig.from_dict(d), str(tmp_path / "run"), resume=True)
