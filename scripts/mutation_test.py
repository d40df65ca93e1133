"""Mutation testing: plant plausible one-line bugs, one at a time, and count the ones tests catch.

A development tool, not part of CI. Each mutant replaces one exact snippet of a core
module (exits, losses, model, attention, decoding, probes, calibration) in a temporary copy of the
repository and runs the tests that should catch it; a mutant is killed when they fail.
The list is hand-written: every entry is a bug someone could plausibly write (an
inverted comparison, a dropped term, the wrong LayerNorm), not a random edit, so a
surviving mutant is either a missing test or an equivalent change (noted in `why`).

  .venv/bin/python scripts/mutation_test.py                 # every module
  .venv/bin/python scripts/mutation_test.py --modules exits,losses --jobs 2
  .venv/bin/python scripts/mutation_test.py --list          # the mutants, nothing run

The last line of the output is JSON: per module killed / total (mutants marked
equivalent are listed apart, not counted) and the survivors. A
mutant whose snippet is not found exactly once (the code moved on) is reported as
stale and not counted; update its snippet.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import glob
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Mutant:
  """One planted bug.

  Attributes:
    module: the package module ("exits"); its file is deepexit_jax/<module>.py or any
      file of the package deepexit_jax/<module>/.
    old: exact snippet to replace; must occur once in the module (or `nth` picks one).
    new: its replacement.
    tests: pytest arguments that should catch it (files, `-k` expressions).
    why: what the bug is.
    nth: which occurrence to replace when `old` occurs more than once (0-based).
    equivalent: known to compute the same results (kept to show the check was made);
      reported apart, not counted.
  """

  module: str
  old: str
  new: str
  tests: tuple[str, ...]
  why: str
  nth: int | None = None
  equivalent: bool = False

  @property
  def name(self) -> str:
    return f"{self.module}: {self.why}"


def _m(module, old, new, tests, why, nth=None, equivalent=False):
  return Mutant(module, old, new, tuple(shlex.split(tests)), why, nth, equivalent)


EX = "tests/test_exits.py"
DEC = "tests/test_decoding.py"
REF = "tests/test_reference.py"
PRB = "tests/test_probes.py"
CAL = "tests/test_calibration.py"

MUTANTS = [
    # exits.py: measures, selection, decay, routing, KV policies, accounting.
    _m("exits", "ok_XBT = conf_XBT >= thr_T", "ok_XBT = conf_XBT > thr_T",
       f"{EX} -k equal_to_a_confidence", "exit rule > instead of >="),
    _m("exits", "threshold * factor_T, threshold / factor_T",
       "threshold * factor_T, threshold * factor_T", f"{EX} -k decay",
       "negative thresholds decay the wrong way"),
    _m("exits", "factor_T = jnp.exp(-decay *", "factor_T = jnp.exp(decay *",
       f"{EX} -k decay", "position decay makes later thresholds stricter"),
    _m("exits", "jnp.sum(ok_XBT, -1, keepdims=True) >= need",
       "jnp.sum(ok_XBT, -1, keepdims=True) > need", f"{EX} -k sequence",
       "sequence routing needs one more confident token"),
    _m("exits", "need = math.ceil(round(opts.seq_quantile * seq_len, 6))",
       "need = math.floor(round(opts.seq_quantile * seq_len, 6))",
       f"{EX} -k sequence", "sequence quantile rounds down (oracle)", nth=0),
    _m("exits", "need = math.ceil(round(opts.seq_quantile * seq_len, 6))",
       "need = max(1, math.floor(opts.seq_quantile * seq_len) - 1)",
       f"{EX} -k sequence", "sequence quantile off by one (copy)", nth=1),
    _m("exits", "  return p_BT2[..., 0] - p_BT2[..., 1]\n\n\ndef entropy",
       "  return p_BT2[..., 0]\n\n\ndef entropy", f"{EX} -k margin",
       "margin is the top-1 probability"),
    _m("exits", "  return p_BT2[..., 0] - p_BT2[..., 1]\n  return",
       "  return p_BT2[..., 0] + p_BT2[..., 1]\n  return", f"{EX} -k 'margin or lean'",
       "margin from log-probabilities adds"),
    _m("exits", "  return jnp.sum(jnp.exp(logp_BTV) * logp_BTV, -1)\n\n\ndef state",
       "  return jnp.sum(logp_BTV, -1) / logp_BTV.shape[-1]\n\n\ndef state",
       f"{EX} -k entropy", "entropy measure is the mean log-probability"),
    _m("exits", "return jnp.sum(a_BTD * b_BTD, -1) / jnp.maximum",
       "return jnp.sum(a_BTD * a_BTD, -1) / jnp.maximum", f"{EX} -k state",
       "state cosine of h_in with itself"),
    _m("exits", "2 * 2 * (t + 1) * d", "2 * 2 * t * d", f"{EX} -k flops",
       "attention FLOPs miss the token's own key"),
    _m("exits", "return 2 * self.dim * 2 * self.dim", "return 2 * self.dim * self.dim",
       f"{EX} -k flops", "copied K/V cost counts one projection"),
    _m("exits", "flops = flops + (self.num_layers - exit_layer) * self.kv",
       "flops = flops + (self.num_layers - exit_layer - 1) * self.kv", f"{EX} -k flops",
       "copy policy's K/V cost off by one layer"),
    _m("exits", "num_checks * self.head + (exit_layer == self.num_layers) * self.head",
       "num_checks * self.head", f"{EX} -k flops", "full-depth tokens' final head not counted"),
    _m("exits", "h_next_BTD = jnp.where(exited_BT[..., None], h_in_BTD, h_out_BTD)",
       "h_next_BTD = h_out_BTD", f"{EX} -k copy", "copy policy does not freeze exited states"),
    _m("exits", "jnp.where(exited_BT, conf_BT, c_BT),", "c_BT,", f"{EX} -k copy",
       "copy policy overwrites an exited token's confidence"),
    _m("exits", "ok_LBT = jnp.concatenate([ok_EBT, jnp.ones(",
       "ok_LBT = jnp.concatenate([ok_EBT, jnp.zeros(", f"{EX} -k oracle_matches",
       "tokens confident nowhere exit at the first layer"),
    _m("exits", "agree_EBT = top_NBT[np.asarray([k - 1 for k in layers], np.int32)] == top_NBT[-1]",
       "agree_EBT = top_NBT[np.asarray([k - 1 for k in layers], np.int32)] == top_NBT[-2]",
       f"{EX} -k oracle_exit_layer", "oracle bound compares with layer N-1"),
    _m("exits", "jnp.minimum(idx_BT, e - 1)[None]", "jnp.minimum(idx_BT, 0)[None]",
       f"{EX} -k oracle_matches", "reported confidence always from the first exit layer"),
    # losses.py: weights, masking, recipes.
    _m("losses", "logits_BTV = jax.lax.stop_gradient(logits_BTV.astype(jnp.float32))\n  return",
       "logits_BTV = logits_BTV.astype(jnp.float32)\n  return",
       "tests/test_recipes.py -k constants", "gradient flows through the confidence weight"),
    _m("losses", "jax.lax.stop_gradient(teacher_BTV.astype(jnp.float32)) / temperature",
       "teacher_BTV.astype(jnp.float32) / temperature",
       "tests/test_recipes.py -k 'constants or pull'", "distillation pulls the teacher"),
    _m("losses", "return temperature ** 2 * jnp.sum", "return temperature * jnp.sum",
       "tests/test_recipes.py -k kd_and", "KD term scaled by T, not T^2"),
    _m("losses", "tok_NBT / jnp.maximum(jnp.sum(tok_NBT, (1, 2), keepdims=True), 1e-30)",
       "tok_NBT / jnp.maximum(jnp.sum(mask_BT), 1e-30)", "tests/test_recipes.py -k kd",
       "confidence weights not normalised to mean 1"),
    _m("losses", "(1 - kd_weight) * term_N + kd_weight * kd_N",
       "(1 - kd_weight) * term_N + kd_N", "tests/test_recipes.py -k kd",
       "KD term not weighted by beta"),
    _m("losses", "early_N = jnp.arange(nll_NBT.shape[0]) != teacher_layer",
       "early_N = jnp.arange(nll_NBT.shape[0]) >= 0", "tests/test_recipes.py -k kd",
       "teacher layer gets the early-exit terms"),
    _m("losses", "jnp.sum(x_NBT * mask_BT, axis=(-2, -1))", "jnp.sum(x_NBT, axis=(-2, -1))",
       "tests/test_losses.py", "padding counts in the loss"),
    _m("losses", "return jnp.dot(weights_N, layer_nll_N), layer_nll_N",
       "return jnp.sum(layer_nll_N), layer_nll_N", "tests/test_losses.py",
       "loss weights ignored"),
    _m("losses", "on_N = (jnp.asarray(rank_N) + step) % rotation_period == 0",
       "on_N = (jnp.asarray(rank_N) + step) % rotation_period != 0",
       "tests/test_recipes.py -k rotational", "rotational curriculum inverted"),
    _m("losses", "return w_N * (float(weights_N.sum()) / jnp.sum(w_N))", "return w_N",
       "tests/test_recipes.py -k curriculum", "curriculum weights not renormalised"),
    # model.py: the block's math.
    _m("model", "mlp_MD = self.fc2(jax.nn.gelu(self.fc1(self.ln2(h_MD))))",
       "mlp_MD = self.fc2(jax.nn.gelu(self.fc1(self.ln1(h_MD))))", REF,
       "MLP reads the attention LayerNorm"),
    _m("model", "mlp_MD = self.fc2(jax.nn.gelu(self.fc1(",
       "mlp_MD = self.fc2(jax.nn.gelu(approximate=False, x=self.fc1(", REF,
       "exact erf GELU instead of the tanh form"),
    _m("attention", "return (jnp.arange(lo, hi)[:, None] >= jnp.arange(s)[None, :])[None]",
       "return (jnp.arange(lo, hi)[:, None] + 1 >= jnp.arange(s)[None, :])[None]",
       REF, "causal mask lets each token see the next one"),
    _m("model", "return self.embed(tokens_BT) + self.pos_embed[...][positions_BT]",
       "return self.embed(tokens_BT) + self.pos_embed[...][positions_BT * 0]", REF,
       "every position gets position 0's embedding"),
    _m("attention", "q_BTHK, k_BSHK) / jnp.sqrt(", "q_BTHK, k_BSHK) / (", REF,
       "attention scores divided by K instead of sqrt(K)"),
    _m("model", "x_MD = self.final_norm(h_BTD.reshape(-1, d))", "x_MD = h_BTD.reshape(-1, d)",
       REF, "exit head skips the final LayerNorm"),
    _m("model", "visible_B1S = (jnp.arange(s)[None] < jnp.reshape(t, (-1, 1)))[:, None]",
       "visible_B1S = (jnp.arange(s)[None] <= jnp.reshape(t, (-1, 1)))[:, None]",
       f"{REF} {DEC} -k 'teacher_forced or emulation'",
       "a decode step also attends to its own (stale) cache slot"),
    _m("model", "self_BH1 = jnp.sum(q_BHK * k_BHK, -1, keepdims=True) / scale",
       "self_BH1 = jnp.sum(q_BHK * k_BHK, -1, keepdims=True)", REF,
       "a decode step's own score is not scaled"),
    _m("attention", "+ jnp.einsum(\"bhrs,bshk->brhk\", p_BHRX[..., s:], v_BRHK))",
       "+ jnp.einsum(\"bhrs,bshk->brhk\", p_BHRX[..., s:], k_BRHK))", REF,
       "cached attention reads the new rows' keys as values (prefill, catch-up)"),
    # decoding (decoding.py, or the decoding/ package): the incremental decoder, its cost.
    _m("decoding", "ok_B = conf_B >= threshold", "ok_B = conf_B > threshold",
       f"{DEC} -k equal_to_a_confidence", "decoder exit rule > instead of >="),
    _m("decoding", "ok_B = jnp.broadcast_to(jnp.all(ok_B), ok_B.shape)",
       "ok_B = jnp.broadcast_to(jnp.any(ok_B), ok_B.shape)", f"{DEC} -k sync",
       "sync batch exits when ANY row is confident"),
    _m("decoding", "x_LBD = xhat_BD[None] * scale_ND[lo:, None] + bias_ND[lo:, None]",
       "x_LBD = xhat_BD[None] * scale_ND[lo:, None]", f"{DEC} -k emulation",
       "copied keys/values skip the LayerNorm bias"),
    _m("decoding", "active_Q = st[\"q_depth\"] <= i", "active_Q = st[\"q_depth\"] < i",
       f"{DEC} -k recompute", "catch-up skips the first missing layer"),
    _m("decoding", "stop = stop & jnp.any(st[\"q_depth\"] == n)", "stop = stop",
       f"{DEC} -k recompute", "a stopped step ignores a full queue"),
    _m("decoding", "executed_M = executed_M + (n - run_M) * counter.kv",
       "executed_M = executed_M + (n - run_M - 1) * counter.kv", f"{DEC} -k cost",
       "decode cost: copied K/V off by one layer"),
    _m("decoding", "executed_M = run_M * block_M + np.asarray(result.recomputed_layers) * block_M",
       "executed_M = run_M * block_M", f"{DEC} -k cost",
       "decode cost ignores recompute catch-up"),
    _m("decoding", "full_depth=float(b * counter.full_depth(t_M).sum()), ideal=",
       "full_depth=float(counter.full_depth(t_M).sum()), ideal=", f"{DEC} -k cost",
       "decode cost's full depth counts one row"),
    _m("decoding", "executed=float(b * executed_M.sum())", "executed=float(executed_M.sum())",
       f"{DEC} -k cost", "decode cost's executed FLOPs count one row"),
    # calibration.py: Learn-then-Test (tests/test_calibration.py, not ours but run here).
    _m("calibration", "return np.where(r < delta, np.exp(-2.0 * n * np.square(delta - r)), 1.0)",
       "return np.where(r < delta, np.exp(-n * np.square(delta - r)), 1.0)",
       f"{CAL} -k hoeffding", "Hoeffding p-value without the factor 2"),
    _m("calibration", "k = np.ceil(np.round(n * r, 9))", "k = np.floor(np.round(n * r, 9))",
       f"{CAL} -k 'bentkus or null_boundary'", "Bentkus bound counts one loss fewer"),
    _m("calibration", "rejected_S = np.cumprod(p_S <= epsilon).astype(bool)",
       "rejected_S = (p_S <= epsilon)", f"{CAL} -k 'fixed_sequence or certified'",
       "every rejected hypothesis counts, not only the fixed-sequence prefix"),
    _m("calibration", "order = np.argsort(-thr_S, kind=\"stable\")",
       "order = np.argsort(thr_S, kind=\"stable\")", f"{CAL} -k 'fixed_sequence or negative'",
       "candidates tested from the riskiest threshold"),
    # probes.py: labels, metrics, the study's split.
    _m("probes", "return float(np.corrcoef(x, y)[0, 1])", "return float(abs(np.corrcoef(x, y)[0, 1]))",
       f"{PRB} -k pearson", "pearson_r loses its sign"),
    _m("probes", "if x.std() == 0 or y.std() == 0:", "if x.std() == 0:", f"{PRB} -k pearson",
       "pearson_r without its constant-y guard (equivalent: np.corrcoef gives NaN too, "
       "with a RuntimeWarning)", equivalent=True),
    _m("probes", "y, s = y_LM[i, num_fit:], score_LM[i, num_fit:]",
       "y, s = y_LM[i, :num_fit], score_LM[i, :num_fit]", f"{PRB} -k held_out",
       "the study scores the fitting part"),
    _m("probes", "tuned = best_f1_threshold(y_LM[i, :num_fit], score_LM[i, :num_fit])",
       "tuned = best_f1_threshold(y_LM[i], score_LM[i])", f"{PRB} -k held_out",
       "the tuned threshold sees the held-out tokens"),
    _m("probes", "y, s = y_LM[i, :num_fit], norm_LM[i, :num_fit]", "y, s = y_LM[i], norm_LM[i]",
       f"{PRB} -k fitting_part", "delta_norm probe fitted on every token"),
    _m("probes", "x, y, idx = x_LMF[:, :num_fit], y_fit, np.zeros_like(y_fit, np.int32)",
       "x, y, idx = x_LMF, y_LM, np.zeros_like(y_LM, np.int32)", f"{PRB} -k fitting_part",
       "learned probes early-stop on the held-out tokens"),
    _m("probes", "\"r_delta_next\": pearson_r(delta_NM[i + 1], change_LM[i]),",
       "\"r_delta_next\": pearson_r(delta_NM[i], change_LM[i]),", f"{PRB} -k analyses",
       "analyses correlate the next change with this layer's update"),
    _m("probes", "\"mean_relative_delta\": float(np.mean(delta_NM[i] / np.maximum(h_in_NM[i], 1e-30))),",
       "\"mean_relative_delta\": float(np.mean(delta_NM[i]) / np.mean(h_in_NM[i])),",
       f"{PRB} -k analyses", "relative update as a ratio of means"),
    _m("probes", "\"top1_no_later\": float(np.mean(settle_KM[0] <= settle_KM[k]))}",
       "\"top1_no_later\": float(np.mean(settle_KM[0] < settle_KM[k]))}",
       f"{PRB} -k settling", "per-rank top1_no_later strict"),
    _m("probes", "settle_KM = (n - settled_NMK.sum(0) + 1).T", "settle_KM = (n - settled_NMK.sum(0)).T",
       f"{PRB} -k settling", "settling layers 0-based"),
    _m("probes", "\"ordered\": float(np.mean(np.all(np.diff(settle_KM, axis=0) >= 0, 0))),",
       "\"ordered\": float(np.mean(np.all(np.diff(settle_KM, axis=0) > 0, 0))),",
       f"{PRB} -k settling", "ordered settling strict"),
]


def _module_files(root: str, module: str) -> list[str]:
  single = os.path.join(root, "deepexit_jax", f"{module}.py")
  package = glob.glob(os.path.join(root, "deepexit_jax", module, "**", "*.py"), recursive=True)
  return ([single] if os.path.exists(single) else []) + sorted(package)


def _plant(root: str, mutant: Mutant) -> str | None:
  """Applies `mutant` under `root`; returns the file changed, or None if stale."""
  hits = []
  for path in _module_files(root, mutant.module):
    with open(path, encoding="utf-8") as f:
      text = f.read()
    start = 0
    while (i := text.find(mutant.old, start)) >= 0:
      hits.append((path, i))
      start = i + 1
  if (len(hits) != 1 and mutant.nth is None) or (mutant.nth is not None
                                                 and mutant.nth >= len(hits)):
    return None
  path, i = hits[mutant.nth or 0]
  with open(path, encoding="utf-8") as f:
    text = f.read()
  with open(path, "w", encoding="utf-8") as f:
    f.write(text[:i] + mutant.new + text[i + len(mutant.old):])
  return path


def _copy_tree(src: str, dst: str) -> None:
  for name in ("deepexit_jax", "tests"):
    shutil.copytree(os.path.join(src, name), os.path.join(dst, name),
                    ignore=shutil.ignore_patterns("__pycache__"))
  for name in os.listdir(src):
    if name.endswith((".cfg", ".toml")):
      shutil.copy(os.path.join(src, name), dst)


def _pytest(root: str, args: tuple[str, ...], timeout: float) -> tuple[int, float]:
  env = dict(os.environ, PYTHONPATH=root, PYTHONDONTWRITEBYTECODE="1")
  cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *args]
  start = time.monotonic()
  try:
    rc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, timeout=timeout).returncode
  except subprocess.TimeoutExpired:
    rc = -1
  return rc, time.monotonic() - start


def _run_one(src: str, mutant: Mutant, timeout: float) -> dict:
  with tempfile.TemporaryDirectory(prefix="mutant_") as tmp:
    _copy_tree(src, tmp)
    if _plant(tmp, mutant) is None:
      return dict(mutant=mutant.name, module=mutant.module, status="stale")
    rc, seconds = _pytest(tmp, mutant.tests, timeout)
  # 1: tests failed; 2-4: errors (e.g. an import error); -1: timed out; 5: no tests ran.
  status = "survived" if rc == 0 else "no tests" if rc == 5 else "killed"
  if mutant.equivalent:
    status = f"equivalent ({status})"
  return dict(mutant=mutant.name, module=mutant.module, status=status, rc=rc,
              seconds=round(seconds, 1), tests=" ".join(mutant.tests))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--root", default=ROOT, help="repository to copy (default: this one)")
  parser.add_argument("--modules", default="", help="comma-separated modules (default: all)")
  parser.add_argument("--jobs", type=int, default=1, help="mutants run in parallel")
  parser.add_argument("--timeout", type=float, default=900, help="seconds per mutant")
  parser.add_argument("--no-baseline", action="store_true",
                      help="skip checking that each test selection passes unmutated")
  parser.add_argument("--list", action="store_true", help="list the mutants and exit")
  args = parser.parse_args()
  wanted = set(filter(None, args.modules.split(",")))
  mutants = [m for m in MUTANTS if not wanted or m.module in wanted]
  if args.list:
    with tempfile.TemporaryDirectory(prefix="mutant_list_") as tmp:
      _copy_tree(args.root, tmp)
      for m in mutants:
        stale = _plant(tmp, m) is None
        shutil.rmtree(os.path.join(tmp, "deepexit_jax"))
        shutil.copytree(os.path.join(args.root, "deepexit_jax"), os.path.join(tmp, "deepexit_jax"))
        print(f"{'STALE ' if stale else ''}{m.name}  [{' '.join(m.tests)}]")
    return
  if not args.no_baseline:
    with tempfile.TemporaryDirectory(prefix="mutant_base_") as tmp:
      _copy_tree(args.root, tmp)
      for tests in sorted({m.tests for m in mutants}):
        rc, seconds = _pytest(tmp, tests, args.timeout)
        print(f"baseline rc={rc} {seconds:.0f}s: {' '.join(tests)}", flush=True)
        if rc != 0:
          sys.exit(f"the unmutated code fails {' '.join(tests)}: fix that first")
  results = []
  with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
    futures = [pool.submit(_run_one, args.root, m, args.timeout) for m in mutants]
    for future in concurrent.futures.as_completed(futures):
      r = future.result()
      results.append(r)
      print(f"{r['status']:9s} {r.get('seconds', 0):6.1f}s  {r['mutant']}", flush=True)
  summary = {}
  for module in dict.fromkeys(m.module for m in mutants):
    rs = [r for r in results if r["module"] == module and r["status"] != "stale"
          and not r["status"].startswith("equivalent")]
    summary[module] = dict(
        killed=sum(r["status"] == "killed" for r in rs), total=len(rs),
        survived=[r["mutant"] for r in rs if r["status"] != "killed"],
        equivalent=[r["mutant"] for r in results if r["module"] == module
                    and r["status"].startswith("equivalent")],
        stale=[r["mutant"] for r in results if r["module"] == module and r["status"] == "stale"])
  for module, s in summary.items():
    print(f"{module}: {s['killed']}/{s['total']} non-equivalent mutants killed"
          + (f"; survived: {s['survived']}" if s["survived"] else "")
          + (f"; equivalent, not counted: {len(s['equivalent'])}" if s["equivalent"] else "")
          + (f"; stale: {s['stale']}" if s["stale"] else ""))
  print(json.dumps(summary))


if __name__ == "__main__":
  main()
