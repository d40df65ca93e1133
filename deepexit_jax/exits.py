"""Early-exit inference: confidence measures, exit selection, KV policies and FLOP accounting.

Shapes (suffixes on locals): N layers, B batch, T time, D model width, F ffn width,
V vocabulary, E exit layers checked (those below N), L = E + 1 candidate layers (the
exit layers, then layer N), S thresholds.

Exit rule. Layers are numbered from 1. A token exits at the FIRST layer k in
`exit_layers` whose confidence is >= the threshold; a token confident nowhere runs to
layer N. Thresholds are traced arguments (a new value never recompiles) and may be a
vector [S], which adds a leading S axis to every result (one `jax.vmap`).

Confidence measures (larger = more confident) and their ranges:
  softmax  max_v p_v, in [1/V, 1]. Threshold 0 exits every token at the first exit
           layer; 1.0 exits only tokens whose max-prob is exactly 1.0 in float32
           (practically never); anything > 1, e.g. `jnp.inf` (the documented
           "never"), never exits.
  margin   p_top1 - p_top2, in [0, 1]; thresholds as for softmax.
  entropy  negative entropy sum_v p_v log p_v, in [-log V, 0]; thresholds are usually
           negative (-inf exits everywhere, anything > 0 never exits).
  state    cosine similarity of the layer's input and output hidden states (CALM's
           state saturation), in [-1, 1]; threshold 0 exits every token whose layer
           did not reverse its state, > 1 never exits.
  probe    a user `ConfidenceProbe`, range defined by the probe.
NaN thresholds are rejected, and so are negative ones for softmax, margin and state.

Position-dependent threshold (`threshold_decay` = tau >= 0, 0 = constant), in one of
two forms (`threshold_decay_form`, t 0-based position, T sequence length):
  exponential  (default, ours) lambda_t = lambda * f_t with f_t = exp(-tau t / T):
               a measure-agnostic relaxation that can reach 0.
  calm         CALM's released code (t5x contrib/calm): f_t = 0.9 + 0.1 exp(-tau t / T),
               at most a 10% relaxation (the paper uses tau = 4). The paper's formula,
               clip(0.9 lambda + 0.1 exp(-tau t / T), 0, 1), only fits [0, 1] measures
               and does not equal lambda at tau = 0; the code's form does.
Both use lambda * f_t for lambda >= 0 and lambda / f_t for lambda < 0 (entropy), so later
tokens always exit more easily, tau = 0 is exactly constant, inf stays inf, and lambda_t
grows with lambda (a larger threshold is stricter at every position).

A threshold may also be a `CalibratedThreshold` such as `calibration.Calibration`
(`calibrate_threshold`): its
`threshold` is used, after checking that the call's measure (and, in
`predict_with_exit`, every other setting the calibration recorded) matches.

Routing. `token`: each token decides alone. `sequence`: every token of a row exits at
the first exit layer where at least ceil(q T) of its T tokens are confident (q =
`seq_quantile` in (0, 1]); equivalently the lower (1 - q)-quantile order statistic of
the row's confidences (minus per-position thresholds) is >= 0. q = 1 means the minimum
confidence must clear the threshold. There is no padding mask: pad tokens vote in
sequence routing and count in every mean.

KV policies.
  oracle  Deeper layers see full-depth states of exited tokens: one full forward pass,
          then per-token selection (the parallel emulation the reference experiment
          measured). Equals EE-LLM / DEED style recomputation of the missing states,
          which saves latency, not FLOPs: the FLOPs counted below are only saved if the
          missing deeper states are never needed.
  copy    CALM state propagation: an exited token's hidden state is copied upward
          unchanged; deeper layers compute keys/values from the copy, so later tokens'
          outputs change. Exact, because a block's attention reads its input states.

FLOPs per token at 0-based position t (multiply-adds count 2; LayerNorm, embedding,
softmax, residual adds, rotary embeddings and GELU/SiLU are ignored); C = G K is the
width of the keys (= D unless grouped-query attention), m the MLP's matrices (2 for
GELU, 3 for SwiGLU):
  block(t)   = 2 D (D + 2C) (QKV) + 2 2 (t+1) D (scores + weighted sum) + 2 D D (output)
               + 2 m D F (MLP)                     = 8 D^2 + 4 (t+1) D + 4 D F  (C = D, m = 2)
  head       = 2 D V                               (final LayerNorm ignored)
  kv         = 2 D 2C = 4 D C                      (keys/values of a copied state)
  cosine     = 2 3D = 6 D                          (dot product and two squared norms)
  full(t)    = N block(t) + head                   (the denominator)
For a token exiting at layer k (k = N if it never exits) after c exit checks (c =
number of exit layers <= k, below N):
  blocks     = k block(t)                          (oracle)
             = k block(t) + (N - k) kv             (copy: later tokens attend to it)
  softmax/margin/entropy: + c head + [k = N] head  (every check needs the full head)
  state:                  + head + c cosine        (head only at the layer used)
  probe:                  + head + c probe.flops_per_token
`flops_fraction` = that / full(t), per token; `mean_flops_fraction` averages the
per-token fractions (not a ratio of sums). It can exceed 1 when checks cost more than
the skipped layers.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepexit_jax import xla_options
from deepexit_jax.errors import UserError
from deepexit_jax.model import DeepSupervisionTransformer, ModelConfig

Array = jax.Array

MEASURES = ("softmax", "margin", "entropy", "state", "probe")
KV_POLICIES = ("oracle", "copy")
ROUTINGS = ("token", "sequence")
DECAY_FORMS = ("exponential", "calm")
# Measures whose useful thresholds are >= 0; a negative one is a sign mix-up.
_NONNEGATIVE_MEASURES = ("softmax", "margin", "state")
# The measures computed from the exit head's logits (each check pays for the head).
LOGIT_MEASURES = ("softmax", "margin", "entropy")


@runtime_checkable
class CalibratedThreshold(Protocol):
  """A threshold with the exit settings it was calibrated under (`calibration.Calibration`).

  Attributes:
    threshold: the number (or inf) to use.
    settings: `exit_settings` items it is valid under; calls with others are refused.
  """

  threshold: Any
  settings: dict[str, Any]


@runtime_checkable
class ConfidenceProbe(Protocol):
  """A pluggable confidence measure, e.g. a learned saturation probe.

  Attributes:
    flops_per_token: FLOPs one evaluation costs per token, for the accounting.
  """

  flops_per_token: int

  def __call__(self, h_in_BTD: Array, h_out_BTD: Array, layer: Array) -> Array:
    """Confidence [B, T] (larger = more confident) of a layer.

    Args:
      h_in_BTD: the layer's input hidden states.
      h_out_BTD: the layer's output hidden states.
      layer: 1-based layer number (numbered like `exit_layers`), an int32 scalar
        that may be traced.
    """
    ...


@flax.struct.dataclass
class ExitResult:
  """Outcome of early-exit inference; a vector threshold adds a leading S axis to all.

  Attributes:
    logits: [B, T, V] float32 logits at each token's exit layer (None when
      `return_logits=False`).
    exit_layer: [B, T] int32 1-based layer each token exited at (N = full depth).
    confidence: [B, T] confidence at the exit layer, or at the last exit layer checked
      for tokens that ran to full depth (NaN if no exit layer lies below N).
    layers_fraction: [B, T] layers run / N.
    mean_layers_fraction: [] mean of `layers_fraction`.
    flops_fraction: [B, T] `flops` / full-depth FLOPs (module docstring).
    mean_flops_fraction: [] mean of `flops_fraction`.
    exit_fraction: [E] fraction of tokens exiting at each of `exit_layers`.
    threshold: [] the threshold used (before any position decay).
    nll: [B, T] negative log-likelihood of `targets` under `logits`, or None.
    flops: [B, T] float32 FLOPs of each token under the policy (`FlopCounter.token`),
      what `flops_fraction` divides; sums of it give ratios of sums (sweeps).
    exit_layers: the exit layers checked (static; layers below N, ascending).
  """

  logits: Array | None
  exit_layer: Array
  confidence: Array
  layers_fraction: Array
  mean_layers_fraction: Array
  flops_fraction: Array
  mean_flops_fraction: Array
  exit_fraction: Array
  threshold: Array
  nll: Array | None = None
  flops: Array | None = None
  exit_layers: tuple[int, ...] = flax.struct.field(pytree_node=False, default=())


# ----------------------------------------------------------------------------------------
# Confidence measures: pure functions, computed in float32.


def softmax_confidence(logits_BTV: Array) -> Array:
  """Maximum softmax probability, in [1/V, 1]."""
  logits_BTV = logits_BTV.astype(jnp.float32)
  return jnp.exp(jnp.max(logits_BTV, -1) - jax.nn.logsumexp(logits_BTV, -1))


def margin_confidence(logits_BTV: Array) -> Array:
  """Top-1 minus top-2 softmax probability, in [0, 1]."""
  logits_BTV = logits_BTV.astype(jnp.float32)
  top_BT2, _ = jax.lax.top_k(logits_BTV, 2)
  p_BT2 = jnp.exp(top_BT2 - jax.nn.logsumexp(logits_BTV, -1, keepdims=True))
  return p_BT2[..., 0] - p_BT2[..., 1]


def entropy_confidence(logits_BTV: Array) -> Array:
  """Negative entropy sum_v p_v log p_v, in [-log V, 0]."""
  logp_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), -1)
  return jnp.sum(jnp.exp(logp_BTV) * logp_BTV, -1)


def state_confidence(h_in_BTD: Array, h_out_BTD: Array) -> Array:
  """Cosine similarity of a layer's input and output states (CALM), in [-1, 1]."""
  a_BTD = h_in_BTD.astype(jnp.float32)
  b_BTD = h_out_BTD.astype(jnp.float32)
  norms_BT = jnp.sqrt(jnp.sum(a_BTD * a_BTD, -1) * jnp.sum(b_BTD * b_BTD, -1))
  return jnp.sum(a_BTD * b_BTD, -1) / jnp.maximum(norms_BT, 1e-30)


_LOGIT_MEASURE_FNS = {
    "softmax": softmax_confidence,
    "margin": margin_confidence,
    "entropy": entropy_confidence,
}


def logit_confidence(measure: str, logits_XV: Array) -> Array:
  """Confidence of one of `LOGIT_MEASURES` from logits (float32)."""
  return _LOGIT_MEASURE_FNS[measure](logits_XV)


def _confidence_from_logp(measure: str, logp_BTV: Array) -> Array:
  """The logit measures from log-probabilities, which need no second normalisation."""
  if measure == "softmax":
    return jnp.exp(jnp.max(logp_BTV, -1))
  if measure == "margin":
    p_BT2 = jnp.exp(jax.lax.top_k(logp_BTV, 2)[0])
    return p_BT2[..., 0] - p_BT2[..., 1]
  return jnp.sum(jnp.exp(logp_BTV) * logp_BTV, -1)


def _confidence(measure: str, probe: Any, logits_BTV: Array | None, h_in_BTD: Array,
                h_out_BTD: Array, layer: Array, logp_BTV: Array | None = None) -> Array:
  if measure in LOGIT_MEASURES:
    if logp_BTV is not None:
      return _confidence_from_logp(measure, logp_BTV)
    return _LOGIT_MEASURE_FNS[measure](logits_BTV)
  if measure == "state":
    return state_confidence(h_in_BTD, h_out_BTD)
  return probe_confidence(probe, h_in_BTD, h_out_BTD, layer)


# ----------------------------------------------------------------------------------------
# FLOP accounting: the formulas of the module docstring, written once.


@dataclasses.dataclass(frozen=True)
class FlopCounter:
  """Per-token FLOPs of the pieces of a `DeepSupervisionTransformer` (module docstring).

  Methods take Python ints (exact) or arrays; pass float arrays for big models, since
  int32 overflows past ~2e9 FLOPs.
  """

  num_layers: int
  dim: int
  ffn_dim: int
  vocab_size: int
  kv_dim: int | None = None  # C = G K, the key (and value) width; None = dim
  ffn_matrices: int = 2  # m: 2 (GELU MLP) or 3 (SwiGLU)

  @classmethod
  def from_config(cls, config: ModelConfig) -> FlopCounter:
    return cls(config.num_layers, config.dim, config.ffn_width, config.vocab_size,
               config.kv_heads * config.head_dim, config.ffn_matrices)

  @property
  def _kv_width(self) -> int:
    return self.dim if self.kv_dim is None else self.kv_dim

  def block(self, t):
    """One Transformer block for the token at 0-based position t."""
    d, f, c, m = self.dim, self.ffn_dim, self._kv_width, self.ffn_matrices
    return 2 * d * (d + 2 * c) + 2 * 2 * (t + 1) * d + 2 * d * d + 2 * m * d * f

  @property
  def head(self) -> int:
    return 2 * self.dim * self.vocab_size

  @property
  def kv(self) -> int:
    return 2 * self.dim * 2 * self._kv_width

  @property
  def cosine(self) -> int:
    return 2 * 3 * self.dim

  def exit_at(self, t, exit_layer):
    """The blocks up to `exit_layer` and one head, nothing else: a token whose exit costs
    nothing to decide (the sweep's oracle bound), and at `exit_layer` = N full depth."""
    return exit_layer * self.block(t) + self.head

  def full_depth(self, t):
    """All N blocks plus one head: the denominator of `flops_fraction`."""
    return self.exit_at(t, self.num_layers)

  def token(self, t, exit_layer, num_checks, *, measure: str = "softmax",
            kv_policy: str = "oracle", probe_flops: int = 0):
    """FLOPs of one token under early exit.

    Args:
      t: 0-based position.
      exit_layer: 1-based layer the token exits at (N = full depth).
      num_checks: exit checks the token went through (exit layers <= exit_layer, < N).
      measure: one of `MEASURES`.
      kv_policy: one of `KV_POLICIES`.
      probe_flops: `flops_per_token` of the probe (measure "probe").

    Returns:
      FLOPs, same type as the inputs.
    """
    flops = exit_layer * self.block(t)
    if kv_policy == "copy":
      flops = flops + (self.num_layers - exit_layer) * self.kv
    if measure in LOGIT_MEASURES:
      return flops + num_checks * self.head + (exit_layer == self.num_layers) * self.head
    per_check = self.cosine if measure == "state" else probe_flops
    return flops + self.head + num_checks * per_check


def flops_per_token(config: ModelConfig, t, exit_layer, *, exit_layers: Sequence[int],
                    measure: str = "softmax", kv_policy: str = "oracle",
                    probe_flops: int = 0):
  """FLOPs of the token at position t that exits at `exit_layer` (module docstring).

  Args:
    config: the model's architecture.
    t: 0-based position (int or array).
    exit_layer: 1-based exit layer (int or array; N = full depth).
    exit_layers: the exit layers checked, as passed to `predict_with_exit`.
    measure: one of `MEASURES`.
    kv_policy: one of `KV_POLICIES`.
    probe_flops: the probe's `flops_per_token` (measure "probe").

  Returns:
    FLOPs (divide by `FlopCounter.from_config(config).full_depth(t)` for a fraction).
  """
  layers = check_exit_layers(exit_layers, config.num_layers)
  num_checks = sum((exit_layer >= k) * 1 for k in layers)
  return FlopCounter.from_config(config).token(
      t, exit_layer, num_checks, measure=measure, kv_policy=kv_policy,
      probe_flops=probe_flops)


# ----------------------------------------------------------------------------------------
# Exit selection.


def _position_thresholds(threshold: Array, seq_len: int, decay: float,
                         form: str = "exponential") -> Array:
  """Per-position thresholds [T] (module docstring); decay 0 returns threshold exactly."""
  factor_T = jnp.exp(-decay * jnp.arange(seq_len, dtype=jnp.float32) / seq_len)
  if form == "calm":
    factor_T = 0.9 + 0.1 * factor_T
  return jnp.where(threshold >= 0, threshold * factor_T, threshold / factor_T)


def _is_confident(conf_XBT: Array, thr_T: Array, routing: str, need: int) -> Array:
  """Token-level exit decisions; sequence routing makes them uniform along T."""
  ok_XBT = conf_XBT >= thr_T
  if routing == "sequence":
    ok_XB1 = jnp.sum(ok_XBT, -1, keepdims=True) >= need
    ok_XBT = jnp.broadcast_to(ok_XB1, ok_XBT.shape)
  return ok_XBT


def _first_true(ok_EBT: Array) -> Array:
  """Index of the first True along axis 0, or E where there is none."""
  ok_LBT = jnp.concatenate([ok_EBT, jnp.ones((1,) + ok_EBT.shape[1:], bool)], 0)
  return jnp.argmax(ok_LBT, axis=0).astype(jnp.int32)


def oracle_exit_layer(logits_NBTV: Array, exit_layers: Sequence[int]) -> Array:
  """Perfect-predictor bound: earliest exit layer whose top-1 equals the final top-1.

  Args:
    logits_NBTV: every layer's logits, e.g. from `all_layer_logits`.
    exit_layers: 1-based exit layers, as for `predict_with_exit`.

  Returns:
    int32 [B, T] 1-based layer; N where no exit layer agrees with the last layer.
  """
  n = logits_NBTV.shape[0]
  layers = check_exit_layers(exit_layers, n)
  top_NBT = jnp.argmax(logits_NBTV, -1)
  agree_EBT = top_NBT[np.asarray([k - 1 for k in layers], np.int32)] == top_NBT[-1]
  return jnp.asarray(layers + (n,), jnp.int32)[_first_true(agree_EBT)]


# ----------------------------------------------------------------------------------------
# The jitted engine.


@dataclasses.dataclass(frozen=True)
class _Options:
  exit_layers: tuple[int, ...]  # checked exit layers, all < N
  measure: str
  kv_policy: str
  routing: str
  seq_quantile: float
  threshold_decay: float
  probe_flops: int
  return_logits: bool = True
  threshold_decay_form: str = "exponential"


def _nll(logits_XBTV: Array, targets_BT: Array, normalized: bool = False) -> Array:
  logp_XBTV = logits_XBTV if normalized else jax.nn.log_softmax(logits_XBTV, -1)
  targets_XBT1 = jnp.broadcast_to(targets_BT[..., None], logp_XBTV.shape[:-1] + (1,))
  return -jnp.take_along_axis(logp_XBTV, targets_XBT1, -1)[..., 0]


def _finish(config: ModelConfig, opts: _Options, threshold: Array, idx_BT: Array,
            logits_BTV: Array, conf_BT: Array, nll_BT: Array | None) -> ExitResult:
  """Builds the `ExitResult` from each token's candidate index (E = full depth)."""
  n, e = config.num_layers, len(opts.exit_layers)
  exit_layer_BT = jnp.asarray(opts.exit_layers + (n,), jnp.int32)[idx_BT]
  # Floats: FLOP counts of real models overflow int32.
  layer_BT = exit_layer_BT.astype(jnp.float32)
  t_BT = jnp.broadcast_to(jnp.arange(idx_BT.shape[-1], dtype=jnp.float32), idx_BT.shape)
  checks_BT = jnp.minimum(idx_BT + 1, e).astype(jnp.float32)
  counter = FlopCounter.from_config(config)
  flops_BT = counter.token(t_BT, layer_BT, checks_BT, measure=opts.measure,
                           kv_policy=opts.kv_policy, probe_flops=opts.probe_flops)
  flops_fraction_BT = flops_BT / counter.full_depth(t_BT)
  layers_fraction_BT = layer_BT / n
  exit_fraction_E = jnp.mean(
      (idx_BT[None] == jnp.arange(e, dtype=jnp.int32)[:, None, None]).astype(jnp.float32),
      axis=(1, 2))
  return ExitResult(
      logits=logits_BTV,
      exit_layer=exit_layer_BT,
      confidence=conf_BT,
      layers_fraction=layers_fraction_BT,
      mean_layers_fraction=jnp.mean(layers_fraction_BT),
      flops_fraction=flops_fraction_BT,
      mean_flops_fraction=jnp.mean(flops_fraction_BT),
      exit_fraction=exit_fraction_E,
      threshold=threshold,
      nll=nll_BT,
      flops=flops_BT,
      exit_layers=opts.exit_layers)


def _candidate_logits(model: DeepSupervisionTransformer, probe: Any, tokens_BT: Array,
                      targets_BT: Array | None, opts: _Options
                      ) -> tuple[Array, Array, Array | None]:
  """Logits [L, B, T, V] of the L candidate layers (exits + final), their confidence
  [E, B, T] and NLL [L, B, T]: one forward pass, heads at candidate layers only."""
  n = model.config.num_layers
  out = model(tokens_BT, per_layer_fn=lambda h_BTD: None)
  h_in_NBTD = jnp.concatenate([out.embed_BTD[None], out.hidden_NBTD[:-1]], 0)
  logits_LBTV = jnp.stack(
      [model.head(out.hidden_NBTD[k - 1]) for k in opts.exit_layers + (n,)]
  ).astype(jnp.float32)
  # Normalised once per candidate layer: the confidence and the NLL both read it, and
  # each threshold then only gathers [B, T] values.
  logp_LBTV = jax.nn.log_softmax(logits_LBTV, -1)
  conf_EBT = jnp.stack([
      _confidence(opts.measure, probe, logits_LBTV[j], h_in_NBTD[k - 1],
                  out.hidden_NBTD[k - 1], jnp.int32(k), logp_BTV=logp_LBTV[j])
      for j, k in enumerate(opts.exit_layers)
  ]) if opts.exit_layers else jnp.zeros((0,) + tokens_BT.shape, jnp.float32)
  nll_LBT = None if targets_BT is None else _nll(logp_LBTV, targets_BT, normalized=True)
  return logits_LBTV, conf_EBT, nll_LBT


def _candidate_summaries(model: DeepSupervisionTransformer, probe: Any, tokens_BT: Array,
                         targets_BT: Array | None, opts: _Options
                         ) -> tuple[Array, Array | None]:
  """Confidence [E, B, T] and NLL [L, B, T] of `_candidate_logits`, without its logits.

  The head runs inside the layer scan, under a `cond` that skips non-candidate
  layers, and only [B, T] summaries leave each layer: peak memory holds one
  layer's [B, T, V] logits instead of L of them (large vocabularies).
  """
  n = model.config.num_layers
  candidates = opts.exit_layers + (n,)
  is_candidate_N = jnp.asarray([i + 1 in candidates for i in range(n)])
  zeros_BT = jnp.zeros(tokens_BT.shape, jnp.float32)

  def body(i, h_in_BTD, h_out_BTD, carry):
    def summarize(_):
      logp_BTV = jax.nn.log_softmax(model.head(h_out_BTD).astype(jnp.float32), -1)
      conf_BT = _confidence(opts.measure, probe, None, h_in_BTD, h_out_BTD, i + 1,
                            logp_BTV=logp_BTV)
      nll_BT = zeros_BT if targets_BT is None else _nll(logp_BTV, targets_BT, True)
      return jnp.asarray(conf_BT, jnp.float32), nll_BT

    out = jax.lax.cond(is_candidate_N[i], summarize, lambda _: (zeros_BT, zeros_BT), None)
    return h_out_BTD, carry, out

  _, _, (conf_NBT, nll_NBT) = model.scan_layers(model.embed_tokens(tokens_BT), body)
  rows = np.asarray(candidates, np.int32) - 1
  return conf_NBT[rows[:-1]], None if targets_BT is None else nll_NBT[rows]


def _where_tokens(mask_BT: Array, a_BTX: Array, b_BTX: Array) -> Array:
  """Per token, `a` where mask else `b` (for [B, T] or [B, T, V] values)."""
  return jnp.where(mask_BT.reshape(mask_BT.shape + (1,) * (a_BTX.ndim - 2)), a_BTX, b_BTX)


def _oracle(model: DeepSupervisionTransformer, probe: Any, tokens_BT: Array,
            threshold: Array, targets_BT: Array | None, opts: _Options) -> ExitResult:
  """Oracle KV policy: one full forward pass shared by all thresholds, then selection."""
  config = model.config
  e, seq_len = len(opts.exit_layers), tokens_BT.shape[-1]
  if opts.return_logits:
    logits_LBTV, conf_EBT, nll_LBT = _candidate_logits(model, probe, tokens_BT, targets_BT,
                                                       opts)
  else:
    logits_LBTV = None
    conf_EBT, nll_LBT = _candidate_summaries(model, probe, tokens_BT, targets_BT, opts)
  need = math.ceil(round(opts.seq_quantile * seq_len, 6))

  def select(thr: Array) -> ExitResult:
    thr_T = _position_thresholds(thr, seq_len, opts.threshold_decay,
                                 opts.threshold_decay_form)
    idx_BT = _first_true(_is_confident(conf_EBT, thr_T, opts.routing, need))
    logits_BTV = None
    if logits_LBTV is not None:
      logits_BTV = jnp.take_along_axis(logits_LBTV, idx_BT[None, :, :, None], axis=0)[0]
    if e:
      conf_BT = jnp.take_along_axis(conf_EBT, jnp.minimum(idx_BT, e - 1)[None], axis=0)[0]
    else:
      conf_BT = jnp.full(idx_BT.shape, jnp.nan, jnp.float32)
    nll_BT = None
    if nll_LBT is not None:
      nll_BT = jnp.take_along_axis(nll_LBT, idx_BT[None], axis=0)[0]
    return _finish(config, opts, thr, idx_BT, logits_BTV, conf_BT, nll_BT)

  return select(threshold) if threshold.ndim == 0 else jax.vmap(select)(threshold)


def _copy(model: DeepSupervisionTransformer, probe: Any, tokens_BT: Array,
          threshold: Array, targets_BT: Array | None, opts: _Options) -> ExitResult:
  """Copy KV policy (CALM state propagation): one layer scan per threshold."""
  config = model.config
  n, e, seq_len = config.num_layers, len(opts.exit_layers), tokens_BT.shape[-1]
  # exit_index_N[i] = position of layer i+1 in exit_layers, or -1 (no check there).
  exit_index_N = jnp.asarray(
      [opts.exit_layers.index(i + 1) if i + 1 in opts.exit_layers else -1 for i in range(n)],
      jnp.int32)
  need = math.ceil(round(opts.seq_quantile * seq_len, 6))
  h0_BTD = model.embed_tokens(tokens_BT)

  def keep(logits_BTV: Array) -> Array:
    """What an exiting token keeps: its logits, or (sweeps) only its NLL [B, T]."""
    if opts.return_logits:
      return logits_BTV
    if targets_BT is None:
      return jnp.zeros(logits_BTV.shape[:-1], jnp.float32)
    return _nll(logits_BTV, targets_BT)

  def run(thr: Array) -> ExitResult:
    thr_T = _position_thresholds(thr, seq_len, opts.threshold_decay,
                                 opts.threshold_decay_form)

    def body(i, h_in_BTD, h_out_BTD, carry):
      exited_BT = carry[0]
      # Exited tokens keep their frozen state; the next block computes their
      # keys/values from it, which is exactly what later tokens attend to.
      h_next_BTD = jnp.where(exited_BT[..., None], h_in_BTD, h_out_BTD)
      j = exit_index_N[i]

      def check(carry):
        exited_BT, idx_BT, conf_BT, kept_BTX = carry
        layer_logits_BTV = model.head(h_next_BTD).astype(jnp.float32)
        c_BT = _confidence(opts.measure, probe, layer_logits_BTV, h_in_BTD, h_out_BTD,
                           i + 1)
        new_BT = _is_confident(c_BT, thr_T, opts.routing, need) & ~exited_BT
        return (exited_BT | new_BT,
                jnp.where(new_BT, j, idx_BT),
                jnp.where(exited_BT, conf_BT, c_BT),
                _where_tokens(new_BT, keep(layer_logits_BTV), kept_BTX))

      # A cond, not a mask, so non-exit layers skip the vocabulary projection.
      carry = jax.lax.cond(j >= 0, check, lambda c: c, carry)
      return h_next_BTD, carry, None

    b, t = tokens_BT.shape
    init = (jnp.zeros((b, t), bool), jnp.full((b, t), e, jnp.int32),
            jnp.full((b, t), jnp.nan, jnp.float32),
            jnp.zeros((b, t, config.vocab_size) if opts.return_logits else (b, t), jnp.float32))
    h_last_BTD, (exited_BT, idx_BT, conf_BT, kept_BTX), _ = model.scan_layers(h0_BTD, body, init)
    kept_BTX = _where_tokens(exited_BT, kept_BTX,
                             keep(model.head(h_last_BTD).astype(jnp.float32)))
    if opts.return_logits:
      logits_BTV = kept_BTX
      nll_BT = None if targets_BT is None else _nll(logits_BTV, targets_BT)
    else:
      logits_BTV = None
      nll_BT = None if targets_BT is None else kept_BTX
    return _finish(config, opts, thr, idx_BT, logits_BTV, conf_BT, nll_BT)

  # Thresholds one after another (lax.map), not batched (vmap): the layer scans are
  # independent anyway, and one threshold's [B, T, V] head output at a time moves far
  # less memory (2-4x faster sweeps on CPU, and S times less peak memory).
  return run(threshold) if threshold.ndim == 0 else jax.lax.map(run, threshold)


def split_probe(probe: Any) -> tuple[Any, Any, int]:
  """A confidence probe as (static part, traced part, FLOPs per evaluation) for a jit.

  An `nnx.Module` splits into its graphdef (static) and state (traced); a hashable probe
  is static; an array pytree (e.g. a `probes.SaturationProbe`) is traced, so new weights
  never recompile. None gives (None, None, 0). `merge_probe` undoes it inside the jit.
  """
  if probe is None:
    return None, None, 0
  probe_flops = getattr(probe, "flops_per_token", None)
  if not isinstance(probe_flops, (int, np.integer)) or probe_flops < 0:
    raise UserError(f"probe.flops_per_token must be an int >= 0, got {probe_flops!r}: "
                    "set it to the FLOPs one evaluation costs per token")
  if isinstance(probe, nnx.Module):
    return (*nnx.split(probe), int(probe_flops))
  if _is_hashable(probe):
    return probe, None, int(probe_flops)
  return None, probe, int(probe_flops)  # An array pytree.


def merge_probe(static_probe: Any, dynamic_probe: Any) -> Any:
  """The probe `split_probe` split."""
  if isinstance(static_probe, nnx.GraphDef):
    return nnx.merge(static_probe, dynamic_probe)
  return static_probe if dynamic_probe is None else dynamic_probe


def probe_confidence(probe: Any, h_in_XD: Array, h_out_XD: Array, layer: Array) -> Array:
  """A probe's confidence, float32 (what the exit rule compares with the threshold)."""
  return jnp.asarray(probe(h_in_XD, h_out_XD, layer), jnp.float32)


# The model travels as (graphdef, state) through a plain `jax.jit`, not `nnx.jit`: nothing
# is written back to the caller's module, so this also works under an outer `jax.jit`.
def _predict(graphdef: nnx.GraphDef, state: nnx.State, tokens_BT: Array,
                 threshold: Array, targets_BT: Array | None, dynamic_probe: Any, *,
                 static_probe: Any, opts: _Options) -> ExitResult:
  model = nnx.merge(graphdef, state)
  probe = merge_probe(static_probe, dynamic_probe)
  engine = _oracle if opts.kv_policy == "oracle" else _copy
  result = engine(model, probe, tokens_BT, threshold, targets_BT, opts)
  # Without logits in the outputs XLA drops their per-threshold gather (sweeps).
  return result if opts.return_logits else result.replace(logits=None)


@functools.cache
def _predict_jit(nested: bool):
  # Built at first use: the compiler options depend on the backend, unknown at import.
  # Under a caller's jit (nested) XLA accepts no per-function compiler options.
  static = ("graphdef", "static_probe", "opts")
  return jax.jit(_predict, static_argnames=static) if nested else xla_options.jit(
      _predict, static_argnames=static)


# ----------------------------------------------------------------------------------------
# Input validation (Python, before tracing) and the public entry point.


def check_exit_layers(exit_layers: Sequence[int], num_layers: int) -> tuple[int, ...]:
  """Validates 1-based exit layers; returns those below num_layers (N is the fallback).

  Raises:
    UserError: not a sequence, empty, out of 1..num_layers, or not strictly ascending.
  """
  try:
    layers = tuple(exit_layers)
  except TypeError:
    raise UserError(
        f"exit_layers must be a sequence of layer numbers, got {exit_layers!r}: "
        "pass e.g. exit_layers=(2,)") from None
  if not layers:
    raise UserError(f"exit_layers is empty: it must be non-empty; pass at least one layer, "
                    f"e.g. ({num_layers},) for full depth")
  for k in layers:
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not 1 <= k <= num_layers:
      raise UserError(f"exit_layers={layers!r} contains {k!r}: layers are numbered 1.."
                      f"{num_layers} (num_layers), pass layers in that range")
  if any(a >= b for a, b in zip(layers, layers[1:])):
    raise UserError(f"exit_layers={layers!r} must be strictly ascending: sort them and "
                    "drop duplicates")
  return tuple(int(k) for k in layers if k < num_layers)


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
  """Raises a `UserError` naming `name` and the allowed `choices` unless value is one."""
  if value not in choices:
    raise UserError(f"unknown {name}={value!r}: choose one of {', '.join(choices)}")


def exit_settings(num_layers: int, *, exit_layers: Sequence[int], measure: str,
                  kv_policy: str, routing: str = "token", seq_quantile: float = 1.0,
                  threshold_decay: float = 0.0,
                  threshold_decay_form: str = "exponential") -> dict[str, Any]:
  """The options of `predict_with_exit` that decide which tokens exit, normalised.

  A calibrated threshold (`calibration.Calibration`) records these and is only valid
  under the same ones: exit layers are the checked ones (below N), `seq_quantile`
  only counts under sequence routing and the decay form only with a decay.
  """
  return {
      "measure": measure,
      "exit_layers": check_exit_layers(exit_layers, num_layers),
      "kv_policy": kv_policy,
      "routing": routing,
      "seq_quantile": float(seq_quantile) if routing == "sequence" else 1.0,
      "threshold_decay": float(threshold_decay),
      "threshold_decay_form": threshold_decay_form if threshold_decay else "exponential",
  }


def _calibrated_value(threshold: Any, measure: str, settings: dict[str, Any] | None) -> Any:
  """A `CalibratedThreshold`'s threshold, once its recorded settings match the call's."""
  if not isinstance(threshold, CalibratedThreshold):
    return threshold
  recorded = dict(threshold.settings)
  for key, value in {**(settings or {}), "measure": measure}.items():
    if key in recorded and recorded[key] != value:
      raise UserError(
          f"the calibrated threshold was calibrated with {key}={recorded[key]!r}, but this "
          f"call uses {key}={value!r}: calibrate again with these settings, or pass "
          "calibration.threshold to use the number without its guarantee")
  return threshold.threshold


def check_threshold(threshold: Any, measure: str,
                     settings: dict[str, Any] | None = None) -> Array:
  """Rejects NaN (and negative, for [0,1]-type measures) thresholds, where concrete.

  A `CalibratedThreshold` (`calibration.Calibration`) stands for its `threshold`; its
  recorded measure must equal `measure`, and every other recorded setting the one in
  `settings` (the caller's `exit_settings`, where it has them).

  Returns:
    The threshold as a float32 array, scalar or [S].
  """
  threshold = _calibrated_value(threshold, measure, settings)
  # A traced threshold (under an outer jit) has no value to check; its shape is known.
  if not isinstance(threshold, jax.core.Tracer):
    try:
      values = np.asarray(threshold, np.float64)
    except (TypeError, ValueError):
      raise UserError(f"threshold must be a number or a 1-D array of numbers, got "
                      f"{threshold!r}") from None
    if np.isnan(values).any():
      raise UserError("threshold is NaN: pass a number (jnp.inf means never exit)")
    if measure in _NONNEGATIVE_MEASURES and (values < 0).any():
      raise UserError(
          f"threshold {values.min()} is negative, but measure={measure!r} confidences are "
          ">= 0 (state: a cosine >= 0 in practice): pass a threshold >= 0 (0 exits at the "
          "first exit layer)")
  # Always float32, so a Python float, a NumPy scalar and a jax array share one compile.
  value = jnp.asarray(threshold, jnp.float32)
  if value.ndim > 1:
    raise UserError(f"threshold must be a scalar or a 1-D array [S], got shape {value.shape}")
  return value


def check_probe_and_threshold(threshold: Any, measure: str, probe: Any,
                              settings: dict[str, Any] | None = None
                              ) -> tuple[Array, Any, Any, int]:
  """The threshold and probe arguments of an exit engine or decoder, checked together.

  Args:
    threshold: a number, a 1-D array or a `CalibratedThreshold` (see `check_threshold`).
    measure: one of `MEASURES`; "probe" needs `probe` and `probe` needs "probe".
    probe: a `ConfidenceProbe` or None.
    settings: the call's `exit_settings`, which a calibrated threshold must match.

  Returns:
    (float32 threshold, static probe, traced probe, the probe's FLOPs per token), the
    probe parts as `split_probe` returns them.

  Raises:
    UserError: a probe without measure "probe" or the reverse, or a bad threshold.
  """
  if (measure == "probe") != (probe is not None):
    raise UserError("measure='probe' needs probe=..., and probe=... needs measure='probe': "
                    "pass both or neither")
  threshold = check_threshold(threshold, measure, settings)
  static_probe, dynamic_probe, probe_flops = split_probe(probe)
  return threshold, static_probe, dynamic_probe, probe_flops


def _is_hashable(x: Any) -> bool:
  try:
    hash(x)
  except TypeError:
    return False
  return True


def predict_with_exit(
    model: DeepSupervisionTransformer,
    tokens: Array,
    threshold: float | Array,
    *,
    exit_layers: Sequence[int] = (2,),
    measure: str = "softmax",
    kv_policy: str = "oracle",
    routing: str = "token",
    seq_quantile: float = 1.0,
    threshold_decay: float = 0.0,
    threshold_decay_form: str = "exponential",
    probe: ConfidenceProbe | None = None,
    targets: Array | None = None,
    return_logits: bool = True,
) -> ExitResult:
  """Early-exit inference over whole sequences (semantics in the module docstring).

  Compiled once per shape and option set: `threshold` is traced, so sweeping its
  values never recompiles. A vector of thresholds is evaluated in one call; under
  `oracle` the forward pass then runs once for all of them.

  Args:
    model: a `DeepSupervisionTransformer`.
    tokens: int32 [B, T] token ids, T <= config.max_len.
    threshold: scalar or 1-D [S] confidence threshold; `jnp.inf` never exits. A
      `Calibration` from `calibrate_threshold` is accepted when this call's settings
      equal those it was calibrated under (else a `UserError`).
    exit_layers: strictly ascending 1-based layers, each in 1..N; N itself only means
      full depth and is not checked.
    measure: "softmax", "margin", "entropy", "state" or "probe".
    kv_policy: "oracle" (full-depth states for deeper layers) or "copy" (CALM).
    routing: "token" (per-token exits) or "sequence" (one exit layer per row).
    seq_quantile: q in (0, 1] for sequence routing: a row exits once at least
      ceil(q T) of its tokens are confident (1.0 = all of them).
    threshold_decay: tau >= 0 relaxing the threshold along the sequence; 0 = constant.
    threshold_decay_form: "exponential" (ours) or "calm" (CALM's released code); see
      the module docstring.
    probe: a `ConfidenceProbe`, required by (and only used with) measure "probe". An
      `nnx.Module` or array pytree is traced; any other probe must be hashable.
    targets: optional int [B, T] next-token ids; adds `nll` to the result.
    return_logits: False leaves `logits` None and skips gathering them (sweeps only
      need `nll` and the accounting; saves [S, B, T, V] memory).

  Returns:
    An `ExitResult`; with a 1-D threshold every field has a leading S axis.
  """
  config = model.config
  layers = check_exit_layers(exit_layers, config.num_layers)
  check_choice("measure", measure, MEASURES)
  check_choice("kv_policy", kv_policy, KV_POLICIES)
  check_choice("routing", routing, ROUTINGS)
  check_choice("threshold_decay_form", threshold_decay_form, DECAY_FORMS)
  tokens_BT = jnp.asarray(tokens, jnp.int32)
  if tokens_BT.ndim != 2 or tokens_BT.shape[1] < 1:
    raise UserError(f"tokens must be a [batch, time] array, got shape {tokens_BT.shape}")
  if tokens_BT.shape[1] > config.max_len:
    raise UserError(f"sequence length {tokens_BT.shape[1]} exceeds model.max_len="
                    f"{config.max_len}: shorten the input")
  targets_BT = None
  if targets is not None:
    targets_BT = jnp.asarray(targets, jnp.int32)
    if targets_BT.shape != tokens_BT.shape:
      raise UserError(f"targets shape {targets_BT.shape} must equal tokens shape "
                      f"{tokens_BT.shape}")
  if not 0.0 < seq_quantile <= 1.0:
    raise UserError(f"seq_quantile={seq_quantile!r} must be in (0, 1]: 1.0 requires every "
                    "token of the sequence to be confident")
  if not (math.isfinite(threshold_decay) and threshold_decay >= 0.0):
    raise UserError(f"threshold_decay={threshold_decay!r} must be a finite number >= 0 "
                    "(0 keeps the threshold constant)")
  threshold, static_probe, dynamic_probe, probe_flops = check_probe_and_threshold(
      threshold, measure, probe, exit_settings(
          config.num_layers, exit_layers=exit_layers, measure=measure, kv_policy=kv_policy,
          routing=routing, seq_quantile=seq_quantile, threshold_decay=threshold_decay,
          threshold_decay_form=threshold_decay_form))
  opts = _Options(exit_layers=layers, measure=measure, kv_policy=kv_policy, routing=routing,
                  seq_quantile=float(seq_quantile), threshold_decay=float(threshold_decay),
                  probe_flops=int(probe_flops), return_logits=bool(return_logits),
                  threshold_decay_form=threshold_decay_form)
  graphdef, state = nnx.split(model)
  nested = any(isinstance(x, jax.core.Tracer)
               for x in jax.tree.leaves((state, tokens_BT, threshold, targets_BT, dynamic_probe)))
  return _predict_jit(nested)(graphdef, state, tokens_BT, threshold, targets_BT, dynamic_probe,
                      static_probe=static_probe, opts=opts)

