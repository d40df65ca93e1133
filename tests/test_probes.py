"""Saturation probes: labels, metrics, collection, predictors, probe checkpoints, exit, binary."""

import dataclasses
import functools
import json
import math
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_model
from flax import nnx

from deepexit_jax import checkpoint, data, exits, probes
from deepexit_jax.checkpoint import save_model, write_json
from deepexit_jax.config import ExperimentConfig
from deepexit_jax.errors import UserError
from deepexit_jax.model import ModelConfig, all_layer_logits, create_model

CONFIG = ModelConfig(vocab_size=23, num_layers=4, dim=16, num_heads=2, max_len=16)
FAST = probes.FitConfig(hidden=16, max_epochs=25, patience=4, batch_size=256)


@functools.cache
def _model():
  return random_model(CONFIG)


@functools.cache
def _batches():
  tokens = np.random.default_rng(0).integers(0, CONFIG.vocab_size, 700)
  return data.eval_batches(tokens, 16, 4)  # 11 batches, the last one partly padded


@functools.cache
def _collection():
  return probes.collect(_model(), _batches(), 690, top_k=3,
                        metadata={"model": CONFIG.to_dict()})


# ----------------------------------------------------------------------------------------
# Labels and metrics.


def test_labels_on_a_hand_example():
  # Columns are tokens; rows layers 1..4.
  top1_NM = np.array([[5, 1, 3, 7],
                      [5, 2, 4, 7],
                      [5, 2, 3, 8],
                      [5, 2, 3, 7]])
  t, f = True, False
  np.testing.assert_array_equal(probes.change_labels(top1_NM),
                                [[f, t, t, f], [f, f, t, t], [f, f, f, t]])
  np.testing.assert_array_equal(probes.saturated_labels(top1_NM),
                                [[t, f, f, f], [t, t, f, f], [t, t, t, f]])
  np.testing.assert_array_equal(probes.final_labels(top1_NM),
                                [[t, f, t, t], [t, t, f, t], [t, t, t, f]])
  # The positive class is "settled": for `change` that is "unchanged".
  np.testing.assert_array_equal(probes.settled_labels("change", top1_NM),
                                ~probes.change_labels(top1_NM))
  with pytest.raises(UserError, match="unknown label"):
    probes.settled_labels("stable", top1_NM)


def test_top_k_settling_on_a_hand_example():
  # One token, 3 layers, ranks 1..2: rank 1 settles at layer 2, rank 2 at layer 3.
  topk_NMK = np.array([[[1, 2]], [[4, 2]], [[4, 9]]])
  out = probes.topk_settling(topk_NMK)
  np.testing.assert_array_equal(out["settle_layer_KM"], [[2], [3]])
  assert out["top1_first"] == 1.0 and out["top1_strictly_first"] == 1.0


def test_top_k_settling_per_rank_on_a_hand_example():
  # 3 layers, 4 tokens, ranks 1..2; layer 3 ranks (1, 2) for every token.
  topk_NMK = np.array([
      [[1, 2], [4, 2], [1, 3], [1, 7]],
      [[1, 2], [1, 2], [5, 3], [1, 8]],
      [[1, 2], [1, 2], [1, 2], [1, 2]]])
  out = probes.topk_settling(topk_NMK)
  np.testing.assert_array_equal(out["settle_layer_KM"], [[1, 2, 3, 1], [1, 1, 3, 3]])
  assert out["per_rank"] == [
      {"k": 1, "mean": 1.75, "median": 1.5, "settled_at_1": 0.5, "top1_no_later": 1.0},
      {"k": 2, "mean": 2.0, "median": 2.0, "settled_at_1": 0.5, "top1_no_later": 0.75}]
  assert (out["top1_first"], out["top1_strictly_first"], out["ordered"]) == (0.75, 0.25, 0.75)


def test_pearson_r_against_the_formula():
  rng = np.random.default_rng(4)
  x = rng.normal(size=50)
  y = 0.3 * x + rng.normal(size=50)
  dx, dy = x - x.mean(), y - y.mean()
  expected = (dx * dy).sum() / np.sqrt((dx**2).sum() * (dy**2).sum())
  assert probes.pearson_r(x, y) == pytest.approx(expected, rel=1e-12)
  assert 0.1 < expected < 0.9  # neither trivial nor perfect
  assert probes.pearson_r(x, -2 * x + 1) == pytest.approx(-1.0)
  assert probes.pearson_r(x > 0, y) == pytest.approx(np.corrcoef(x > 0, y)[0, 1])
  assert math.isnan(probes.pearson_r(np.ones(5), np.arange(5)))
  assert math.isnan(probes.pearson_r(np.arange(5), np.zeros(5)))


def _brute_auroc(y, s):
  pos, neg = s[y], s[~y]
  wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
  return wins / (len(pos) * len(neg))


def test_metrics_against_a_direct_computation():
  rng = np.random.default_rng(3)
  y = rng.random(300) < 0.4
  s = np.round(y * 0.5 + rng.normal(size=300), 1)  # rounded: many ties
  pred = s >= 0.2
  tp, fp, fn = (y & pred).sum(), (~y & pred).sum(), (y & ~pred).sum()
  m = probes.binary_metrics(y, pred)
  assert m["precision"] == pytest.approx(tp / (tp + fp))
  assert m["recall"] == pytest.approx(tp / (tp + fn))
  assert m["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
  assert m["accuracy"] == pytest.approx(np.mean(y == pred))
  assert probes.auroc(y, s) == pytest.approx(_brute_auroc(y, s))
  assert probes.auroc(y, -s) == pytest.approx(1 - _brute_auroc(y, s))
  # The tuned threshold is the best of every candidate threshold.
  best = max(probes.binary_metrics(y, s >= t)["f1"] for t in np.unique(s))
  assert probes.binary_metrics(y, s >= probes.best_f1_threshold(y, s))["f1"] == best
  assert math.isnan(probes.auroc(np.ones(4, bool), np.arange(4)))


# ----------------------------------------------------------------------------------------
# Collection.


def test_collection_equals_the_models_per_layer_outputs():
  model, b = _model(), _batches()
  col = _collection()
  # The same token order as the evaluation windows: batch-major, then rows, then time.
  idx = np.arange(col.num_tokens)
  bi, rem = np.divmod(idx, 4 * 16)
  ri, ti = np.divmod(rem, 16)
  # The reference: the model's own per-layer outputs on all windows in one call.
  inputs = np.asarray(b.inputs[:int(bi.max()) + 1])
  flat = inputs.reshape(-1, 16)
  logits_NWTV = np.asarray(all_layer_logits(model, flat))
  out = nnx.jit(lambda m, x: m(x, per_layer_fn=lambda h: None))(model, flat)
  w = bi * 4 + ri  # window index of each collected token
  logits_NMV = logits_NWTV[:, w, ti]
  hidden_NMD = np.asarray(out.hidden_NBTD)[:, w, ti]
  embed_MD = np.asarray(out.embed_BTD)[w, ti]
  np.testing.assert_allclose(col.hidden_NMD[1:], hidden_NMD, atol=1e-5)
  np.testing.assert_allclose(col.hidden_NMD[0], embed_MD, atol=1e-6)
  np.testing.assert_array_equal(col.topk_NMK, np.argsort(-logits_NMV, -1)[..., :3])
  z = logits_NMV.astype(np.float64)
  p = np.exp(z - z.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  ps = np.sort(p, -1)
  np.testing.assert_allclose(col.softmax_NM, ps[..., -1], atol=1e-5)
  np.testing.assert_allclose(col.margin_NM, ps[..., -1] - ps[..., -2], atol=1e-5)
  np.testing.assert_allclose(col.entropy_NM, np.sum(p * np.log(p), -1), atol=1e-4)
  targets_M = np.asarray(b.targets)[bi, ri, ti]
  np.testing.assert_array_equal(col.targets_M, targets_M)
  np.testing.assert_allclose(col.nll_NM, -np.log(p[:, idx, targets_M]), rtol=1e-4, atol=1e-5)
  h_in, h_out = col.h_in_NMD.astype(np.float64), col.h_out_NMD.astype(np.float64)
  cos = (h_in * h_out).sum(-1) / np.linalg.norm(h_in, axis=-1) / np.linalg.norm(h_out, axis=-1)
  np.testing.assert_allclose(col.state_NM, cos, atol=1e-5)
  # The Python-loop path of the same layer body gives the same summaries.
  scan = probes.layer_summaries(model, b.inputs[0], b.targets[0], top_k=3)
  loop = probes.layer_summaries(model, b.inputs[0], b.targets[0], top_k=3, use_scan=False)
  chex.assert_trees_all_close(scan, loop, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(scan["topk"]).reshape(4, -1, 3), col.topk_NMK[:, :64])


def test_collection_never_materialises_all_layers_logits():
  """A 32k vocabulary: [B, T, V] logits exist inside the scan body, [N, B, T, V] nowhere."""
  big = ModelConfig(vocab_size=32_768, num_layers=8, dim=64, num_heads=4, max_len=128)
  graphdef, state = nnx.split(checkpoint.abstract_model(big))  # shapes only
  tokens = jax.ShapeDtypeStruct((8, 128), jnp.int32)
  text = str(jax.make_jaxpr(lambda st, x: probes.trace_layer_summaries(
      nnx.merge(graphdef, st), x, x, 5))(state, tokens))
  assert "f32[8,128,32768]" in text
  assert "f32[8,8,128,32768]" not in text


def test_collection_round_trips_through_npz(tmp_path):
  col = _collection()
  path = str(tmp_path / "c.npz")
  col.save(path)
  back = probes.Collection.load(path)
  for f in dataclasses.fields(col):
    a, b = getattr(col, f.name), getattr(back, f.name)
    if f.name == "metadata":
      assert a == b
    else:
      np.testing.assert_array_equal(a, b)


def test_token_budget_beyond_the_text_is_refused():
  with pytest.raises(UserError, match="exceeds the 699 targets.*--tokens"):
    probes.collect(_model(), _batches(), 65_536)


# ----------------------------------------------------------------------------------------
# Predictors on synthetic tasks with a known answer.


def _synthetic(rule, m=3000, d=8, seed=0):
  """A 3-layer collection whose layer-l top-1 equals the final one iff rule(delta_l)."""
  rng = np.random.default_rng(seed)
  hidden = np.cumsum(rng.normal(size=(4, m, d)), 0).astype(np.float32)
  delta_NMD = hidden[1:] - hidden[:-1]
  top1 = np.zeros((3, m), np.int32)
  for i in range(2):
    top1[i] = np.where(rule(delta_NMD[i]), 0, i + 1)
  settled = np.stack([top1[i] == 0 for i in range(2)])
  noise = rng.normal(size=(3, m)).astype(np.float32)
  soft = np.concatenate([settled + 0.5 * noise[:2], noise[2:]]).astype(np.float32)
  zeros = np.zeros((3, m), np.float32)
  return probes.Collection(
      hidden_NMD=hidden, topk_NMK=top1[..., None], softmax_NM=soft, margin_NM=zeros,
      entropy_NM=zeros, state_NM=soft, nll_NM=zeros, targets_M=np.zeros(m, np.int32),
      positions_M=np.zeros(m, np.int32), metadata={"model": {"dim": d, "vocab_size": 5}})


def _heldout_auroc(col, predictor, num_fit=2250, balanced=False):
  probe, _ = probes.fit_probe(col, "final", predictor, num_fit=num_fit, balanced=balanced,
                              fit=FAST)
  y_LM = probes.settled_labels("final", col.top1_NM)
  s_LM = probes.probe_scores(probe, col)
  return min(probes.auroc(y_LM[i, num_fit:], s_LM[i, num_fit:]) for i in range(2))


def test_each_predictor_learns_a_task_it_can_represent():
  small = _synthetic(lambda x: np.linalg.norm(x, axis=-1) < 2.6)
  assert _heldout_auroc(small, "delta_norm") > 0.95
  w = np.linspace(-1, 1, 8)
  linear = _synthetic(lambda x: x @ w > 0.3)
  assert _heldout_auroc(linear, "linear") > 0.95
  assert _heldout_auroc(linear, "linear", balanced=True) > 0.95
  xor = _synthetic(lambda x: x[:, 0] * x[:, 1] > 0)  # not linearly separable
  assert _heldout_auroc(xor, "linear") < 0.65
  for predictor in ("mlp", "mlp_h_delta", "shared_mlp"):
    assert _heldout_auroc(xor, predictor) > 0.85, predictor


def test_study_rows_and_baselines():
  col = _synthetic(lambda x: x[:, 0] > 0)
  study = probes.run_study(col, labels=("final", "change"), predictors=(
      "delta_norm", "linear", "state", "softmax"), balance=(False,), fit_fraction=0.75, fit=FAST)
  rows = {(r["label"], r["predictor"], r["layer"]): r for r in study.rows}
  assert len(rows) == 2 * 4 * 2
  for key in (("final", "linear", 1), ("final", "softmax", 2)):
    r = rows[key]
    assert r["auroc"] > 0.85 and r["f1"] > r["all_positive_f1"], r
    p = r["positive_rate"]
    assert r["majority_accuracy"] == pytest.approx(max(p, 1 - p))
  assert study.best == "final/linear"
  assert study.flops["probes"]["final/linear"] == probes.probe_flops("delta", 8, 0)


def test_analyses_against_a_direct_computation():
  col = _collection()
  out = probes.analyses(col)
  hidden = col.hidden_NMD.astype(np.float64)
  delta_NM = np.linalg.norm(hidden[1:] - hidden[:-1], axis=-1)
  h_in_NM = np.linalg.norm(hidden[:-1], axis=-1)
  top1 = col.topk_NMK[..., 0]
  n = CONFIG.num_layers
  for i, row in enumerate(out["transitions"]):
    change = (top1[i] != top1[i + 1]).astype(np.float64)
    assert (row["transition"], row["layer"]) == (f"{i + 1}->{i + 2}", i + 1)
    assert row["change_rate"] == pytest.approx(change.mean())
    assert row["r_delta_l"] == pytest.approx(np.corrcoef(delta_NM[i], change)[0, 1], abs=1e-5)
    assert row["r_delta_next"] == pytest.approx(np.corrcoef(delta_NM[i + 1], change)[0, 1],
                                                abs=1e-5)
  assert len(out["transitions"]) == n - 1 and len(out["layers"]) == n
  for i, row in enumerate(out["layers"]):
    assert row["layer"] == i + 1
    assert row["mean_delta_norm"] == pytest.approx(delta_NM[i].mean(), rel=1e-5)
    assert row["mean_relative_delta"] == pytest.approx((delta_NM[i] / h_in_NM[i]).mean(),
                                                       rel=1e-5)
    assert row["mean_h_in_norm"] == pytest.approx(h_in_NM[i].mean(), rel=1e-5)
    assert row["ppl"] == pytest.approx(np.exp(col.nll_NM[i].astype(np.float64).mean()),
                                       rel=1e-5)
    assert row["mean_softmax"] == pytest.approx(col.softmax_NM[i].mean(), rel=1e-5)
    assert row["agrees_with_final"] == pytest.approx(np.mean(top1[i] == top1[-1]))
  assert out["topk"]["per_rank"] == probes.topk_settling(col.topk_NMK)["per_rank"]
  # Not vacuous on this model: layers change their minds and the norms vary.
  rates = [r["change_rate"] for r in out["transitions"]]
  assert min(rates) > 0.05 and len({round(r, 6) for r in rates}) == n - 1


def test_study_scores_every_metric_on_the_held_out_tokens():
  """Rows are scored on tokens [num_fit, M); thresholds come from [0, num_fit)."""
  col, fraction = _collection(), 0.6
  num_fit = int(col.num_tokens * fraction)
  study = probes.run_study(col, labels=("final", "change"),
                           predictors=("delta_norm", "state", "softmax"), balance=(False,),
                           fit_fraction=fraction, fit=FAST)
  assert study.metadata["num_fit"] == num_fit
  differs = 0
  for r in study.rows:
    y = probes.settled_labels(r["label"], col.top1_NM)[r["layer"] - 1]
    if r["predictor"] == "delta_norm":
      probe = study.probes[f"{r['label']}/delta_norm"]
      s, thr = probes.probe_scores(probe, col)[r["layer"] - 1], 0.0
    else:
      s = getattr(col, r["predictor"] + "_NM")[r["layer"] - 1]
      thr = probes.best_f1_threshold(y[:num_fit], s[:num_fit])
    tuned = probes.best_f1_threshold(y[:num_fit], s[:num_fit])
    y_h, s_h = y[num_fit:], s[num_fit:]
    expected = {**probes.binary_metrics(y_h, s_h >= thr), "auroc": probes.auroc(y_h, s_h),
                "f1_tuned": probes.binary_metrics(y_h, s_h >= tuned)["f1"],
                "positive_rate": float(y_h.mean()), "num_heldout": len(y_h),
                "threshold": pytest.approx(thr, rel=1e-6)}
    assert {k: r[k] for k in expected} == expected, r
    fitting_part = probes.binary_metrics(y[:num_fit], s[:num_fit] >= thr)
    differs += fitting_part["f1"] != r["f1"]
  assert differs > len(study.rows) // 2  # the two parts would give other numbers


def test_probes_are_fitted_on_the_fitting_part_only():
  """Changing the held-out tokens' labels changes no fitted parameter; changing the
  fitting part's does."""
  col, num_fit = _collection(), 400

  def relabelled(part):
    """Every token of `part` unsettled: no layer agrees with a last-layer top-1 of -1."""
    topk = col.topk_NMK.copy()
    topk[-1, part, 0] = -1
    return dataclasses.replace(col, topk_NMK=topk)

  fit = dataclasses.replace(FAST, max_epochs=8, patience=2)  # early stopping can act
  for predictor in ("delta_norm", "linear"):
    base, _ = probes.fit_probe(col, "final", predictor, num_fit=num_fit, fit=fit)
    held, _ = probes.fit_probe(relabelled(slice(num_fit, None)), "final", predictor,
                               num_fit=num_fit, fit=fit)
    chex.assert_trees_all_equal(held.params, base.params)
    moved, _ = probes.fit_probe(relabelled(slice(0, num_fit)), "final", predictor,
                                num_fit=num_fit, fit=fit)
    assert not all(np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(moved.params), jax.tree.leaves(base.params)))


# ----------------------------------------------------------------------------------------
# Probes as exit measures; checkpoints.


@functools.cache
def _fitted_probe():
  probe, _ = probes.fit_probe(_collection(), "final", "mlp", num_fit=500,
                              fit=dataclasses.replace(FAST, max_epochs=3))
  return probe


def test_probe_save_load_round_trip(tmp_path):
  probe = _fitted_probe()
  probes.save_probe(probe, str(tmp_path / "p"))
  back = probes.load_probe(str(tmp_path / "p"), CONFIG)
  chex.assert_trees_all_equal(back, probe)
  h_BTD = jnp.ones((1, 2, CONFIG.dim))
  np.testing.assert_array_equal(back(h_BTD, 2 * h_BTD, 2), probe(h_BTD, 2 * h_BTD, 2))
  other = dataclasses.replace(CONFIG, dim=32)
  with pytest.raises(UserError, match="4 layers of width 16.*width 32.*deepexit-probe"):
    probes.load_probe(str(tmp_path / "p"), other)
  with pytest.raises(UserError, match="not a saturation-probe directory"):
    probes.load_probe(str(tmp_path / "missing"))


def test_probe_drives_predict_with_exit_without_recompiling():
  model, probe, b = _model(), _fitted_probe(), _batches()
  assert isinstance(probe, exits.ConfidenceProbe)
  tokens = b.inputs[0]
  events = []

  def listener(event, duration, **kwargs):
    del duration
    if "compile" in event and "_predict" in kwargs.get("fun_name", ""):
      events.append(event)

  run = functools.partial(exits.predict_with_exit, model, tokens, exit_layers=(1, 2, 3),
                          measure="probe", probe=probe)
  vector = run(jnp.array([0.3, 0.5, 0.7, 0.9]))
  run(0.5)
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    scalars = [run(t) for t in (0.3, 0.7, np.float32(0.9))]
    run(jnp.array([0.1, 0.2, 0.6, 0.8]))
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert not events, events
  for s, r in zip((0, 2, 3), scalars):
    np.testing.assert_array_equal(vector.exit_layer[s], r.exit_layer)
  # Decisions equal the probe's own confidence on the collected layers.
  col = _collection()
  conf_LM = jax.nn.sigmoid(probes.probe_scores(probe, col))[:, :64].reshape(3, 4, 16)
  expected = np.full((4, 16), 4)
  for k in (3, 2, 1):
    expected = np.where(conf_LM[k - 1] >= 0.5, k, expected)
  np.testing.assert_array_equal(vector.exit_layer[1], expected)
  assert 0 < np.mean(expected < 4) < 1
  # The probe's FLOPs are counted at every check, plus the head once (exits docstring).
  counter = exits.FlopCounter.from_config(CONFIG)
  t_BT = np.broadcast_to(np.arange(16), (4, 16))
  checks = np.minimum(expected, 3)
  hand = (expected * counter.block(t_BT) + counter.head + checks * probe.flops_per_token)
  np.testing.assert_allclose(vector.flops_fraction[1], hand / counter.full_depth(t_BT),
                             rtol=1e-6)
  assert probe.flops_per_token == probes.probe_flops("delta", CONFIG.dim, 16)
  assert probe.flops_per_token < counter.head


# ----------------------------------------------------------------------------------------
# The pipeline, the binary and the sweep's --probe flag on a trained tiny model.


@pytest.fixture(scope="module")
def trained(config_dict, tmp_path_factory):
  """A 3-layer checkpoint directory as deepexit-train writes it (random weights: the
  pipeline, not the model's quality, is under test; training would only add compile time)."""
  root = tmp_path_factory.mktemp("probe_runs")
  cfg = config_dict()
  cfg["model"] = dict(cfg["model"], num_layers=3, dropout=0.0)
  cfg.update(loss_weights="uniform", exit_layers=[1, 2])
  config = ExperimentConfig.from_dict(cfg)
  dataset = data.prepare_dataset(config.data)
  config = config.with_vocab_size(dataset.tokenizer.vocab_size)
  workdir = str(root / "run")
  save_model(create_model(config.model, seed=1), workdir, tokenizer=dataset.tokenizer)
  write_json(os.path.join(workdir, "config.json"), config.to_dict())
  return workdir


def _cli(module, *args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", module, *args], capture_output=True,
                        text=True, env=env, timeout=300)


def test_run_probes_writes_reports_probes_and_the_sweep_loads_them(trained, tmp_path):
  out = str(tmp_path / "probe")
  study = probes.run_probes(trained, out, tokens=1500, predictors=("delta_norm", "mlp",
                            "softmax"), balance=(False,),
                            fit=dataclasses.replace(FAST, max_epochs=2))
  for ext in ("md", "csv", "json", "png"):
    assert os.path.getsize(os.path.join(out, f"probe.{ext}")) > 0
  with open(os.path.join(out, "probe.json")) as f:
    saved = json.load(f)
  assert saved["best"] == "final/mlp" == study.best
  assert len(saved["rows"]) == 3 * 3 * 2  # labels x predictors x transitions
  assert "Positive class" in open(os.path.join(out, "probe.md")).read()
  # A second run reuses the collection instead of running the model again.
  mtime = os.path.getmtime(os.path.join(out, "collection.npz"))
  probes.run_probes(trained, out, tokens=1500, predictors=("softmax",), balance=(False,))
  assert os.path.getmtime(os.path.join(out, "collection.npz")) == mtime
  res = _cli("deepexit_jax.main.sweep", f"--checkpoint={trained}", f"--out={tmp_path}/sweep",
             "--thresholds=0.5,0.9", "--kv_policy=oracle",
             f"--probe={out}/probes/best")
  assert res.returncode == 0, res.stderr[-2000:]
  with open(tmp_path / "sweep" / "sweep.json") as f:
    swept = json.load(f)
  assert swept["measure"] == "probe" and swept["metadata"]["probe"].endswith("best")
  with pytest.raises(UserError, match="token budget 65,536 exceeds"):
    probes.run_probes(trained, out, tokens=65_536)


def test_binary_reports_bad_input_in_one_line(tmp_path):
  res = _cli("deepexit_jax.main.probe", f"--checkpoint={tmp_path}/nothing", f"--out={tmp_path}/o")
  assert res.returncode == 2
  lines = res.stderr.strip().splitlines()
  assert lines[-1].startswith("error: ") and "not a deepexit checkpoint" in lines[-1]
  assert "Traceback" not in res.stderr
