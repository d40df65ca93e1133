"""Tests for the early-exit engine: selection, KV policies, routing, accounting, errors."""

import dataclasses
import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_model
from flax import nnx

from deepexit_jax import exits
from deepexit_jax.errors import UserError
from deepexit_jax.model import ModelConfig, all_layer_logits, create_model

CONFIG = ModelConfig(vocab_size=23, num_layers=4, dim=16, num_heads=2, max_len=16)
N = CONFIG.num_layers


@functools.cache
def _model():
  return random_model(CONFIG)


@functools.cache
def _tokens():
  return np.random.default_rng(1).integers(0, CONFIG.vocab_size, (3, 12)).astype(np.int32)


@functools.cache
def _layers():
  """Every layer's logits (float32) and inputs and outputs (float64): [N, B, T, *]."""
  model, tokens = _model(), _tokens()
  hidden = nnx.jit(lambda m, x: m(x, per_layer_fn=lambda h: None))(model, tokens)
  h_out_NBTD = np.asarray(hidden.hidden_NBTD, np.float64)
  h_in_NBTD = np.concatenate([np.asarray(hidden.embed_BTD, np.float64)[None], h_out_NBTD[:-1]])
  return np.asarray(all_layer_logits(model, tokens)), h_in_NBTD, h_out_NBTD


def _np_confidence(measure, logits_V, h_in_D, h_out_D):
  """Reference measures in float64 on [..., V] / [..., D]."""
  z = logits_V.astype(np.float64)
  p = np.exp(z - z.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  if measure == "softmax":
    return p.max(-1)
  if measure == "margin":
    s = np.sort(p, -1)
    return s[..., -1] - s[..., -2]
  if measure == "entropy":
    return np.sum(p * np.log(p), -1)
  dot = np.sum(h_in_D * h_out_D, -1)
  return dot / np.sqrt(np.sum(h_in_D**2, -1) * np.sum(h_out_D**2, -1))


def _np_conf_NBT(measure):
  logits_NBTV, h_in_NBTD, h_out_NBTD = _layers()
  return _np_confidence(measure, logits_NBTV, h_in_NBTD, h_out_NBTD)


def _np_select(conf_NBT, logits_NBTV, threshold, exit_layers, thr_T=None):
  """Plain-loop exit selection: (exit_layer [B,T], logits [B,T,V], confidence [B,T])."""
  _, b, t = conf_NBT.shape
  exit_layer = np.full((b, t), N)
  conf = np.full((b, t), np.nan)
  checked = [k for k in exit_layers if k < N]
  for i in range(b):
    for j in range(t):
      thr = threshold if thr_T is None else thr_T[j]
      for k in checked:
        conf[i, j] = conf_NBT[k - 1, i, j]
        if conf_NBT[k - 1, i, j] >= thr:
          exit_layer[i, j] = k
          break
  logits = np.take_along_axis(logits_NBTV, exit_layer[None, :, :, None] - 1, 0)[0]
  return exit_layer, logits, conf


def _safe_thresholds(conf, quantiles=(0.3, 0.55, 0.8), gap=1e-3):
  """Thresholds near the given quantiles, each midway in a gap between confidences."""
  values = np.unique(np.ravel(conf))
  thresholds = []
  for q in quantiles:
    i = int(q * (len(values) - 1))
    while values[i + 1] - values[i] < gap:
      i += 1
    thresholds.append((values[i] + values[i + 1]) / 2)
  return np.asarray(thresholds, np.float32)


def _take(result, s):
  return jax.tree.map(lambda x: x[s], result)


# Most tests share these option sets (S = 4 thresholds), so the file compiles the engine
# about twenty times instead of once a test.
ORACLE = dict(exit_layers=(1, 3))
COPY = dict(exit_layers=(1, 3), kv_policy="copy")
SEQUENCE = dict(exit_layers=(1, 2, 3), routing="sequence", seq_quantile=0.5)
EDGES = np.array([0.0, 0.5, 0.9, np.inf], np.float32)


@pytest.mark.parametrize("measure, exit_layers", [
    ("softmax", (2,)), ("softmax", (1, 3)), ("softmax", (1, 2, 3)),
    ("margin", (1, 2, 3)), ("entropy", (1, 3)), ("state", (2,)),
])
def test_oracle_matches_numpy_selection(measure, exit_layers):
  conf_NBT = _np_conf_NBT(measure)
  logits_NBTV = _layers()[0]
  # The lowest threshold sends every token to the first exit layer.
  lowest = -np.inf if measure == "entropy" else 0.0
  thresholds = np.concatenate(
      [[lowest], _safe_thresholds(conf_NBT[[k - 1 for k in exit_layers]])]).astype(np.float32)
  result = exits.predict_with_exit(_model(), _tokens(), thresholds, exit_layers=exit_layers,
                                   measure=measure)
  chex.assert_shape(result.logits, (4, 3, 12, CONFIG.vocab_size))
  chex.assert_shape([result.exit_layer, result.confidence, result.flops_fraction], (4, 3, 12))
  chex.assert_shape(result.exit_fraction, (4, len(exit_layers)))
  chex.assert_type([result.exit_layer, result.logits], [jnp.int32, jnp.float32])
  for s, thr in enumerate(thresholds):
    exit_layer, logits, conf = _np_select(conf_NBT, logits_NBTV, thr, exit_layers)
    np.testing.assert_array_equal(result.exit_layer[s], exit_layer)
    np.testing.assert_array_equal(result.logits[s], logits)
    np.testing.assert_allclose(result.confidence[s], conf, atol=2e-5)
    for e, k in enumerate(exit_layers):
      np.testing.assert_allclose(result.exit_fraction[s, e], np.mean(exit_layer == k))
  if measure != "state":  # a cosine can be negative, so 0 need not exit everything
    np.testing.assert_array_equal(result.exit_layer[0], exit_layers[0])
  assert len(np.unique(result.exit_layer[1:])) > 1  # the test is not vacuous


@pytest.mark.parametrize("kv_policy", ["oracle", "copy"])
def test_threshold_edges(kv_policy):
  logits_NBTV = _layers()[0]
  result = exits.predict_with_exit(_model(), _tokens(), EDGES, exit_layers=(1, 3),
                                   kv_policy=kv_policy)
  zero, never = _take(result, 0), _take(result, -1)
  np.testing.assert_array_equal(zero.exit_layer, 1)
  np.testing.assert_allclose(zero.exit_fraction, [1.0, 0.0])
  np.testing.assert_array_equal(never.exit_layer, N)
  np.testing.assert_array_equal(never.exit_fraction, [0.0, 0.0])
  np.testing.assert_array_equal(never.layers_fraction, 1.0)
  np.testing.assert_allclose(never.confidence, _np_conf_NBT("softmax")[2], atol=2e-5)
  if kv_policy == "oracle":
    np.testing.assert_array_equal(never.logits, logits_NBTV[-1])
  else:  # Same math, but the scan's selects change XLA's fusion: equal up to rounding.
    np.testing.assert_allclose(never.logits, logits_NBTV[-1], atol=1e-4)
  # Every token leaving at layer 1 makes the rest irrelevant: a 1-layer model, even
  # when copying states upward.
  np.testing.assert_allclose(zero.logits, logits_NBTV[0], atol=1e-5)
  counter = exits.FlopCounter.from_config(CONFIG)
  t_T = np.arange(12)
  for res, layer in ((zero, 1), (never, N)):
    flops_T = [exits.flops_per_token(CONFIG, t, layer, exit_layers=(1, 3), kv_policy=kv_policy)
               for t in t_T]
    np.testing.assert_allclose(res.flops_fraction, np.broadcast_to(
        np.asarray(flops_T) / counter.full_depth(t_T), (3, 12)), rtol=1e-6)
  assert np.all(never.flops_fraction > 1)  # two unused exit checks cost extra heads


@pytest.mark.parametrize("routing", ["token", "sequence"])
def test_exit_fraction_monotone_in_threshold(routing):
  kwargs = ORACLE if routing == "token" else SEQUENCE
  thresholds = np.array([0.0, 0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0, np.inf])
  exited, layers = [], []
  for chunk in np.split(thresholds, 3):  # three calls, one compilation
    result = exits.predict_with_exit(_model(), _tokens(), chunk, **kwargs)
    exited.extend(np.asarray(result.exit_fraction.sum(-1)))
    layers.extend(np.asarray(result.mean_layers_fraction))
  assert np.all(np.diff(exited) <= 0), exited
  assert np.all(np.diff(layers) >= 0), layers
  assert exited[0] == 1.0 and exited[-1] == 0.0 and 0 < exited[5] < 1


@pytest.mark.parametrize("kwargs", [ORACLE, COPY], ids=["oracle", "copy"])
def test_vector_threshold_equals_scalar_calls(kwargs):
  thresholds = np.asarray([0.3, 0.7, 0.9, 0.95], np.float32)
  batched = exits.predict_with_exit(_model(), _tokens(), thresholds, **kwargs)
  for s, thr in enumerate(thresholds):
    single = exits.predict_with_exit(_model(), _tokens(), thr, **kwargs)
    chex.assert_trees_all_close(_take(batched, s), single, atol=1e-5)
  # The engine's per-token accounting is the documented formula (mixed exits here).
  t_BT = np.broadcast_to(np.arange(12), (3, 12))
  flops = exits.flops_per_token(CONFIG, t_BT, np.asarray(batched.exit_layer), exit_layers=(1, 3),
                                kv_policy=kwargs.get("kv_policy", "oracle"))
  full = exits.FlopCounter.from_config(CONFIG).full_depth(t_BT)
  np.testing.assert_allclose(batched.flops_fraction, flops / full, rtol=1e-6)
  assert len(np.unique(batched.exit_layer)) == 3


def _np_params(module):
  return {k: np.asarray(v, np.float64) for k, v in nnx.to_pure_dict(nnx.state(module)).items()}


def _layer_norm(x, params):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + 1e-6) * params["scale"] + params["bias"]


def _dense(x, params):
  return x @ params["kernel"] + params["bias"]


def _gelu(x):  # jax.nn.gelu's default tanh approximation
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def _reference_copy(model, tokens, threshold, exit_layers, measure):
  """Slow CALM reference in float64 numpy: positions in order, each run layer by layer.

  Keys/values are stored per layer and position; an exited token's copied state
  still writes its keys/values at every deeper layer.
  """
  b, t_len = tokens.shape
  blocks = []
  for i in range(N):
    blk = model.layer(i)
    blocks.append({name: _np_params(getattr(blk, name))
                   for name in ("ln1", "qkv", "attn_out", "ln2", "fc1", "fc2")})
  final_norm, unembed = _np_params(model.final_norm), _np_params(model.unembed)
  head = lambda h: _dense(_layer_norm(h, final_norm), unembed)
  h_BTD = np.asarray(model.embed_tokens(jnp.asarray(tokens)), np.float64)
  heads, head_dim = CONFIG.num_heads, CONFIG.head_dim
  keys = np.zeros((N, b, t_len, heads, head_dim))
  values = np.zeros((N, b, t_len, heads, head_dim))
  exit_layer = np.full((b, t_len), N)
  logits = np.zeros((b, t_len, CONFIG.vocab_size))
  conf = np.full((b, t_len), np.nan)
  gaps = []  # |confidence - threshold| at every decision, to guard against ties
  for t in range(t_len):
    h = h_BTD[:, t]
    exited = np.zeros(b, bool)
    for i, p in enumerate(blocks):
      q, k, v = np.split(_dense(_layer_norm(h, p["ln1"]), p["qkv"]), 3, axis=-1)
      keys[i, :, t] = k.reshape(b, heads, head_dim)
      values[i, :, t] = v.reshape(b, heads, head_dim)
      scores = np.einsum("bhk,bshk->bhs", q.reshape(b, heads, head_dim), keys[i, :, :t + 1])
      scores = np.exp(scores / np.sqrt(head_dim) - scores.max(-1, keepdims=True))
      att = np.einsum("bhs,bshk->bhk", scores / scores.sum(-1, keepdims=True),
                      values[i, :, :t + 1])
      h_new = h + _dense(att.reshape(b, -1), p["attn_out"])
      h_new = h_new + _dense(_gelu(_dense(_layer_norm(h_new, p["ln2"]), p["fc1"])), p["fc2"])
      exiting = np.zeros(b, bool)
      if i + 1 in exit_layers and i + 1 < N:
        layer_logits = head(h_new)
        c = _np_confidence(measure, layer_logits, h, h_new)
        exiting = ~exited & (c >= threshold)
        conf[~exited, t] = c[~exited]
        gaps.extend(np.abs(c[~exited] - threshold))
        exit_layer[exiting, t] = i + 1
        logits[exiting, t] = layer_logits[exiting]
      h = np.where(exited[:, None], h, h_new)  # tokens exiting here did run this layer
      exited |= exiting
    logits[~exited, t] = head(h)[~exited]
  return exit_layer, logits, conf, min(gaps)


@pytest.mark.parametrize("measure, exit_layers, threshold",
                         [("softmax", (2,), 0.75), ("softmax", (1, 3), 0.8),
                          ("state", (1, 2), 0.75)])
def test_copy_matches_token_by_token_reference(measure, exit_layers, threshold):
  model, tokens = _model(), _tokens()
  exit_layer, logits, conf, gap = _reference_copy(model, tokens, threshold, exit_layers,
                                                  measure)
  assert gap > 1e-4  # no decision sits on the threshold, so float noise cannot flip it
  assert 0 < np.mean(exit_layer < N) < 1  # the test is not vacuous
  result = exits.predict_with_exit(model, tokens, threshold, exit_layers=exit_layers,
                                   measure=measure, kv_policy="copy")
  np.testing.assert_array_equal(result.exit_layer, exit_layer)
  np.testing.assert_allclose(result.logits, logits, atol=1e-4)
  np.testing.assert_allclose(result.confidence, conf, atol=1e-5)
  # Copying changes later tokens' full-depth outputs, unlike the oracle.
  full = np.asarray(result.exit_layer) == N
  assert not np.allclose(np.asarray(result.logits)[full], _layers()[0][-1][full], atol=1e-3)


@pytest.mark.parametrize("k", [2, 3])  # k = 1 is in test_threshold_edges
def test_copy_all_exit_equals_truncated_model(k):
  result = exits.predict_with_exit(_model(), _tokens(), 0.0, exit_layers=(k,),
                                   kv_policy="copy")
  np.testing.assert_array_equal(result.exit_layer, k)
  np.testing.assert_allclose(result.logits, _layers()[0][k - 1], atol=1e-5)


def _row_statistic(conf_NBT, seq_quantile):
  """Per layer and row, the ceil(q T)-th largest confidence: a row clears a threshold at
  a layer exactly when this statistic does."""
  need = math.ceil(seq_quantile * conf_NBT.shape[-1])
  return -np.sort(-conf_NBT, -1)[..., need - 1]


def _gap_thresholds(values, count, gap=1e-4):
  """`count` thresholds midway between sorted `values` that are at least `gap` apart."""
  values = np.unique(np.ravel(values))
  mids = [(a + b) / 2 for a, b in zip(values, values[1:]) if b - a > gap]
  picks = np.linspace(0, len(mids) - 1, count + 2)[1:-1].round().astype(int)
  return np.asarray([mids[i] for i in picks], np.float32)


@pytest.mark.parametrize("seq_quantile, kv_policy", [
    (1.0, "oracle"), (1.0, "copy"), (0.5, "oracle"), (0.5, "copy"),
    (0.3, "oracle"), (0.3, "copy")])  # q T = 3.6: ceil, not floor
def test_sequence_routing_chooses_the_first_layer_where_enough_tokens_are_confident(
    kv_policy, seq_quantile):
  """Each row exits at the first exit layer where ceil(q T) of its tokens are confident,
  with that layer's logits. Under `copy` a row that has not exited copied nothing, so its
  confidences and logits are the full forward pass's too."""
  exit_layers = (1, 2, 3)
  conf_NBT = _np_conf_NBT("softmax")
  logits_NBTV = _layers()[0]
  stat_LB = _row_statistic(conf_NBT[:3], seq_quantile)
  thresholds = _gap_thresholds(stat_LB, 4)
  result = exits.predict_with_exit(_model(), _tokens(), thresholds, exit_layers=exit_layers,
                                   kv_policy=kv_policy, routing="sequence",
                                   seq_quantile=seq_quantile)
  for s, thr in enumerate(thresholds):
    ok_LB = stat_LB >= thr
    expected_B = np.where(ok_LB.any(0), np.asarray(exit_layers)[np.argmax(ok_LB, 0)], N)
    np.testing.assert_array_equal(result.exit_layer[s], np.broadcast_to(
        expected_B[:, None], (3, 12)))
    expected_logits = logits_NBTV[expected_B - 1, np.arange(3)]
    np.testing.assert_allclose(result.logits[s], expected_logits, atol=1e-4)
  layers = np.asarray(result.exit_layer)[:, :, 0]
  assert len(np.unique(layers)) >= 3  # several layers chosen ...
  assert any(len(np.unique(row)) > 1 for row in layers)  # ... and rows differ


@pytest.mark.parametrize("kv_policy", ["oracle", "copy"])
@pytest.mark.parametrize("measure", ["softmax", "margin", "entropy", "state"])
def test_threshold_equal_to_a_confidence_exits_there(measure, kv_policy):
  """`>=`: a threshold set exactly to a token's computed confidence makes it exit."""
  kwargs = dict(exit_layers=(2,), measure=measure, kv_policy=kv_policy)
  never = exits.predict_with_exit(_model(), _tokens(), np.full(3, np.inf, np.float32),
                                  **kwargs)
  conf_BT = np.asarray(never.confidence[0])  # float32, at layer 2, for every token
  assert np.all(np.isfinite(conf_BT)) and np.all(np.asarray(never.exit_layer) == N)
  candidates = conf_BT[conf_BT > 0] if measure == "state" else conf_BT.ravel()
  thresholds = np.quantile(candidates, [0.2, 0.5, 0.8], method="nearest").astype(np.float32)
  result = exits.predict_with_exit(_model(), _tokens(), thresholds, **kwargs)
  for s, thr in enumerate(thresholds):
    assert (conf_BT == thr).any()
    np.testing.assert_array_equal(result.exit_layer[s], np.where(conf_BT >= thr, 2, N))
    np.testing.assert_array_equal(np.asarray(result.confidence[s]), conf_BT)


def test_sequence_routing_counts_a_tie_as_confident():
  """Sequence routing uses the same >= rule: a threshold equal to a row's ceil(q T)-th
  largest confidence lets that row exit."""
  kwargs = dict(exit_layers=(2,), routing="sequence", seq_quantile=0.5)
  never = exits.predict_with_exit(_model(), _tokens(), np.full(3, np.inf, np.float32),
                                  **kwargs)
  conf_BT = np.asarray(never.confidence[0])
  need = math.ceil(0.5 * conf_BT.shape[-1])
  thresholds = np.sort(-np.sort(-conf_BT, -1)[:, need - 1]).astype(np.float32)
  result = exits.predict_with_exit(_model(), _tokens(), thresholds, **kwargs)
  for s, thr in enumerate(thresholds):
    enough_B = (conf_BT >= thr).sum(-1) >= need
    np.testing.assert_array_equal(result.exit_layer[s, :, 0], np.where(enough_B, 2, N))
    assert enough_B.sum() >= 3 - s  # the row whose statistic is the threshold exits


@pytest.mark.parametrize("measure, kv_policy", [
    ("softmax", "oracle"), ("entropy", "oracle"), ("entropy", "copy"), ("margin", "copy")])
def test_threshold_decay(measure, kv_policy):
  """lambda_t = lambda exp(-tau t / T) for lambda >= 0, lambda exp(+tau t / T) for
  lambda < 0 (entropy): either way later tokens exit more easily."""
  exit_layers, decay, t_len = (1, 2), 1.5, 12
  conf_NBT = _np_conf_NBT(measure)
  logits_NBTV = _layers()[0]
  sign = -1.0 if measure == "entropy" else 1.0
  factor_T = np.exp(-sign * decay * np.arange(t_len) / t_len)
  # A threshold near the median, moved until no token sits within 1e-4 of its lambda_t.
  base = float(np.median(conf_NBT[:2]))
  for thr in base + 0.01 * np.arange(20):
    thr_T = thr * factor_T
    if np.abs(conf_NBT[:2] - thr_T).min() > 1e-4:
      break
  result = exits.predict_with_exit(_model(), _tokens(), np.float32(thr),
                                   exit_layers=exit_layers, measure=measure,
                                   kv_policy=kv_policy, threshold_decay=decay)
  constant, _, _ = _np_select(conf_NBT, logits_NBTV, thr, exit_layers)
  if kv_policy == "oracle":
    expected, _, _ = _np_select(conf_NBT, logits_NBTV, thr, exit_layers, thr_T=thr_T)
    np.testing.assert_array_equal(result.exit_layer, expected)
  else:  # copy: only layer 1's decision is the full pass's; it must follow lambda_t.
    np.testing.assert_array_equal(np.asarray(result.exit_layer) == 1, conf_NBT[0] >= thr_T)
    expected = np.asarray(result.exit_layer)
  assert np.mean(expected) < np.mean(constant)  # the decay matters here
  # An inverted decay (stricter later) would pick other layers.
  inverted, _, _ = _np_select(conf_NBT, logits_NBTV, thr, exit_layers, thr_T=thr / factor_T)
  assert not np.array_equal(inverted, np.asarray(result.exit_layer))


@pytest.mark.parametrize("kwargs", [ORACLE, COPY], ids=["oracle", "copy"])
def test_nll(kwargs):
  targets = np.roll(_tokens(), -1, axis=1)
  result = exits.predict_with_exit(_model(), _tokens(), EDGES, targets=targets, **kwargs)
  logp_SBTV = jax.nn.log_softmax(result.logits)
  np.testing.assert_allclose(
      result.nll, -np.take_along_axis(logp_SBTV, targets[None, ..., None], -1)[..., 0],
      rtol=1e-5)
  chex.assert_trees_all_close(result.replace(nll=None),
                              exits.predict_with_exit(_model(), _tokens(), EDGES, **kwargs))


@pytest.mark.parametrize("kwargs", [ORACLE, COPY, dict(ORACLE, measure="state"),
                                    dict(COPY, measure="entropy")],
                         ids=["oracle", "copy", "oracle-state", "copy-entropy"])
def test_without_logits_equals_with_logits(kwargs):
  """return_logits=False (the large-vocabulary summary path) changes nothing else."""
  targets = np.roll(_tokens(), -1, axis=1)
  full = exits.predict_with_exit(_model(), _tokens(), EDGES, targets=targets, **kwargs)
  lean = exits.predict_with_exit(_model(), _tokens(), EDGES, targets=targets,
                                 return_logits=False, **kwargs)
  assert lean.logits is None
  chex.assert_trees_all_close(lean, full.replace(logits=None), rtol=1e-5, atol=1e-6)


def test_oracle_without_logits_keeps_one_layer_of_logits():
  """The summary path's peak memory holds about one [B, T, V] block, not one per layer."""
  config = dataclasses.replace(CONFIG, vocab_size=4096)
  model = create_model(config, seed=0)
  tokens = jnp.zeros((4, 16), jnp.int32)
  graphdef, state = nnx.split(model)
  opts = dict(exit_layers=(1, 2, 3), measure="softmax", kv_policy="oracle", routing="token",
              seq_quantile=1.0, threshold_decay=0.0, probe_flops=0)

  def temp_bytes(return_logits):
    fn = jax.jit(functools.partial(exits._predict, static_probe=None, opts=exits._Options(
        **opts, return_logits=return_logits)))
    compiled = fn.lower(graphdef, state, tokens, EDGES, tokens, None).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  one_layer = 4 * 16 * 4096 * 4
  assert temp_bytes(False) < 3 * one_layer < temp_bytes(True)


def test_oracle_exit_layer():
  logits_NBTV = _layers()[0]
  top_NBT = logits_NBTV.argmax(-1)
  expected = np.full(top_NBT.shape[1:], N)
  for k in (3, 1):  # latest first, so the earliest agreeing layer wins
    expected = np.where(top_NBT[k - 1] == top_NBT[-1], k, expected)
  chex.assert_trees_all_equal(exits.oracle_exit_layer(logits_NBTV, (1, 3)), expected)
  assert 0 < np.mean(expected == 1) < 1
  np.testing.assert_array_equal(exits.oracle_exit_layer(logits_NBTV, (4,)), N)


@dataclasses.dataclass(frozen=True)
class CosineProbe:
  """A hand-made static probe: the state measure, at the state measure's cost."""

  flops_per_token: int = 6 * CONFIG.dim

  def __call__(self, h_in_BTD, h_out_BTD, layer):
    del layer
    return exits.state_confidence(h_in_BTD, h_out_BTD)


class LinearProbe(nnx.Module):
  """A hand-made traced probe with a per-layer bias, indexed by the 1-based layer."""

  flops_per_token = 2 * CONFIG.dim

  def __init__(self):
    self.w = nnx.Param(jnp.linspace(-1.0, 1.0, CONFIG.dim))
    self.b = nnx.Param(jnp.array([0.0, 0.3, -0.3, 0.0]))

  def __call__(self, h_in_BTD, h_out_BTD, layer):
    del h_in_BTD
    return jax.nn.sigmoid(h_out_BTD @ self.w[...] + self.b[...][layer - 1])


def test_static_probe_equals_state_measure():
  thresholds = jnp.array([0.5, 0.7, 0.8, 0.9])
  probed = exits.predict_with_exit(_model(), _tokens(), thresholds, measure="probe",
                                   probe=CosineProbe(), **COPY)
  state = exits.predict_with_exit(_model(), _tokens(), thresholds, measure="state", **COPY)
  chex.assert_trees_all_close(probed, state)
  assert len(np.unique(state.exit_layer)) == 3


def test_module_probe_matches_manual_selection():
  probe = LinearProbe()
  assert isinstance(probe, exits.ConfidenceProbe)
  logits_NBTV, _, h_out_NBTD = _layers()
  w, b = np.asarray(probe.w[...], np.float64), np.asarray(probe.b[...], np.float64)
  conf_NBT = 1 / (1 + np.exp(-(h_out_NBTD @ w + b[:, None, None])))
  result = exits.predict_with_exit(_model(), _tokens(), 0.6, exit_layers=(1, 2, 3),
                                   measure="probe", probe=probe)
  exit_layer, _, conf = _np_select(conf_NBT, logits_NBTV, 0.6, (1, 2, 3))
  np.testing.assert_array_equal(result.exit_layer, exit_layer)
  np.testing.assert_allclose(result.confidence, conf, atol=1e-5)


def test_no_recompilation_across_thresholds():
  model, tokens = _model(), _tokens()
  events = []  # compilations of the engine (eager conversions of inputs also compile)

  def listener(event, duration, **kwargs):
    del duration
    if "compile" in event and "_predict" in kwargs.get("fun_name", ""):
      events.append(event)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    for kwargs in (ORACLE, COPY):
      run = functools.partial(exits.predict_with_exit, model, tokens, **kwargs)
      run(0.5)  # warm up: compiles the scalar and the [4] versions
      run(EDGES)
      events.clear()
      for thr in (0.1, np.float32(0.7), jnp.array(0.9), jnp.inf):
        run(thr)
      for thr in (np.array([0.4, 0.5, 0.6, 0.7]), jnp.array([0.7, 0.8, 1.0, jnp.inf])):
        run(thr)
      assert not events, events
    run(jnp.array([0.1, 0.2, 0.3]))  # a new length does compile: the listener works
    assert events
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  # A probe only runs while tracing: it must not run again for new threshold values.
  calls = []

  @dataclasses.dataclass(frozen=True)
  class CountingProbe:
    flops_per_token: int = 0

    def __call__(self, h_in_BTD, h_out_BTD, layer):
      calls.append(layer)
      return exits.state_confidence(h_in_BTD, h_out_BTD)

  for thr in (0.2, 0.5, 0.9, jnp.inf):
    exits.predict_with_exit(model, tokens, thr, exit_layers=(1, 3), measure="probe",
                            probe=CountingProbe())
  assert len(calls) == 2  # one trace, one call per exit layer


def test_threshold_is_traced_under_outer_jit():
  model, tokens = _model(), _tokens()
  fn = jax.jit(lambda thr: exits.predict_with_exit(model, tokens, thr, **ORACLE).exit_layer)
  eager = exits.predict_with_exit(model, tokens, EDGES, **ORACLE)
  for s, thr in enumerate(EDGES):
    np.testing.assert_array_equal(fn(thr), eager.exit_layer[s])


TINY = ModelConfig(vocab_size=5, num_layers=2, dim=4, num_heads=1, ffn_dim=8, max_len=4)


def test_flops_hand_count():
  # Per block at position t: QKV 2*4*12 = 96, attention 2*2*(t+1)*4 = 16(t+1),
  # output 2*4*4 = 32, MLP 2*2*4*8 = 128: 272 at t=0, 288 at t=1. Head 2*4*5 = 40.
  # Full depth: 2 blocks + 1 head = 584 (t=0), 616 (t=1). Copied K/V: 2*4*8 = 64.
  hand = {
      # (t, exit layer, policy, measure): FLOPs, with an exit check at layer 1.
      (0, 1, "oracle", "softmax"): 272 + 40,
      (1, 1, "oracle", "softmax"): 288 + 40,
      (0, 1, "copy", "softmax"): 272 + 64 + 40,
      (1, 1, "copy", "softmax"): 288 + 64 + 40,
      (0, 2, "oracle", "softmax"): 2 * 272 + 40 + 40,  # the check at 1 + the final head
      (1, 2, "oracle", "softmax"): 2 * 288 + 40 + 40,
      (0, 2, "copy", "softmax"): 2 * 272 + 40 + 40,  # ran every layer: nothing copied
      (1, 2, "copy", "softmax"): 2 * 288 + 40 + 40,
      (0, 1, "oracle", "state"): 272 + 40 + 2 * 3 * 4,  # cosine: 3 D multiply-adds
      (1, 2, "copy", "state"): 2 * 288 + 40 + 24,
      (0, 1, "copy", "margin"): 272 + 64 + 40,
      (1, 2, "oracle", "entropy"): 2 * 288 + 40 + 40,
  }
  counter = exits.FlopCounter.from_config(TINY)
  assert (counter.full_depth(0), counter.full_depth(1)) == (584, 616)
  for (t, layer, policy, measure), flops in hand.items():
    assert exits.flops_per_token(TINY, t, layer, exit_layers=(1,), measure=measure,
                                 kv_policy=policy) == flops, (t, layer, policy, measure)
  assert exits.flops_per_token(TINY, 0, 1, exit_layers=(1,), measure="probe",
                               probe_flops=7) == 272 + 40 + 7
  # Without exit layers below N nothing is checked: exactly the full-depth cost.
  assert exits.flops_per_token(TINY, 1, 2, exit_layers=(2,)) == 616


@pytest.mark.parametrize("kwargs, match", [
    (dict(threshold=float("nan")), "NaN"),
    (dict(threshold=jnp.array([0.5, jnp.nan])), "NaN"),
    (dict(threshold=-0.1), "negative"),
    (dict(threshold=-0.1, measure="margin"), "negative"),
    (dict(threshold=jnp.ones((2, 2))), "1-D"),
    (dict(exit_layers=(0,)), "1..4"),
    (dict(exit_layers=(5,)), "1..4"),
    (dict(exit_layers=(3, 2)), "ascending"),
    (dict(exit_layers=(2, 2)), "ascending"),
    (dict(exit_layers=()), "empty"),
    (dict(measure="perplexity"), "measure"),
    (dict(kv_policy="recompute"), "kv_policy"),
    (dict(routing="batch"), "routing"),
    (dict(seq_quantile=0.0), "seq_quantile"),
    (dict(threshold_decay=-1.0), "threshold_decay"),
    (dict(measure="probe"), "probe"),
    (dict(probe=CosineProbe()), "probe"),
    (dict(targets=np.zeros((3, 5), np.int32)), "targets"),
])
def test_bad_inputs(kwargs, match):
  kwargs = {"threshold": 0.5, **kwargs}
  with pytest.raises(UserError, match=match):
    exits.predict_with_exit(_model(), _tokens(), **kwargs)

