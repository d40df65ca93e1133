"""Threshold sweeps: parsing, rows against a direct computation, reports and the binary."""

import csv
import dataclasses
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from deepexit_jax import data, report, sweep
from deepexit_jax.checkpoint import load_checkpoint
from deepexit_jax.config import ExperimentConfig
from deepexit_jax.errors import UserError
from deepexit_jax.exits import FlopCounter
from deepexit_jax.model import all_layer_logits
from deepexit_jax.train import train


@pytest.mark.parametrize("spec, expected", [
    ("0:1:0.1", [round(0.1 * i, 1) for i in range(11)]),
    ("0.5,0.9", [0.5, 0.9]),
    ("0.2:0.2:0.1", [0.2]),
    ("inf", [math.inf]),
])
def test_parse_thresholds(spec, expected):
  np.testing.assert_allclose(sweep.parse_thresholds(spec), expected, rtol=1e-6)


@pytest.mark.parametrize("spec, words", [
    ("0:1:0", "step"), ("a:b:c", "start:stop:step"), ("nan", "NaN"), ("0.5,-0.1", "negative"),
    ("1:0:0.1", "no thresholds"),
])
def test_parse_thresholds_rejects_bad_input(spec, words):
  with pytest.raises(UserError, match=words):
    sweep.parse_thresholds(spec)


@pytest.fixture(scope="module")
def runs(config_dict, tmp_path_factory):
  """A trained 2-layer early-exit model (exit at 1) and a 1-layer static baseline."""
  root = tmp_path_factory.mktemp("sweep_runs")
  ee = config_dict(max_steps=16, eval_every=8)
  static = config_dict(max_steps=16, eval_every=8)
  static["model"] = dict(static["model"], num_layers=1)
  static.update(loss_weights="final", exit_layers=[1])
  train(ExperimentConfig.from_dict(ee), str(root / "ee"))
  train(ExperimentConfig.from_dict(static), str(root / "static1"))
  return str(root / "ee"), str(root / "static1")


@pytest.fixture(scope="module")
def swept(runs):
  ee, static = runs
  return sweep.run_sweep(ee, np.array([0.0, 0.5, 1.0, np.inf], np.float32),
                         kv_policies=("oracle", "copy"), static_dirs=[static])


def _direct_layer_ppl(workdir: str, layer: int) -> float:
  """PPL of one layer's exit over the run's validation text, computed without the engine."""
  ckpt = load_checkpoint(workdir)
  cfg = data.DataConfig.from_dict(ckpt.experiment["data"])
  ds = data.prepare_dataset(cfg, tokenizer=ckpt.tokenizer)
  b = data.eval_batches(ds.val_tokens, cfg.seq_len, cfg.batch_size)
  total = 0.0
  for i in range(b.num_batches):
    logits = np.asarray(all_layer_logits(ckpt.model, b.inputs[i]))[layer - 1]
    logits = logits - logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, b.targets[i][..., None], -1)[..., 0]
    total += float((nll * b.mask[i]).sum())
  return math.exp(total / b.num_targets)


def test_sweep_rows_match_a_direct_computation(runs, swept):
  ee, _ = runs
  rows = {(r.kind, r.kv_policy, r.threshold): r for r in swept.rows}
  full = rows[("full", "", None)]
  assert full.flops_fraction == pytest.approx(1.0, abs=1e-6)
  assert full.layers_fraction == 1.0 and full.shallow_exit == 0.0
  np.testing.assert_allclose(full.ppl, _direct_layer_ppl(ee, 2), rtol=1e-4)
  for policy in ("oracle", "copy"):
    # Threshold 0: every token exits at layer 1 of 2, under both policies the layer-1 PPL.
    zero = rows[("threshold", policy, 0.0)]
    assert zero.shallow_exit == 1.0 and zero.layers_fraction == 0.5
    np.testing.assert_allclose(zero.ppl, _direct_layer_ppl(ee, 1), rtol=1e-4)
    # Never exiting equals full depth in PPL but pays for the layer-1 check.
    never = rows[("threshold", policy, math.inf)]
    np.testing.assert_allclose(never.ppl, full.ppl, rtol=1e-4)
    assert never.shallow_exit == 0.0 and never.flops_fraction > 1.0
  oracle_rows = [r for r in swept.rows if r.kind == "threshold" and r.kv_policy == "oracle"]
  exits = [r.shallow_exit for r in sorted(oracle_rows, key=lambda r: r.threshold)]
  assert exits == sorted(exits, reverse=True)
  assert all(r.ppl_change == pytest.approx(r.ppl / full.ppl - 1) for r in swept.rows)


def test_oracle_bound_exits_where_top1_agrees_with_the_last_layer(runs, swept):
  ckpt = load_checkpoint(runs[0])
  cfg = data.DataConfig.from_dict(ckpt.experiment["data"])
  ds = data.prepare_dataset(cfg, tokenizer=ckpt.tokenizer)
  b = data.eval_batches(ds.val_tokens, cfg.seq_len, cfg.batch_size)
  agree = total = 0.0
  for i in range(b.num_batches):
    top = np.asarray(all_layer_logits(ckpt.model, b.inputs[i])).argmax(-1)
    agree += float(((top[0] == top[1]) * b.mask[i]).sum())
    total += float(b.mask[i].sum())
  bound = next(r for r in swept.rows if r.kind == "oracle")
  assert bound.shallow_exit == pytest.approx(agree / total, abs=1e-6)
  assert bound.layers_fraction == pytest.approx(1 - 0.5 * agree / total, abs=1e-6)


def test_static_baseline_is_costed_in_the_early_exit_models_units(runs, swept):
  ee, static = runs
  row = next(r for r in swept.rows if r.kind == "static")
  assert row.depth == 1 and row.layers_fraction == 0.5
  np.testing.assert_allclose(row.ppl, _direct_layer_ppl(static, 1), rtol=1e-4)
  ee_cfg, st_cfg = load_checkpoint(ee).model.config, load_checkpoint(static).model.config
  seq = ee_cfg.max_len
  t = np.arange(seq)
  # Every eval position is used equally often except the padded tail; the ratio of sums
  # over positions 0..T-1 bounds it tightly for this text.
  ratio = (FlopCounter.from_config(st_cfg).full_depth(t).sum()
           / FlopCounter.from_config(ee_cfg).full_depth(t).sum())
  assert row.flops_fraction == pytest.approx(ratio, rel=2e-2)
  assert row.flops_fraction < 0.6


def test_recommendations_and_pareto_front():
  def row(thr, ppl, flops):
    return sweep.SweepRow("threshold", f"{thr}", "oracle", thr, ppl, 0.0, (), flops, flops)

  rows = sweep.with_ppl_change(
      [row(0.0, 10.3, 0.5), row(0.5, 10.04, 0.6), row(0.8, 10.0, 0.8), row(0.9, 10.1, 0.9),
       dataclasses.replace(row(math.inf, 10.0, 1.0), kind="full", threshold=None)], 10.0)
  rec = sweep.recommend(rows)
  assert rec["best_quality_at_lowest_compute"].threshold == 0.5  # +0.4% <= +0.5%
  assert rec["max_efficiency"].threshold == 0.0
  assert rec["full_depth"].kind == "full"
  front = sweep.pareto_front(rows)
  assert [r.threshold for r in front] == [0.0, 0.5, 0.8]  # 0.9 is dominated


def test_write_report_writes_every_format(swept, tmp_path):
  paths = report.write_report(swept, str(tmp_path / "out"), overlay=[("ref", 0.5, 14.5)])
  assert sorted(os.path.basename(p) for p in paths.values()) == [
      "sweep.csv", "sweep.json", "sweep.md", "sweep.png"]
  with open(paths["json"]) as f:
    js = json.load(f)
  assert len(js["rows"]) == len(swept.rows)
  assert js["metadata"]["params_sha256"] == swept.metadata["params_sha256"]
  assert js["metadata"]["experiment"]["exit_layers"] == [1]
  with open(paths["csv"]) as f:
    assert len(list(csv.DictReader(f))) == len(swept.rows)
  md = open(paths["md"]).read()
  for words in ("KV policy `oracle`", "KV policy `copy`", "static 1-layer", "oracle bound",
                "Shallow Exit %", "Recommended settings"):
    assert words in md
  assert os.path.getsize(paths["png"]) > 10_000


def test_exit_layer_beyond_the_model_is_refused(runs):
  with pytest.raises(UserError, match="exit"):
    sweep.run_sweep(runs[0], np.array([0.5], np.float32), exit_layers=(3,))


def test_static_baseline_with_another_vocabulary_is_refused(runs, swept, tmp_path):
  other = dataclasses.replace(load_checkpoint(runs[1]).model.config, vocab_size=7)
  from deepexit_jax.model import create_model
  ckpt = load_checkpoint(runs[0])
  cfg = data.DataConfig.from_dict(ckpt.experiment["data"])
  ds = data.prepare_dataset(cfg, tokenizer=ckpt.tokenizer)
  b = data.eval_batches(ds.val_tokens, cfg.seq_len, cfg.batch_size)
  with pytest.raises(UserError, match="vocabulary"):
    sweep.static_baseline(create_model(other), b, ckpt.model)


def _sweep_binary(*args, cwd):
  return subprocess.run([sys.executable, "-m", "deepexit_jax.main.sweep", *args], cwd=cwd,
                        capture_output=True, text=True, timeout=300)


def test_binary_sweeps_and_reports_bad_thresholds_in_one_line(runs, tmp_path):
  ee, static = runs
  bad = _sweep_binary(f"--checkpoint={ee}", "--thresholds=0.5,nan", cwd=tmp_path)
  assert bad.returncode == 2
  assert bad.stderr.strip().splitlines()[-1].startswith("error:")
  assert "NaN" in bad.stderr and "Traceback" not in bad.stderr
  missing = _sweep_binary(f"--checkpoint={tmp_path / 'nope'}", cwd=tmp_path)
  assert missing.returncode == 2 and "not a deepexit checkpoint" in missing.stderr
  ok = _sweep_binary(f"--checkpoint={ee}", "--thresholds=0,0.5", "--kv_policy=oracle",
                     f"--static={static}", f"--out={tmp_path / 'o'}", cwd=tmp_path)
  assert ok.returncode == 0, ok.stderr[-2000:]
  assert "| Threshold | PPL | Shallow Exit %" in ok.stdout
  assert os.path.exists(tmp_path / "o" / "sweep.png")


def _scans(jaxpr) -> list:
  """Every `scan` equation in a jaxpr, searching nested jaxprs (jit, vmap bodies, cond)."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "scan":
      found.append(eqn)
    for value in eqn.params.values():
      for sub in value if isinstance(value, tuple | list) else (value,):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          found += _scans(inner)
  return found


@pytest.mark.parametrize("policy, layer_scans", [("oracle", 1), ("copy", 5)])
def test_oracle_sweep_runs_one_forward_pass_for_all_thresholds(policy, layer_scans):
  import jax
  import jax.numpy as jnp

  from deepexit_jax.exits import predict_with_exit
  from deepexit_jax.model import ModelConfig, create_model

  model = create_model(ModelConfig(vocab_size=11, num_layers=3, dim=8, num_heads=2,
                                   max_len=8))
  tokens = jnp.zeros((2, 8), jnp.int32)
  thr_S = jnp.linspace(0.0, 1.0, 5)
  jaxpr = jax.make_jaxpr(lambda thr: predict_with_exit(
      model, tokens, thr, exit_layers=(1, 2), kv_policy=policy, targets=tokens).nll)(thr_S)
  scans = _scans(jaxpr.jaxpr)
  # One layer scan (length N = 3) in the whole computation, whatever the number of
  # thresholds; `oracle` runs it once, `copy` once per threshold (inside a map of
  # length S = 5), never over a batched threshold axis.
  layer = [e for e in scans if e.params["length"] == 3]
  outer = [e for e in scans if e.params["length"] == 5]
  assert len(layer) == 1
  assert len(outer) == (layer_scans > 1)
  runs = 1 if not outer else outer[0].params["length"]
  assert runs == layer_scans
  shapes = [v.aval.shape for v in layer[0].invars if hasattr(v.aval, "shape")]
  assert not any(s[:1] == (5,) and len(s) == 4 for s in shapes)


def test_sweep_passes_sequence_routing_to_the_engine(runs):
  # Threshold at the median layer-1 confidence, so token routing exits about half.
  ckpt = load_checkpoint(runs[0])
  cfg = data.DataConfig.from_dict(ckpt.experiment["data"])
  b = data.eval_batches(data.prepare_dataset(cfg, tokenizer=ckpt.tokenizer).val_tokens,
                        cfg.seq_len, cfg.batch_size)
  logits = np.asarray(all_layer_logits(ckpt.model, b.inputs[0]))[0]
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  thr = np.float32(np.median(1.0 / probs.sum(-1)))  # max softmax probability
  token = sweep.run_sweep(runs[0], np.array([thr]), kv_policies=("oracle",))
  seq = sweep.run_sweep(runs[0], np.array([thr]), kv_policies=("oracle",), routing="sequence",
                        seq_quantile=1.0)
  pick = lambda rep: next(r for r in rep.rows if r.kind == "threshold")  # noqa: E731
  # A token exits under sequence routing only if its whole sequence is confident, so
  # fewer tokens exit than under token routing.
  assert 0.2 < pick(token).shallow_exit < 0.8
  assert pick(seq).shallow_exit < pick(token).shallow_exit
  assert seq.metadata["routing"] == "sequence" and "routing `sequence`" in report.markdown(seq)


def test_bpe_model_trains_and_sweeps(config_dict, tmp_path):
  """Large-vocabulary path end to end: a BPE tokenizer, training, a summary-path sweep."""
  from deepexit_jax.config import ExperimentConfig
  from deepexit_jax.train import train

  d = config_dict(max_steps=4, eval_every=4)
  d["data"].update(tokenizer="bpe", bpe_vocab_size=1024)
  result = train(ExperimentConfig.from_dict(d), str(tmp_path / "bpe"))
  assert result.model.config.vocab_size == 1024
  report = sweep.run_sweep(str(tmp_path / "bpe"), np.array([0.0, np.inf], np.float32),
                           kv_policies=("oracle",))
  rows = {r.label: r for r in report.rows}
  assert np.isfinite(rows["full depth"].ppl)
  thr = [r for r in report.rows if r.kind == "threshold"]
  assert thr[0].layers_fraction == 0.5 and thr[1].layers_fraction == 1.0


def test_parse_thresholds_accepts_negative_ones_for_entropy_only():
  np.testing.assert_allclose(sweep.parse_thresholds("-1:0:0.5", allow_negative=True),
                             [-1.0, -0.5, 0.0])
  with pytest.raises(UserError, match="entropy"):
    sweep.parse_thresholds("-1:0:0.5")


def test_binary_calibrates_and_writes_calibration_json(runs, tmp_path):
  ee, _ = runs
  bad = _sweep_binary(f"--checkpoint={ee}", "--calibrate", "--delta=1.5", cwd=tmp_path)
  assert bad.returncode == 2 and "Traceback" not in bad.stderr
  assert bad.stderr.strip().splitlines() == [
      "error: delta=1.5 must be a number strictly between 0 and 1, e.g. delta=0.05"]
  ok = _sweep_binary(f"--checkpoint={ee}", "--thresholds=0,0.5,0.9", "--kv_policy=oracle",
                     "--calibrate", "--delta=0.3", "--epsilon=0.2", "--coverage_splits=20",
                     "--calibration_kv_policy=oracle", f"--out={tmp_path / 'o'}", cwd=tmp_path)
  assert ok.returncode == 0, ok.stderr[-2000:]
  with open(tmp_path / "o" / "calibration.json") as f:
    cal = json.load(f)
  for key in ("threshold", "delta", "epsilon", "consistency", "calibration_tokens",
              "test_tokens", "test_risk", "flops_fraction", "ppl", "coverage"):
    assert key in cal, key
  assert (cal["delta"], cal["epsilon"], cal["consistency"]) == (0.3, 0.2, "textual")
  ckpt = load_checkpoint(ee)
  cfg = data.DataConfig.from_dict(ckpt.experiment["data"])
  b = data.eval_batches(data.prepare_dataset(cfg, tokenizer=ckpt.tokenizer).val_tokens,
                        cfg.seq_len, cfg.batch_size)
  # Whole windows on each side, every validation token on exactly one side.
  assert cal["calibration_tokens"] + cal["test_tokens"] == b.num_targets
  assert cal["calibration_tokens"] > 0 and cal["test_tokens"] > 0
  assert 0.0 <= cal["coverage"] <= 1.0 and cal["coverage_detail"]["splits"] == 20
  assert cal["threshold"] == "inf" or cal["threshold"] in (0.0, 0.5, 0.9)
  md = open(tmp_path / "o" / "sweep.md").read()
  assert "### Calibrated setting" in md and "Fitted to the reported text" in md
