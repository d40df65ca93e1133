"""Calibrated exit thresholds: Learn-then-Test (CALM) picks a threshold with a risk guarantee.

Shapes (suffixes on locals): S candidate thresholds, W evaluation windows (sequences),
M calibration examples, B batch, T time, V vocabulary.

The guarantee (Angelopoulos et al. 2021, "Learn then Test"; CALM, Schuster et al. 2022).
Every calibration example (a token, or a window of text) has a loss L in [0, 1] under
each candidate threshold; R(lambda) is its expected value on new text of the same kind.
With probability at least 1 - epsilon over the draw of the calibration text, the chosen
threshold has R <= delta. Examples must be exchangeable with the text the threshold is
used on: windows of one text are closer to that than the tokens inside a window, which
are strongly dependent, so the sweep binary calibrates per window by default.

Losses ("consistency", CALM's names), per token, against full depth (the same call with
threshold inf, i.e. the same settings with no exit):
  textual  1 if the early-exit top-1 differs from the full-depth top-1, else 0.
  risk     min(1, max(0, nll_early - nll_full) / risk_scale): the increase of the
           per-token NLL, in units of `risk_scale` nats (default ln V, the NLL of a
           uniform guess), clipped to [0, 1] as the p-values need.
A window's loss is the mean of its tokens' losses (unit "sequence"); unit "token" uses
every token as an example.

Procedure. Candidates are ordered safest first: the LARGEST threshold exits least, for
every measure (for entropy, whose thresholds are negative, -0.1 is safer than -2; the
position-decayed thresholds of both decay forms grow with lambda too). For each candidate
j the null hypothesis H_j: R(lambda_j) > delta gets a p-value from the empirical risk
R_hat over n examples:
  hoeffding_bentkus (default, as CALM)
      p = min(exp(-n h(min(R_hat, delta), delta)), e P[Binomial(n, delta) <= ceil(n R_hat)])
      with h(a, b) = a ln(a / b) + (1 - a) ln((1 - a) / (1 - b))
  hoeffding
      p = exp(-2 n (delta - R_hat)^2) if R_hat < delta, else 1
Fixed-sequence testing rejects H_1, H_2, ... while p_j <= epsilon and stops at the first
p_j > epsilon; the chosen threshold is the last rejected (smallest, most exiting) one.
If none is rejected the answer is never to exit (threshold inf). No multiplicity
correction is needed, and risk need not be monotone in the threshold.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from deepexit_jax import checkpoint, data, exits, sweep
from deepexit_jax.errors import UserError
from deepexit_jax.model import DeepSupervisionTransformer

BOUNDS = ("hoeffding_bentkus", "hoeffding")
CONSISTENCIES = ("textual", "risk")
UNITS = ("sequence", "token")
# The uncalibrated recommendation's rule (`sweep.recommend`): lowest FLOPs within +0.5% PPL.
PPL_TOLERANCE = 0.005

PValueFn = Callable[[np.ndarray, int, float], np.ndarray]


# ----------------------------------------------------------------------------------------
# p-values: vectorised over candidates, float64 on the host.


def hoeffding_pvalue(risk: Any, n: int, delta: float) -> np.ndarray:
  """Hoeffding p-value of H: R > delta: exp(-2 n (delta - R_hat)^2) below delta, else 1."""
  r = np.asarray(risk, np.float64)
  return np.where(r < delta, np.exp(-2.0 * n * np.square(delta - r)), 1.0)


def _kl_bernoulli(a: np.ndarray, b: float) -> np.ndarray:
  """h(a, b) = a ln(a/b) + (1-a) ln((1-a)/(1-b)), with 0 ln 0 = 0."""
  with np.errstate(divide="ignore", invalid="ignore"):
    left = np.where(a > 0, a * np.log(a / b), 0.0)
    right = np.where(a < 1, (1 - a) * np.log((1 - a) / (1 - b)), 0.0)
  return left + right


def hoeffding_bentkus_pvalue(risk: Any, n: int, delta: float) -> np.ndarray:
  """Hoeffding-Bentkus p-value of H: R > delta (module docstring), in [0, 1].

  Args:
    risk: empirical risk(s) R_hat in [0, 1], any shape.
    n: number of examples the risk averages.
    delta: the tolerated risk.
  """
  r = np.asarray(risk, np.float64)
  hoeffding = np.exp(-n * _kl_bernoulli(np.minimum(r, delta), delta))
  # n R_hat is an integer for 0/1 losses; rounding first keeps float noise from adding one.
  k = np.ceil(np.round(n * r, 9))
  bentkus = math.e * stats.binom.cdf(k, n, delta)
  return np.minimum(np.minimum(hoeffding, bentkus), 1.0)


_PVALUES: dict[str, PValueFn] = {"hoeffding_bentkus": hoeffding_bentkus_pvalue,
                                 "hoeffding": hoeffding_pvalue}


# ----------------------------------------------------------------------------------------
# The result and the procedure.


@flax.struct.dataclass
class Calibration:
  """A threshold chosen by Learn-then-Test; pass it as `threshold` to `predict_with_exit`.

  Attributes:
    threshold: the chosen threshold (the smallest rejected candidate); inf = never exit
      (no candidate was rejected).
    p_value: its p-value (NaN for inf).
    risk: its empirical risk on the calibration examples (0 for inf).
    candidates: [S] candidate thresholds, safest (largest) first.
    p_values: [S] p-value of each candidate's null R > delta (all computed, even
      after the sequence stopped).
    risks: [S] empirical risk of each candidate.
    rejected: [S] bool, True where the null was rejected (certified R <= delta):
      a prefix of `candidates`.
    delta: the tolerated risk.
    epsilon: the error level: P(R(threshold) <= delta) >= 1 - epsilon.
    bound: name of the p-value ("hoeffding_bentkus", "hoeffding" or a function's name).
    num_examples: n, the calibration examples (tokens or windows).
    consistency: "textual" or "risk" (None when losses were given directly).
    unit: "sequence" or "token" (None when losses were given directly).
    settings: the exit settings calibrated under (`exits.exit_settings` items), empty
      when losses were given directly; `predict_with_exit` refuses other settings.
  """

  threshold: Any
  p_value: Any
  risk: Any
  candidates: Any
  p_values: Any
  risks: Any
  rejected: Any
  delta: float = flax.struct.field(pytree_node=False)
  epsilon: float = flax.struct.field(pytree_node=False)
  bound: str = flax.struct.field(pytree_node=False)
  num_examples: int = flax.struct.field(pytree_node=False)
  consistency: str | None = flax.struct.field(pytree_node=False, default=None)
  unit: str | None = flax.struct.field(pytree_node=False, default=None)
  settings: tuple[tuple[str, Any], ...] = flax.struct.field(pytree_node=False, default=())

  @property
  def measure(self) -> str | None:
    """The confidence measure calibrated, if recorded."""
    return dict(self.settings).get("measure")

  def to_json(self) -> dict[str, Any]:
    """A JSON-ready dict (inf as "inf", NaN as None)."""
    def num(x):
      x = float(x)
      return "inf" if math.isinf(x) else None if math.isnan(x) else x

    return {
        "threshold": num(self.threshold), "p_value": num(self.p_value),
        "calibration_risk": num(self.risk), "delta": self.delta, "epsilon": self.epsilon,
        "bound": self.bound, "num_examples": self.num_examples,
        "consistency": self.consistency, "unit": self.unit,
        "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in self.settings},
        "candidates": [
            {"threshold": num(t), "p_value": num(p), "risk": num(r), "rejected": bool(j)}
            for t, p, r, j in zip(self.candidates, self.p_values, self.risks, self.rejected)],
    }


def _check_level(name: str, value: Any, example: str) -> float:
  try:
    x = float(value)
  except (TypeError, ValueError):
    x = math.nan
  if not 0.0 < x < 1.0:
    raise UserError(f"{name}={value!r} must be a number strictly between 0 and 1, e.g. "
                    f"{name}={example}")
  return x


def check_levels(delta: Any, epsilon: Any) -> tuple[float, float]:
  """Validates delta and epsilon (each strictly between 0 and 1); one-line `UserError`s."""
  return _check_level("delta", delta, "0.05"), _check_level("epsilon", epsilon, "0.1")


def _pvalue_fn(bound: str | PValueFn) -> tuple[PValueFn, str]:
  if callable(bound):
    return bound, getattr(bound, "__name__", "custom")
  if bound not in _PVALUES:
    raise UserError(f"unknown bound={bound!r}: choose one of {', '.join(BOUNDS)}")
  return _PVALUES[bound], bound


def _check_candidates(thresholds: Any) -> np.ndarray:
  try:
    thr_S = np.asarray(thresholds, np.float64).reshape(-1)
  except (TypeError, ValueError):
    raise UserError(f"thresholds must be numbers, got {thresholds!r}") from None
  if thr_S.size == 0:
    raise UserError("no candidate thresholds: pass at least one, e.g. np.linspace(0, 1, 21)")
  if np.isnan(thr_S).any():
    raise UserError("a candidate threshold is NaN: pass numbers (inf means never exit)")
  if np.unique(thr_S).size != thr_S.size:
    raise UserError("candidate thresholds repeat a value: pass each threshold once")
  return thr_S


def learn_then_test(risks: Any, num_examples: int, thresholds: Any, *, delta: float,
                    epsilon: float, bound: str | PValueFn = "hoeffding_bentkus",
                    **record: Any) -> Calibration:
  """Fixed-sequence testing of H_j: R(lambda_j) > delta from empirical risks.

  Args:
    risks: [S] empirical risk (mean loss in [0, 1]) of each candidate.
    num_examples: n, the examples each risk averages.
    thresholds: [S] candidate thresholds, any order (tested largest first).
    delta: tolerated risk, in (0, 1).
    epsilon: error level, in (0, 1).
    bound: "hoeffding_bentkus", "hoeffding", or a function (risks [S], n, delta) -> [S]
      p-values (for experiments: e.g. the raw mean, to see the guarantee fail).
    **record: `consistency`, `unit`, `settings` stored in the result.

  Returns:
    A `Calibration`.
  """
  delta, epsilon = check_levels(delta, epsilon)
  pvalue, bound_name = _pvalue_fn(bound)
  thr_S = _check_candidates(thresholds)
  risk_S = np.asarray(risks, np.float64).reshape(-1)
  if risk_S.shape != thr_S.shape:
    raise UserError(f"{risk_S.size} risks for {thr_S.size} thresholds: pass one per threshold")
  if not (np.all(risk_S >= 0) and np.all(risk_S <= 1)):
    raise UserError("risks must lie in [0, 1] (mean losses in [0, 1]): normalise the losses")
  if int(num_examples) < 1:
    raise UserError(f"num_examples={num_examples!r}: calibration needs at least one example")
  order = np.argsort(-thr_S, kind="stable")  # Safest (largest threshold) first.
  thr_S, risk_S = thr_S[order], risk_S[order]
  p_S = np.asarray(pvalue(risk_S, int(num_examples), delta), np.float64)
  # Rejected: the prefix of candidates before the first p-value above epsilon.
  rejected_S = np.cumprod(p_S <= epsilon).astype(bool)
  k = int(rejected_S.sum()) - 1
  chosen = (thr_S[k], p_S[k], risk_S[k]) if k >= 0 else (math.inf, math.nan, 0.0)
  return Calibration(
      threshold=float(chosen[0]), p_value=float(chosen[1]), risk=float(chosen[2]),
      candidates=thr_S, p_values=p_S, risks=risk_S, rejected=rejected_S, delta=delta,
      epsilon=epsilon, bound=bound_name, num_examples=int(num_examples), **record)


# ----------------------------------------------------------------------------------------
# Per-window exit results of every candidate, from the exits engine in one pass.


@dataclasses.dataclass
class ExitLosses:
  """Per-window sums of each candidate's early-exit results over a text (host arrays).

  Everything the calibration, the test-part report and the coverage resampling need,
  computed once: resampling windows is then host arithmetic.

  Attributes:
    thresholds: [S] thresholds, in the order given.
    tokens: [W] valid (unpadded) target tokens of each window.
    textual: [S, W] tokens whose top-1 differs from full depth.
    risk: [S, W] sum of the clipped, normalised NLL increases (module docstring).
    nll: [S, W] sum of the NLL under early exit.
    full_nll: [W] sum of the full-depth NLL.
    layers: [S, W] sum of the 1-based exit layers.
    flops: [S, W] sum of FLOPs under early exit (exit checks included).
    full_flops: [W] sum of full-depth FLOPs.
    risk_scale: nats that map to loss 1 in the `risk` consistency.
    num_layers: N.
    settings: `exits.exit_settings` of the collection.
  """

  thresholds: np.ndarray
  tokens: np.ndarray
  textual: np.ndarray
  risk: np.ndarray
  nll: np.ndarray
  full_nll: np.ndarray
  layers: np.ndarray
  flops: np.ndarray
  full_flops: np.ndarray
  risk_scale: float
  num_layers: int
  settings: dict[str, Any]

  @property
  def num_windows(self) -> int:
    return int(self.tokens.shape[0])

  def losses(self, consistency: str, unit: str, windows: Any = None) -> tuple[np.ndarray, int]:
    """Empirical risk [S] and example count n over `windows` (default all).

    Unit "token": total loss / tokens; "sequence": the mean of window means.
    """
    exits.check_choice("consistency", consistency, CONSISTENCIES)
    exits.check_choice("unit", unit, UNITS)
    w = np.arange(self.num_windows) if windows is None else np.asarray(windows)
    sums_SW = (self.textual if consistency == "textual" else self.risk)[:, w]
    tokens_W = self.tokens[w]
    if unit == "token":
      return sums_SW.sum(1) / tokens_W.sum(), int(tokens_W.sum())
    return (sums_SW / tokens_W).mean(1), int(w.size)

  def metrics(self, index: int | None, windows: Any = None) -> dict[str, float]:
    """PPL, FLOPs and layers fractions of threshold `index` (None = full depth)."""
    w = np.arange(self.num_windows) if windows is None else np.asarray(windows)
    count = float(self.tokens[w].sum())
    full_ppl = math.exp(self.full_nll[w].sum() / count)
    if index is None:
      return {"ppl": full_ppl, "full_ppl": full_ppl, "ppl_change": 0.0,
              "flops_fraction": 1.0, "layers_fraction": 1.0}
    ppl = math.exp(self.nll[index, w].sum() / count)
    return {"ppl": ppl, "full_ppl": full_ppl, "ppl_change": ppl / full_ppl - 1.0,
            "flops_fraction": float(self.flops[index, w].sum() / self.full_flops[w].sum()),
            "layers_fraction": float(self.layers[index, w].sum() / count / self.num_layers)}


@jax.jit
def _window_sums(logits_SBTV, nll_SBT, layer_SBT, flops_fraction_SBT, full_logits_BTV,
                 full_nll_BT, mask_BT, full_flops_T, risk_scale):
  """One batch's per-row sums [S, B] (and full-depth [B]) of `ExitLosses`."""
  full_top1_BT = jnp.argmax(full_logits_BTV, -1)
  differs_SBT = jnp.argmax(logits_SBTV, -1) != full_top1_BT
  increase_SBT = jnp.clip((nll_SBT - full_nll_BT) / risk_scale, 0.0, 1.0)
  return {
      "textual": jnp.sum(differs_SBT * mask_BT, -1),
      "risk": jnp.sum(increase_SBT * mask_BT, -1),
      "nll": jnp.sum(nll_SBT * mask_BT, -1),
      "layers": jnp.sum(layer_SBT * mask_BT, -1),
      "flops": jnp.sum(flops_fraction_SBT * full_flops_T * mask_BT, -1),
      "full_nll": jnp.sum(full_nll_BT * mask_BT, -1),
  }


def collect_exit_losses(model: DeepSupervisionTransformer, batches: data.EvalBatches,
                        thresholds: Any, *, exit_layers: Sequence[int],
                        measure: str = "softmax", kv_policy: str = "oracle",
                        routing: str = "token", seq_quantile: float = 1.0,
                        threshold_decay: float = 0.0,
                        threshold_decay_form: str = "exponential", probe: Any = None,
                        risk_scale: float | None = None,
                        max_logits: int = 1 << 25) -> ExitLosses:
  """Runs `predict_with_exit` on every window for all thresholds at once; sums per window.

  Thresholds go to the engine as one vector (in chunks of constant size, so it compiles
  once, when S x B x T x V logits would exceed `max_logits` floats); the full-depth
  reference is the same call with threshold inf.

  Args:
    model: the early-exit model.
    batches: the text (`data.eval_batches`); padding is masked out.
    thresholds: [S] candidate thresholds.
    exit_layers, measure, kv_policy, routing, seq_quantile, threshold_decay,
      threshold_decay_form, probe: as for `predict_with_exit`.
    risk_scale: nats mapped to loss 1 by the `risk` consistency (default ln V).
    max_logits: bound on the floats of one call's returned logits.

  Returns:
    An `ExitLosses` over the windows holding at least one target.
  """
  thr_S = _check_candidates(thresholds)  # float64 as given; the engine gets float32.
  config = model.config
  scale = math.log(config.vocab_size) if risk_scale is None else float(risk_scale)
  if not (math.isfinite(scale) and scale > 0):
    raise UserError(f"risk_scale={risk_scale!r} must be a finite number of nats > 0")
  settings = exits.exit_settings(
      config.num_layers, exit_layers=exit_layers, measure=measure, kv_policy=kv_policy,
      routing=routing, seq_quantile=seq_quantile, threshold_decay=threshold_decay,
      threshold_decay_form=threshold_decay_form)
  kwargs = dict(exit_layers=exit_layers, measure=measure, kv_policy=kv_policy,
                routing=routing, seq_quantile=seq_quantile, threshold_decay=threshold_decay,
                threshold_decay_form=threshold_decay_form, probe=probe)
  _, b, t = batches.inputs.shape
  s = thr_S.size
  chunk = max(1, min(s, max_logits // (b * t * config.vocab_size)))
  padded_S = np.concatenate([thr_S, np.full(-s % chunk, np.inf)]).astype(np.float32)
  counter = exits.FlopCounter.from_config(config)
  full_T = np.asarray(counter.full_depth(np.arange(t, dtype=np.float64)))
  keys = ("textual", "risk", "nll", "layers", "flops")
  rows = {k: [] for k in keys + ("full_nll", "full_flops", "tokens")}
  for i in range(batches.num_batches):
    inputs, targets = batches.inputs[i], batches.targets[i]
    mask_BT = jnp.asarray(batches.mask[i])
    full = exits.predict_with_exit(model, inputs, jnp.inf, targets=targets, **kwargs)
    parts = []
    for c in range(0, padded_S.size, chunk):
      res = exits.predict_with_exit(model, inputs, padded_S[c:c + chunk], targets=targets,
                                    **kwargs)
      parts.append(jax.device_get(_window_sums(
          res.logits, res.nll, res.exit_layer.astype(jnp.float32), res.flops_fraction,
          full.logits, full.nll, mask_BT, full_T.astype(np.float32), scale)))
    for k in keys:
      rows[k].append(np.concatenate([p[k] for p in parts])[:s])
    mask = np.asarray(batches.mask[i], np.float64)
    rows["full_nll"].append(parts[0]["full_nll"])
    rows["full_flops"].append(mask @ full_T)
    rows["tokens"].append(mask.sum(-1))
  out = {k: np.concatenate(v, axis=-1).astype(np.float64) for k, v in rows.items()}
  keep_W = out["tokens"] > 0  # Fully padded rows of the last batch are no windows.
  return ExitLosses(
      thresholds=thr_S, tokens=out["tokens"][keep_W],
      **{k: out[k][:, keep_W] for k in keys},
      full_nll=out["full_nll"][keep_W], full_flops=out["full_flops"][keep_W],
      risk_scale=scale, num_layers=config.num_layers, settings=settings)


def calibrate_threshold(results: ExitLosses | Any, thresholds: Any = None, *,
                        delta: float, epsilon: float, consistency: str = "textual",
                        unit: str = "sequence", bound: str | PValueFn = "hoeffding_bentkus",
                        windows: Any = None, candidates: Any = None) -> Calibration:
  """Chooses the most exiting threshold whose risk is certified <= delta (Learn-then-Test).

  With probability at least 1 - epsilon over the calibration text, the chosen
  threshold's expected loss on new text of the same kind is at most delta (module
  docstring: losses, p-values, fixed-sequence testing, safest-first order).

  Args:
    results: an `ExitLosses` (`collect_exit_losses`: any measure, routing, exit layers
      or threshold decay), or losses [S, M] in [0, 1]: M examples' losses under each
      of the S `thresholds` (tokens or sequences; computed however you like).
    thresholds: [S] thresholds of raw losses (taken from an `ExitLosses`).
    delta: tolerated risk in (0, 1): for "textual" the expected share of tokens whose
      top-1 differs from full depth; for "risk" the expected NLL increase in units of
      `results.risk_scale` nats.
    epsilon: error level in (0, 1).
    consistency: "textual" or "risk" (an `ExitLosses` holds both).
    unit: "sequence" (each window an example, the default) or "token".
    bound: "hoeffding_bentkus" (as CALM), "hoeffding", or a p-value function.
    windows: indices of the windows to calibrate on (default all).
    candidates: the subset of `results.thresholds` to test (default all).

  Returns:
    A `Calibration`; pass it as `threshold` to `predict_with_exit` or `generate`.
  """
  delta, epsilon = check_levels(delta, epsilon)
  if isinstance(results, ExitLosses):
    risk_S, n = results.losses(consistency, unit, windows)
    thr_S = results.thresholds
    if candidates is not None:
      rows = _candidate_rows(results, candidates)
      risk_S, thr_S = risk_S[rows], thr_S[rows]
    return learn_then_test(risk_S, n, thr_S, delta=delta, epsilon=epsilon, bound=bound,
                           consistency=consistency, unit=unit,
                           settings=tuple(results.settings.items()))
  if thresholds is None:
    raise UserError("raw losses need thresholds=[S], one per row of losses")
  try:
    losses_SM = np.asarray(results, np.float64)
  except (TypeError, ValueError):
    raise UserError("results must be an ExitLosses or an [S, M] array of losses") from None
  if losses_SM.ndim != 2 or losses_SM.shape[1] < 1:
    raise UserError(f"losses must be [S thresholds, M examples], got shape {losses_SM.shape}")
  if np.isnan(losses_SM).any() or losses_SM.min() < 0 or losses_SM.max() > 1:
    raise UserError("losses must lie in [0, 1]: clip or normalise them first")
  return learn_then_test(losses_SM.mean(1), losses_SM.shape[1], thresholds, delta=delta,
                         epsilon=epsilon, bound=bound)


def _candidate_rows(results: ExitLosses, candidates: Any) -> np.ndarray:
  want = _check_candidates(candidates)
  rows = [np.flatnonzero(np.isclose(results.thresholds, c, rtol=0, atol=1e-7)) for c in want]
  missing = [c for c, r in zip(want, rows) if r.size == 0]
  if missing:
    raise UserError(f"candidates {missing} were not collected: include them in the "
                    "thresholds of collect_exit_losses")
  return np.asarray([r[0] for r in rows])


# ----------------------------------------------------------------------------------------
# Calibration/test splits of one text and the coverage check.


def split_windows(num_windows: int, fraction: float, seed: int, split: int = 0
                  ) -> tuple[np.ndarray, np.ndarray]:
  """Split `split` of the windows: a seeded permutation, the first share calibrates.

  Split k permutes the windows with `np.random.default_rng([seed, k])`; the first
  round(fraction W) windows (at least 1, at most W - 1) are the calibration part, the
  rest the test part. Whole windows, so no window's tokens are on both sides.
  """
  if num_windows < 2:
    raise UserError(f"the text has {num_windows} window(s): a calibration/test split needs "
                    "at least 2; use a longer validation text")
  perm = np.random.default_rng([seed, split]).permutation(num_windows)
  m = min(max(round(fraction * num_windows), 1), num_windows - 1)
  return np.sort(perm[:m]), np.sort(perm[m:])


def _index(results: ExitLosses, threshold: float) -> int | None:
  if math.isinf(threshold):
    return None
  return int(np.flatnonzero(np.isclose(results.thresholds, threshold, rtol=0, atol=1e-7))[0])


def risk_at(results: ExitLosses, threshold: float, consistency: str, unit: str,
              windows: Any) -> float:
  """The empirical risk of `threshold` on `windows` (0 for inf: never exiting)."""
  i = _index(results, threshold)
  return 0.0 if i is None else float(results.losses(consistency, unit, windows)[0][i])


def uncalibrated_choice(results: ExitLosses, candidates: Any = None,
                        tolerance: float = PPL_TOLERANCE, windows: Any = None) -> float:
  """The sweep's "best quality at lowest compute": lowest FLOPs within +tolerance PPL.

  Fitted to `windows` (default: the whole text, as the sweep reports it); inf if no
  candidate qualifies.
  """
  rows = (np.arange(results.thresholds.size) if candidates is None
          else _candidate_rows(results, candidates))
  best, best_flops = math.inf, math.inf
  for i in rows:
    m = results.metrics(int(i), windows)
    if math.isfinite(results.thresholds[i]) and m["ppl_change"] <= tolerance and (
        m["flops_fraction"] < best_flops):
      best, best_flops = float(results.thresholds[i]), m["flops_fraction"]
  return best


def coverage(results: ExitLosses, *, delta: float, epsilon: float, consistency: str,
             unit: str, bound: str | PValueFn = "hoeffding_bentkus", fraction: float = 0.5,
             seed: int = 0, splits: int = 100, candidates: Any = None,
             fixed_threshold: float | None = None) -> dict[str, Any]:
  """Calibrates on `splits` random splits of one text and scores each on its test part.

  Split k is `split_windows(W, fraction, seed, k)`. Returns the share of splits whose
  test risk is <= delta (`coverage`, LTT promises >= 1 - epsilon for the expected risk;
  the test part's empirical risk also carries its own sampling noise), and the means of
  the chosen threshold's test risk and FLOPs fraction. With `fixed_threshold` every
  split uses that threshold instead of calibrating (e.g. the uncalibrated choice).
  """
  risks, flops, chosen = [], [], []
  for k in range(int(splits)):
    cal, test = split_windows(results.num_windows, fraction, seed, k)
    if fixed_threshold is None:
      thr = calibrate_threshold(results, delta=delta, epsilon=epsilon,
                                consistency=consistency, unit=unit, bound=bound,
                                windows=cal, candidates=candidates).threshold
    else:
      thr = fixed_threshold
    risks.append(risk_at(results, thr, consistency, unit, test))
    flops.append(results.metrics(_index(results, thr), test)["flops_fraction"])
    chosen.append(thr)
  risks_K = np.asarray(risks)
  return {"coverage": float(np.mean(risks_K <= delta)), "splits": int(splits),
          "seed": int(seed), "fraction": float(fraction),
          "mean_test_risk": float(risks_K.mean()), "max_test_risk": float(risks_K.max()),
          "mean_flops_fraction": float(np.mean(flops)),
          "never_exit_splits": int(np.sum(np.isinf(chosen)))}


# ----------------------------------------------------------------------------------------
# The sweep binary's calibration: one checkpoint, one text, calibrate/test split.


@dataclasses.dataclass
class CalibrationReport:
  """`deepexit-sweep --calibrate`: calibration on one part of the text, report on the rest.

  Attributes:
    calibration: the `Calibration` from the calibration part (split 0).
    fields: the flat record written to calibration.json (module `run_calibration`).
  """

  calibration: Calibration
  fields: dict[str, Any]

  def to_json(self) -> dict[str, Any]:
    return {**self.fields, "calibration": self.calibration.to_json()}


def _num(x: float) -> Any:
  return "inf" if math.isinf(x) else x


def calibration_record(results: ExitLosses, *, delta: float, epsilon: float,
                       consistency: str = "textual", unit: str = "sequence",
                       bound: str = "hoeffding_bentkus", fraction: float = 0.5,
                       seed: int = 0, splits: int = 100, candidates: Any = None
                       ) -> CalibrationReport:
  """Split 0 calibrates and is reported; `splits` splits give the coverage (host only).

  Beside it: the uncalibrated choice (lowest FLOPs within +0.5% PPL, fitted to the
  whole text as the sweep's recommendation is) on the same test part and splits, and
  the raw empirical-risk rule (lowest threshold whose calibration risk is <= delta, no
  bound) over the same splits, which shows what the p-value buys.
  """
  delta, epsilon = check_levels(delta, epsilon)
  if not 0.0 < fraction < 1.0:
    raise UserError(f"calibration_fraction={fraction!r} must be strictly between 0 and 1, "
                    "e.g. 0.5")
  if int(splits) < 1:
    raise UserError(f"coverage_splits={splits!r} must be >= 1, e.g. 100")
  cal, test = split_windows(results.num_windows, fraction, seed)
  common = dict(delta=delta, epsilon=epsilon, consistency=consistency, unit=unit)
  calib = calibrate_threshold(results, bound=bound, windows=cal, candidates=candidates,
                              **common)
  thr = float(calib.threshold)
  test_metrics = results.metrics(_index(results, thr), test)
  cover = coverage(results, bound=bound, fraction=fraction, seed=seed, splits=splits,
                   candidates=candidates, **common)
  raw = coverage(results, bound=empirical_pvalue, fraction=fraction, seed=seed,
                 splits=splits, candidates=candidates, **common)
  fitted = uncalibrated_choice(results, candidates)
  fitted_cover = coverage(results, fraction=fraction, seed=seed, splits=splits,
                          fixed_threshold=fitted, **common)
  fitted_metrics = results.metrics(_index(results, fitted), test)
  fields = {
      "threshold": _num(thr), "delta": delta, "epsilon": epsilon,
      "consistency": consistency, "unit": unit, "bound": calib.bound,
      "p_value": None if math.isnan(calib.p_value) else float(calib.p_value),
      "calibration_risk": float(calib.risk),
      "calibration_windows": int(cal.size), "test_windows": int(test.size),
      "calibration_tokens": int(results.tokens[cal].sum()),
      "test_tokens": int(results.tokens[test].sum()),
      "test_risk": risk_at(results, thr, consistency, unit, test),
      **test_metrics,
      "coverage": cover["coverage"],
      "coverage_detail": {**cover, "how": (
          f"{splits} splits; split k permutes the {results.num_windows} windows with "
          f"numpy default_rng([{seed}, k]) and calibrates on the first "
          f"{cal.size}, tests on the other {test.size}; split 0 is the one reported")},
      "empirical_rule_coverage": raw,
      "uncalibrated": {
          "threshold": _num(fitted),
          "rule": f"lowest FLOPs within +{100 * PPL_TOLERANCE:.1f}% PPL, fitted to the whole "
                  "text (calibration and test parts)",
          "test_risk": risk_at(results, fitted, consistency, unit, test),
          **fitted_metrics, "coverage": fitted_cover["coverage"],
          "coverage_detail": fitted_cover},
      "risk_scale_nats": results.risk_scale,
      "settings": {k: list(v) if isinstance(v, tuple) else v
                   for k, v in results.settings.items()},
  }
  return CalibrationReport(calibration=calib, fields=fields)


def empirical_pvalue(risk: Any, n: int, delta: float) -> np.ndarray:
  """Not a p-value: 0 where the raw mean risk is <= delta, else 1 (no guarantee)."""
  del n
  return np.where(np.asarray(risk) <= delta, 0.0, 1.0)


def run_calibration(checkpoint_dir: str, thresholds: Any, *, delta: float, epsilon: float,
                    consistency: str = "textual", unit: str = "sequence",
                    bound: str = "hoeffding_bentkus", fraction: float = 0.5, seed: int = 0,
                    splits: int = 100, exit_layers: Sequence[int] | None = None,
                    measure: str = "softmax", kv_policy: str = "copy", probe: Any = None,
                    routing: str = "token", seq_quantile: float = 1.0,
                    threshold_decay: float = 0.0, threshold_decay_form: str = "exponential",
                    data_dir: str | None = None, risk_scale: float | None = None,
                    text_file: str | None = None, seq_len: int | None = None,
                    batch_size: int | None = None) -> CalibrationReport:
  """Loads a checkpoint, collects `ExitLosses` on its evaluation text (the sweep's:
  `sweep.load_run`), calibrates a split.

  Args:
    checkpoint_dir: a `deepexit-train` workdir, or a Hugging Face directory (with
      `text_file`).
    thresholds: [S] candidate thresholds.
    delta, epsilon, consistency, unit, bound: as for `calibrate_threshold`.
    fraction: share of the windows that calibrate; the rest test.
    seed: seed of the splits (`split_windows`).
    splits: number of random splits for the coverage.
    exit_layers: None: `checkpoint.Checkpoint.exit_layers` (the run's configured ones;
      every layer for a model without a training run).
    measure, kv_policy, probe, routing, seq_quantile, threshold_decay,
      threshold_decay_form: as for `predict_with_exit`.
    data_dir: overrides the run's data.data_dir.
    risk_scale: nats mapped to loss 1 by the risk consistency (default ln V).
    text_file, seq_len, batch_size: the evaluation text (`data.evaluation_text`).

  Returns:
    A `CalibrationReport` (its `to_json()` is calibration.json).
  """
  delta, epsilon = check_levels(delta, epsilon)
  exits.check_choice("consistency", consistency, CONSISTENCIES)
  exits.check_choice("unit", unit, UNITS)
  _pvalue_fn(bound)
  run = sweep.load_run(checkpoint_dir, data_dir, text_file=text_file, seq_len=seq_len,
                       batch_size=batch_size)
  model = run.checkpoint.model
  layers = tuple(exit_layers or run.checkpoint.exit_layers)
  results = collect_exit_losses(
      model, run.batches, thresholds, exit_layers=layers, measure=measure,
      kv_policy=kv_policy, routing=routing, seq_quantile=seq_quantile,
      threshold_decay=threshold_decay, threshold_decay_form=threshold_decay_form,
      probe=probe, risk_scale=risk_scale)
  rep = calibration_record(results, delta=delta, epsilon=epsilon, consistency=consistency,
                           unit=unit, bound=bound, fraction=fraction, seed=seed,
                           splits=splits)
  rep.fields.update(checkpoint=checkpoint_dir, step=run.checkpoint.step,
                    params_sha256=checkpoint.params_digest(model), data=run.data_description)
  return rep
