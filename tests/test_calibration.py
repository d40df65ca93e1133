"""Calibrated thresholds: p-values, Learn-then-Test, its guarantee, exit losses, errors."""

import math
import re

import jax.numpy as jnp
import numpy as np
import pytest

import deepexit_jax
from deepexit_jax import calibration, data, exits
from deepexit_jax.errors import UserError
from deepexit_jax.model import ModelConfig, all_layer_logits, create_model

# ----------------------------------------------------------------------------------------
# p-values against a direct computation.


def _direct_hb(n: int, risk: float, delta: float) -> float:
  """REFERENCES.md's Hoeffding-Bentkus p-value, the binomial tail summed term by term."""
  a = min(risk, delta)
  h = (a * math.log(a / delta) if a > 0 else 0.0) + (1 - a) * math.log((1 - a) / (1 - delta))
  k_max = math.ceil(round(n * risk, 9))
  # Terms in log space with exact log binomial coefficients (math.comb for small n).
  terms = [math.log(math.comb(n, k)) + k * math.log(delta) + (n - k) * math.log1p(-delta)
           for k in range(k_max + 1)]
  tail = math.fsum(math.exp(t) for t in terms)
  return min(math.exp(-n * h), math.e * tail, 1.0)


@pytest.mark.parametrize("n, risk, delta", [
    (50, 0.02, 0.1), (200, 0.05, 0.1), (1000, 0.09, 0.1), (30, 0.0, 0.2),
    (100, 0.15, 0.1), (37, 0.123, 0.2), (20_000, 0.0485, 0.05), (400, 0.1, 0.1),
])
def test_hoeffding_bentkus_pvalue_matches_a_direct_computation(n, risk, delta):
  got = calibration.hoeffding_bentkus_pvalue(np.array([risk]), n, delta)[0]
  assert got == pytest.approx(_direct_hb(n, risk, delta), rel=1e-9, abs=1e-300)


def test_hoeffding_pvalue_matches_its_formula():
  risks = np.array([0.0, 0.03, 0.0999, 0.1, 0.4])
  got = calibration.hoeffding_pvalue(risks, 300, 0.1)
  want = [math.exp(-2 * 300 * (0.1 - r) ** 2) if r < 0.1 else 1.0 for r in risks]
  np.testing.assert_allclose(got, want, rtol=1e-12)
  # Hoeffding-Bentkus is never looser than Hoeffding (it takes the KL form's minimum).
  assert np.all(calibration.hoeffding_bentkus_pvalue(risks, 300, 0.1) <= got + 1e-12)


# ----------------------------------------------------------------------------------------
# The procedure on synthetic risks with a known answer.


def _losses(counts, n):
  """[S, n] 0/1 losses whose row s has exactly counts[s] ones (empirical risk counts/n)."""
  return (np.arange(n)[None, :] < np.asarray(counts)[:, None]).astype(np.float64)


def test_fixed_sequence_picks_the_last_certified_threshold():
  thresholds = np.round(np.arange(0.9, 0.0, -0.1), 1)  # safest first
  # Risks 0 ... 0.07 are far below delta = 0.1 at n = 10,000; 0.15 is far above; the
  # 0.04 after it must NOT be chosen: the sequence stops at the first failure.
  counts = [0, 100, 300, 500, 700, 1500, 400, 200, 2000]
  losses = _losses(counts, 10_000)
  cal = calibration.calibrate_threshold(losses, thresholds, delta=0.1, epsilon=0.05)
  assert cal.threshold == pytest.approx(0.5)
  assert cal.risk == pytest.approx(0.07)
  assert cal.rejected.tolist() == [True] * 5 + [False] * 4
  assert cal.p_value == pytest.approx(cal.p_values[4]) and cal.p_value < 1e-10
  assert cal.p_values[5] == 1.0 and cal.p_values[6] < 1e-10  # tested, not rejected
  # Order of the candidates given does not matter: the largest is tested first.
  perm = np.random.default_rng(0).permutation(9)
  again = calibration.calibrate_threshold(losses[perm], thresholds[perm], delta=0.1,
                                          epsilon=0.05)
  assert again.threshold == cal.threshold
  np.testing.assert_allclose(again.candidates, thresholds)


def test_negative_thresholds_are_tested_closest_to_zero_first():
  # Entropy confidences are <= 0: -0.1 exits least, so it is the safest.
  thresholds = -np.array([0.1, 0.5, 1.0, 2.0])
  cal = calibration.calibrate_threshold(_losses([0, 50, 1500, 0], 10_000)[::-1],
                                        thresholds[::-1], delta=0.1, epsilon=0.1)
  np.testing.assert_allclose(cal.candidates, thresholds)
  assert cal.threshold == pytest.approx(-0.5)


def test_nothing_certified_means_never_exit():
  cal = calibration.calibrate_threshold(_losses([9, 5], 100), [0.9, 0.5], delta=0.1,
                                        epsilon=0.1)
  # 9/100 < 0.1 but n = 100 cannot certify it at epsilon 0.1.
  assert math.isinf(cal.threshold) and math.isnan(cal.p_value) and not cal.rejected.any()
  assert cal.to_json()["threshold"] == "inf" and cal.to_json()["p_value"] is None


# ----------------------------------------------------------------------------------------
# The guarantee over many synthetic calibration sets.


def _coverage(bound, trials=1000, n=300, delta=0.1, epsilon=0.1, seed=0):
  """Share of trials whose chosen threshold's TRUE risk is <= delta.

  Candidate j (safest first) has true risk r_j; example i's loss is 1[u_i < r_j] with one
  uniform u_i per example, so losses are nested across thresholds as real exits are.
  """
  true_S = np.linspace(0.0, 0.3, 31)
  thresholds = np.linspace(1.0, 0.0, 31)
  rng = np.random.default_rng(seed)
  ok = 0
  for _ in range(trials):
    u = np.sort(rng.random(n))
    risk_S = np.searchsorted(u, true_S) / n  # mean of 1[u_i < r_j]
    cal = calibration.learn_then_test(risk_S, n, thresholds, delta=delta, epsilon=epsilon,
                                      bound=bound)
    j = np.flatnonzero(np.isclose(thresholds, cal.threshold))
    ok += (true_S[j[0]] if j.size else 0.0) <= delta
  return ok / trials


@pytest.mark.parametrize("pvalue", [calibration.hoeffding_bentkus_pvalue,
                                    calibration.hoeffding_pvalue])
def test_p_values_are_valid_at_the_null_boundary(pvalue):
  # Risk exactly delta: a valid p-value is <= alpha with probability <= alpha. (Sharper
  # than the coverage test below, which a conservative bound passes with room to spare.)
  n, delta = 300, 0.1
  risks = np.random.default_rng(0).binomial(n, delta, 20_000) / n
  p = pvalue(risks, n, delta)
  for alpha in (0.05, 0.1, 0.2):
    assert np.mean(p <= alpha) <= alpha


@pytest.mark.parametrize("bound", ["hoeffding_bentkus", "hoeffding"])
def test_the_guarantee_holds_at_the_stated_rate(bound):
  assert _coverage(bound) >= 0.9


def test_the_guarantee_fails_with_the_raw_mean_instead_of_a_p_value():
  # Choosing the lowest threshold whose calibration risk is <= delta overshoots about
  # half the time: far below the promised 90%.
  assert _coverage(calibration.empirical_pvalue) < 0.75


# ----------------------------------------------------------------------------------------
# Bad input: one-line errors.


@pytest.mark.parametrize("kwargs, words", [
    (dict(delta=0.0), "delta=0.0 must be"), (dict(delta=1.0), "delta=1.0"),
    (dict(delta=-0.1), "delta"), (dict(delta=math.nan), "delta=nan"),
    (dict(delta="x"), "delta='x'"), (dict(epsilon=0.0), "epsilon=0.0"),
    (dict(epsilon=1.5), "epsilon=1.5"), (dict(bound="chernoff"), "unknown bound"),
])
def test_bad_levels_and_bounds_are_one_line_user_errors(kwargs, words):
  args = dict(delta=0.1, epsilon=0.1) | kwargs
  with pytest.raises(UserError, match=words) as err:
    calibration.calibrate_threshold(_losses([0, 1], 10), [0.9, 0.5], **args)
  assert "\n" not in str(err.value)


@pytest.mark.parametrize("losses, thresholds, words", [
    (_losses([0, 1], 10), [0.9, np.nan], "NaN"),
    (_losses([0, 1], 10), [0.5, 0.5], "repeat"),
    (_losses([0, 1], 10) * 2, [0.9, 0.5], r"\[0, 1\]"),
    (np.zeros(3), [0.9], "S thresholds, M examples"),
    (_losses([0, 1], 10), [0.9], "2 risks for 1 thresholds"),
    (_losses([0, 1], 10), None, "thresholds"),
])
def test_bad_losses_and_thresholds_are_user_errors(losses, thresholds, words):
  with pytest.raises(UserError, match=words):
    calibration.calibrate_threshold(losses, thresholds, delta=0.1, epsilon=0.1)


# ----------------------------------------------------------------------------------------
# Exit losses from the engine on a tiny random model.

_CONFIG = ModelConfig(vocab_size=13, num_layers=3, dim=16, num_heads=2, ffn_dim=32,
                      max_len=16)


@pytest.fixture(scope="module")
def model():
  """A random model whose layers disagree and whose confidences spread (no training)."""
  m = create_model(_CONFIG, seed=0)
  m.unembed.kernel[...] = m.unembed.kernel[...] * 40
  for name in ("qkv", "attn_out", "fc1", "fc2"):
    kernel = getattr(m.blocks, name).kernel
    kernel[...] = kernel[...] * 5
  return m


@pytest.fixture(scope="module")
def batches():
  # 150 tokens -> 149 targets: 10 windows of 16, the last partly padded, in 3 batches of 4
  # (the last batch holds 2 fully padded rows, which are no windows).
  tokens = np.random.default_rng(1).integers(0, _CONFIG.vocab_size, 150)
  return data.eval_batches(tokens, 16, 4)


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_exit_losses_at_exit_everywhere_match_a_direct_computation(model, batches):
  res = calibration.collect_exit_losses(model, batches, [0.0, np.inf], exit_layers=(1,),
                                        kv_policy="oracle")
  assert res.num_windows == 10 and res.tokens.sum() == 149
  textual, risk, nll1, nll3 = [], [], [], []
  for b in range(batches.num_batches):
    logp = _log_softmax(np.asarray(all_layer_logits(model, batches.inputs[b]), np.float64))
    mask = batches.mask[b]
    nll = -np.take_along_axis(logp, batches.targets[b][None, ..., None], -1)[..., 0]
    textual.append(((logp[0].argmax(-1) != logp[2].argmax(-1)) * mask).sum(-1))
    risk.append((np.clip((nll[0] - nll[2]) / math.log(13), 0, 1) * mask).sum(-1))
    nll1.append((nll[0] * mask).sum(-1))
    nll3.append((nll[2] * mask).sum(-1))
  keep = np.concatenate([batches.mask[b].sum(-1) for b in range(3)]) > 0
  for got, want in ((res.textual[0], textual), (res.risk[0], risk), (res.nll[0], nll1),
                    (res.full_nll, nll3)):
    np.testing.assert_allclose(got, np.concatenate(want)[keep], rtol=1e-4, atol=1e-4)
  assert res.textual[0].sum() > 10  # the model's layers really disagree
  # Never exiting: no loss, full-depth NLL, and the exit check's FLOPs on top.
  assert res.textual[1].sum() == 0 and res.risk[1].sum() == 0
  np.testing.assert_allclose(res.nll[1], res.full_nll, rtol=1e-5)
  assert res.metrics(1)["flops_fraction"] > 1.0 > res.metrics(0)["flops_fraction"]
  assert res.metrics(0)["layers_fraction"] == pytest.approx(1 / 3)


def test_exit_losses_equal_the_engines_per_threshold_results(model, batches):
  # Everything the direct test above does not cover at once: copy, two exit layers,
  # a negative-threshold measure, sequence routing and CALM's decay.
  measure, thresholds = "entropy", [-1.5, -0.8, -0.2]
  kw = dict(exit_layers=(1, 2), kv_policy="copy", routing="sequence", seq_quantile=0.5,
            threshold_decay=4.0, threshold_decay_form="calm")
  # max_logits forces chunks of 2 thresholds (the last padded): results must not change.
  res = calibration.collect_exit_losses(model, batches, thresholds, measure=measure,
                                        max_logits=2 * 4 * 16 * 13, **kw)
  for s, thr in enumerate(thresholds):
    want = []
    for b in range(batches.num_batches):
      early = exits.predict_with_exit(model, batches.inputs[b], thr, measure=measure, **kw)
      full = exits.predict_with_exit(model, batches.inputs[b], np.inf, measure=measure, **kw)
      differs = np.asarray(early.logits.argmax(-1) != full.logits.argmax(-1))
      want.append((differs * batches.mask[b]).sum(-1))
    np.testing.assert_allclose(res.textual[s], np.concatenate(want)[:10])
  assert res.settings["measure"] == measure and res.settings["exit_layers"] == kw["exit_layers"]
  # Some threshold exits somewhere and some token then disagrees: the check is not vacuous.
  assert res.textual.sum() > 0


# ----------------------------------------------------------------------------------------
# Calibrated results as thresholds, and the CALM decay form.


def test_predict_with_exit_and_generate_accept_a_calibration(model, batches):
  # Oracle and two thresholds: the engine programs compiled by the direct test above.
  res = calibration.collect_exit_losses(model, batches, [0.5, 0.99], exit_layers=(1,),
                                        kv_policy="oracle")
  cal = calibration.calibrate_threshold(res, delta=0.95, epsilon=0.3, unit="token")
  assert cal.threshold == 0.5 and cal.measure == "softmax"
  tokens = batches.inputs[0]
  got = exits.predict_with_exit(model, tokens, cal, exit_layers=(1,), kv_policy="oracle")
  want = exits.predict_with_exit(model, tokens, 0.5, exit_layers=(1,), kv_policy="oracle")
  np.testing.assert_array_equal(got.exit_layer, want.exit_layer)
  assert float(got.threshold) == 0.5 and (np.asarray(got.exit_layer) == 1).any()
  for kwargs, words in ((dict(measure="margin"), "measure='softmax'"),
                        (dict(exit_layers=(1, 2)), "exit_layers=(1,)"),
                        (dict(kv_policy="copy"), "kv_policy='oracle'"),
                        (dict(threshold_decay=1.0), "threshold_decay=0.0")):
    with pytest.raises(UserError, match=re.escape(words)):
      exits.predict_with_exit(model, tokens, cal,
                              **(dict(exit_layers=(1,), kv_policy="oracle") | kwargs))
  # The decoder takes it too, with every setting checked: `recompute` decodes what the
  # `oracle` emulation measures, `copy` does not.
  out = deepexit_jax.generate(model, tokens[:1, :4], threshold=cal, max_new_tokens=2,
                              exit_layers=(1,), kv_policy="recompute")
  assert out.new_tokens.shape == (1, 2)
  for kwargs, words in ((dict(measure="entropy"), "measure"),
                        (dict(kv_policy="copy"), "kv_policy='oracle'"),
                        (dict(exit_layers=(1, 2), kv_policy="recompute"), "exit_layers")):
    with pytest.raises(UserError, match=re.escape(words)):
      deepexit_jax.generate(model, tokens[:1, :4], threshold=cal, max_new_tokens=2,
                            **(dict(exit_layers=(1,)) | kwargs))
  # A calibration from raw losses records no settings, so any call may use it.
  raw = calibration.calibrate_threshold(_losses([0, 0], 1000), [0.9, 0.5], delta=0.1,
                                        epsilon=0.1)
  assert raw.threshold == 0.5
  exits.predict_with_exit(model, tokens, raw, measure="margin", exit_layers=(1,))


@pytest.mark.parametrize("lam", [0.8, -1.2, 0.0])
def test_calm_decay_form_matches_calms_code(lam):
  t, tau = np.arange(16), 4.0
  f = 0.9 + 0.1 * np.exp(-tau * t / 16)
  got = exits._position_thresholds(jnp.float32(lam), 16, tau, "calm")
  np.testing.assert_allclose(got, lam * f if lam >= 0 else lam / f, rtol=1e-6)
  # Our default form is unchanged, and tau = 0 is exactly constant in both.
  ours = exits._position_thresholds(jnp.float32(lam), 16, tau)
  g = np.exp(-tau * t / 16)
  np.testing.assert_allclose(ours, lam * g if lam >= 0 else lam / g, rtol=1e-6)
  for form in exits.DECAY_FORMS:
    assert np.all(np.asarray(exits._position_thresholds(jnp.float32(lam), 16, 0.0, form))
                  == np.float32(lam))


def test_calm_decay_form_decides_exits_per_position(model, batches):
  tokens = batches.inputs[0]
  lam, tau = 0.7, 20.0
  res = exits.predict_with_exit(model, tokens, lam, exit_layers=(1,), threshold_decay=tau,
                                threshold_decay_form="calm")
  logits = np.asarray(all_layer_logits(model, tokens), np.float64)[0]
  conf = np.exp(_log_softmax(logits)).max(-1)
  thr_T = lam * (0.9 + 0.1 * np.exp(-tau * np.arange(16) / 16))
  np.testing.assert_array_equal(np.asarray(res.exit_layer) == 1, conf >= thr_T)
  with pytest.raises(UserError, match="threshold_decay_form"):
    exits.predict_with_exit(model, tokens, lam, threshold_decay_form="linear")


# ----------------------------------------------------------------------------------------
# Splits and coverage (host arithmetic on per-window sums).


def test_splits_are_disjoint_whole_windows_and_seeded():
  cal, test = calibration.split_windows(11, 0.5, seed=3)
  assert sorted(np.concatenate([cal, test]).tolist()) == list(range(11))
  assert cal.size == 6 and test.size == 5
  again, _ = calibration.split_windows(11, 0.5, seed=3)
  other, _ = calibration.split_windows(11, 0.5, seed=3, split=1)
  np.testing.assert_array_equal(cal, again)
  assert not np.array_equal(cal, other)
  with pytest.raises(UserError, match="at least 2"):
    calibration.split_windows(1, 0.5, seed=0)


def _synthetic_losses(windows=400, tokens=8, seed=0):
  """An `ExitLosses` over a text whose risk under candidate s is exactly r_s = s / 200.

  Loss-1 tokens are the c_s = r_s x (all tokens) of lowest rank in one random ranking,
  so losses are nested across candidates as real exits are.
  """
  true_S = np.arange(81) / 200  # 0, 0.005, ..., 0.4
  rank = np.random.default_rng(seed).permutation(windows * tokens).reshape(windows, tokens)
  counts = np.round(true_S * windows * tokens)
  textual = (rank[None] < counts[:, None, None]).sum(-1).astype(np.float64)
  zeros = np.zeros_like(textual)
  return calibration.ExitLosses(
      thresholds=np.linspace(1.0, 0.0, 81), tokens=np.full(windows, float(tokens)),
      textual=textual, risk=zeros, nll=zeros + tokens, full_nll=np.full(windows, tokens),
      layers=zeros + tokens, flops=1.0 - zeros, full_flops=np.ones(windows), risk_scale=1.0,
      num_layers=2, settings={"measure": "softmax"}), true_S


def test_calibration_record_reports_test_part_and_coverage():
  res, _ = _synthetic_losses()
  rep = calibration.calibration_record(res, delta=0.2, epsilon=0.1, splits=50)
  f = rep.fields
  assert f["calibration_windows"] == 200 and f["test_windows"] == 200
  assert rep.calibration.num_examples == 200 and rep.calibration.unit == "sequence"
  assert f["calibration_tokens"] + f["test_tokens"] == 3200
  cal, test = calibration.split_windows(400, 0.5, 0)
  j = int(np.flatnonzero(np.isclose(res.thresholds, f["threshold"]))[0])
  assert f["test_risk"] == pytest.approx((res.textual[j, test] / 8).mean())
  assert f["calibration_risk"] == pytest.approx((res.textual[j, cal] / 8).mean())
  # Conservative with the bound. Without it, a candidate just above delta whose
  # calibration half looks <= delta has a test half above delta (the halves average
  # to the text's risk), and on this fine grid that happens often.
  assert f["coverage"] >= 0.9 > f["empirical_rule_coverage"]["coverage"] + 0.2
  with pytest.raises(UserError, match="calibration_fraction"):
    calibration.calibration_record(res, delta=0.2, epsilon=0.1, fraction=1.0)
