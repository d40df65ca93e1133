"""Saturation probes, part 3: the predictors (`SaturationProbe`), their fitting and their
checkpoints.

Shapes: N layers, D model width, M collected tokens, L = N - 1 transitions, F probe
input features, H probe hidden width, G fitted groups (one per layer, or one shared).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from deepexit_jax import checkpoint, validation
from deepexit_jax.errors import UserError
from deepexit_jax.model import ModelConfig
from deepexit_jax.probes.collection import Collection, settled_labels
from deepexit_jax.probes.metrics import auroc, best_f1_threshold

Array = jax.Array

LEARNED = ("linear", "mlp", "mlp_h_delta", "shared_mlp")
PREDICTORS = ("delta_norm",) + LEARNED + ("state", "softmax")
# What each probe reads from the layer: its residual delta, [h_out, delta], or ||delta||.
_FEATURES = {"delta_norm": "delta_norm", "linear": "delta", "mlp": "delta",
             "mlp_h_delta": "h_delta", "shared_mlp": "delta"}
PROBE_JSON = "probe.json"
LAYER_EMBED_DIM = 8


# ----------------------------------------------------------------------------------------
# Predictors: features, the ConfidenceProbe, fitting.


def probe_features(feature: str, h_in_XD: Array, h_out_XD: Array) -> Array:
  """What a probe reads from a layer, [..., F]: delta, [h_out, delta] or ||delta||."""
  delta_XD = h_out_XD - h_in_XD
  if feature == "delta":
    return delta_XD
  if feature == "h_delta":
    return jnp.concatenate([h_out_XD, delta_XD], -1)
  if feature == "delta_norm":
    return jnp.sqrt(jnp.sum(delta_XD * delta_XD, -1, keepdims=True))
  raise ValueError(f"unknown probe feature {feature!r}")


def _feature_dim(feature: str, dim: int) -> int:
  return {"delta": dim, "h_delta": 2 * dim, "delta_norm": 1}[feature]


def probe_flops(feature: str, dim: int, hidden: int, shared: bool = False) -> int:
  """FLOPs per token of one probe evaluation (multiply-add = 2, elementwise op = 1).

  delta D + [||delta||: 2 D] + standardisation 2 F + first layer 2 F' H + 2 H (bias and
  GELU counted as 1 each) + output 2 H + 1 (or 2 F' + 1 without hidden layer) + the
  sigmoid 1; F' = F + the layer-embedding width for the shared MLP.
  """
  f = _feature_dim(feature, dim)
  flops = dim + (2 * dim if feature == "delta_norm" else 0) + 2 * f
  f_in = f + (LAYER_EMBED_DIM if shared else 0)
  flops += (2 * f_in * hidden + 2 * hidden + 2 * hidden + 1) if hidden else 2 * f_in + 1
  return int(flops + 1)


@flax.struct.dataclass
class SaturationProbe:
  """A fitted saturation probe; confidence = estimated P(the layer's top-1 is settled).

  A `ConfidenceProbe`: `predict_with_exit(model, tokens, thr, measure="probe",
  probe=p)` traces its arrays, so thresholds never recompile.

  Attributes:
    mean_GF, std_GF: feature standardisation per fitted group (G = N - 1 layers,
      or 1 if shared).
    params: {"w1" [G,F',H], "b1" [G,H], "w2" [G,H], "b2" [G]} (MLP) or {"w" [G,F'],
      "b" [G]} (logistic), plus "embed" [G, N-1, E] for the shared MLP.
    predictor: which predictor of `PREDICTORS` it is (static).
    feature: "delta", "h_delta" or "delta_norm" (static).
    hidden: MLP hidden width H, 0 for a logistic model (static).
    shared: one model for all layers with a layer embedding (static).
    label: the label it was fitted on (static).
    num_layers, dim: the model shape it belongs to (static).
    flops_per_token: FLOPs of one evaluation (`probe_flops`), counted by the
      exit engine's accounting at every exit check (static).
  """

  mean_GF: Array
  std_GF: Array
  params: dict[str, Array]
  predictor: str = flax.struct.field(pytree_node=False, default="mlp")
  feature: str = flax.struct.field(pytree_node=False, default="delta")
  hidden: int = flax.struct.field(pytree_node=False, default=0)
  shared: bool = flax.struct.field(pytree_node=False, default=False)
  label: str = flax.struct.field(pytree_node=False, default="final")
  num_layers: int = flax.struct.field(pytree_node=False, default=0)
  dim: int = flax.struct.field(pytree_node=False, default=0)
  flops_per_token: int = flax.struct.field(pytree_node=False, default=0)

  def logit(self, h_in_XD: Array, h_out_XD: Array, layer: Array) -> Array:
    """Log-odds that the top-1 of `layer` (1-based, may be traced) is settled."""
    index = jnp.asarray(layer, jnp.int32) - 1
    g = 0 if self.shared else index
    x_XF = probe_features(self.feature, h_in_XD.astype(jnp.float32),
                          h_out_XD.astype(jnp.float32))
    x_XF = (x_XF - self.mean_GF[g]) / self.std_GF[g]
    params = jax.tree.map(lambda a: a[g], self.params)
    return _apply(params, x_XF, index)

  def __call__(self, h_in_BTD: Array, h_out_BTD: Array, layer: Array) -> Array:
    return jax.nn.sigmoid(self.logit(h_in_BTD, h_out_BTD, layer))


def _apply(params: dict[str, Array], x_XF: Array, index: Array) -> Array:
  """Logits [...] of one group's model on standardised features."""
  if "embed" in params:
    emb_XE = jnp.broadcast_to(params["embed"][index], x_XF.shape[:-1] + (LAYER_EMBED_DIM,))
    x_XF = jnp.concatenate([x_XF, emb_XE], -1)
  if "w" in params:
    return x_XF @ params["w"] + params["b"]
  h_XH = jax.nn.gelu(x_XF @ params["w1"] + params["b1"])
  return h_XH @ params["w2"] + params["b2"]


def _init_params(key: Array, f: int, hidden: int, num_embed: int) -> dict[str, Array]:
  f_in = f + (LAYER_EMBED_DIM if num_embed else 0)
  k1, k2, k3 = jax.random.split(key, 3)
  if hidden == 0:
    params = {"w": jnp.zeros((f_in,)), "b": jnp.zeros(())}
  else:
    params = {"w1": jax.random.normal(k1, (f_in, hidden)) / math.sqrt(f_in),
              "b1": jnp.zeros((hidden,)),
              "w2": jax.random.normal(k2, (hidden,)) / math.sqrt(hidden),
              "b2": jnp.zeros(())}
  if num_embed:
    params["embed"] = 0.1 * jax.random.normal(k3, (num_embed, LAYER_EMBED_DIM))
  return params


@dataclasses.dataclass(frozen=True)
class FitConfig:
  """How the learned probes are trained (optax Adam, minibatches, early stopping).

  Attributes:
    hidden: MLP hidden width H.
    learning_rate, batch_size: Adam step size and minibatch size.
    max_epochs: passes over the training part at most.
    patience: stop a group after this many epochs without a better dev loss; the
      best dev-loss parameters are kept.
    dev_fraction: trailing share of the fitting part used for early stopping.
    seed: initialisation and minibatch-order seed.
  """

  hidden: int = 32
  learning_rate: float = 3e-3
  batch_size: int = 512
  max_epochs: int = 40
  patience: int = 4
  dev_fraction: float = 0.125
  seed: int = 0

  def __post_init__(self):
    for name in ("hidden", "batch_size", "max_epochs", "patience", "seed"):
      validation.check_int(name, getattr(self, name), 0 if name == "seed" else 1)
    validation.check_float("dev_fraction", self.dev_fraction, 0.0, 1.0, low_open=True,
                           high_open=True)
    validation.check_float("learning_rate", self.learning_rate, 0.0, math.inf, low_open=True)


def _weighted_bce(params, x_BF, y_B, w_B, idx_B):
  logits_B = _apply(params, x_BF, idx_B)
  return jnp.sum(w_B * optax.sigmoid_binary_cross_entropy(logits_B, y_B)) / jnp.maximum(
      jnp.sum(w_B), 1e-9)


@functools.partial(jax.jit, static_argnames=("tx",))
def _train_epoch(params_G, opt_G, x_GMF, y_GM, w_GM, idx_GM, order_SB, tx):
  """One epoch over all groups at once (vmapped), minibatches in `order_SB`."""
  grad_fn = jax.vmap(jax.grad(_weighted_bce))

  def step(carry, rows_B):
    params, opt_state = carry
    take = functools.partial(jnp.take, indices=rows_B, axis=1)
    grads = grad_fn(params, take(x_GMF), take(y_GM), take(w_GM), take(idx_GM))
    updates, opt_state = jax.vmap(tx.update)(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), None

  (params_G, opt_G), _ = jax.lax.scan(step, (params_G, opt_G), order_SB)
  return params_G, opt_G


_dev_loss = jax.jit(jax.vmap(_weighted_bce))


def _keep_better(better_G: np.ndarray, new: Array, old: Array) -> Array:
  return jnp.where(better_G.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)


@functools.cache
def _adam(learning_rate: float) -> optax.GradientTransformation:
  # One object per rate: `_train_epoch` is compiled per optimizer (a static argument).
  return optax.adam(learning_rate)


def _fit_groups(x_GMF: np.ndarray, y_GM: np.ndarray, w_GM: np.ndarray, idx_GM: np.ndarray,
                num_train: int, *, hidden: int, num_embed: int, cfg: FitConfig
                ) -> tuple[dict[str, Array], dict[str, Any]]:
  """Fits one logistic model or MLP per group; rows [:num_train] train, the rest dev."""
  g, m, f = x_GMF.shape
  key = jax.random.PRNGKey(cfg.seed)
  params = jax.vmap(lambda k: _init_params(k, f, hidden, num_embed))(jax.random.split(key, g))
  tx = _adam(cfg.learning_rate)
  opt = jax.vmap(tx.init)(params)
  x, y, w, idx = (jnp.asarray(a) for a in (x_GMF, y_GM.astype(np.float32),
                                           w_GM.astype(np.float32), idx_GM.astype(np.int32)))
  dev = (x[:, num_train:], y[:, num_train:], w[:, num_train:], idx[:, num_train:])
  best = params
  best_loss = np.asarray(_dev_loss(params, *dev))
  since = np.zeros(g, np.int32)
  rng = np.random.default_rng(cfg.seed)
  batch = min(cfg.batch_size, num_train)
  steps = num_train // batch
  epochs = 0
  while epochs < cfg.max_epochs:
    epochs += 1
    order_SB = rng.permutation(num_train)[:steps * batch].reshape(steps, batch)
    params, opt = _train_epoch(params, opt, x, y, w, idx, jnp.asarray(order_SB), tx)
    loss = np.asarray(_dev_loss(params, *dev))
    better = loss < best_loss
    best = jax.tree.map(functools.partial(_keep_better, better), params, best)
    best_loss = np.where(better, loss, best_loss)
    since = np.where(better, 0, since + 1)
    if np.all(since >= cfg.patience):
      break
  return best, {"epochs": epochs, "dev_loss": best_loss.tolist()}


@jax.jit
def _probe_logits(probe: SaturationProbe, h_in_MD: Array, h_out_MD: Array, layer: Array):
  return probe.logit(h_in_MD, h_out_MD, layer)


def probe_scores(probe: SaturationProbe, collection: Collection) -> np.ndarray:
  """The probe's log-odds [N-1, M] of "settled" at every transition of a collection."""
  h_in, h_out = collection.h_in_NMD, collection.h_out_NMD
  # Static fields that do not change the computation must not cause a new compile.
  probe = probe.replace(predictor="", label="", flops_per_token=0)
  return np.stack([np.asarray(_probe_logits(probe, h_in[i], h_out[i], jnp.int32(i + 1)))
                   for i in range(collection.num_layers - 1)])


def fit_probe(collection: Collection, label: str, predictor: str, *, num_fit: int,
              balanced: bool = False, fit: FitConfig = FitConfig()
              ) -> tuple[SaturationProbe, dict[str, Any]]:
  """Fits one learned predictor (or `delta_norm`) on the first `num_fit` tokens.

  Args:
    collection: the collected layers.
    label: one of `LABELS`; the probe predicts its positive ("settled") class.
    predictor: "delta_norm" or one of `LEARNED`.
    num_fit: tokens [0, num_fit) are the fitting part (its trailing
      `fit.dev_fraction` is the early-stopping split of the learned probes).
    balanced: weight the loss so both classes count equally (learned probes).
    fit: training hyper-parameters.

  Returns:
    (the probe, fitting info).
  """
  n, d = collection.num_layers, collection.hidden_NMD.shape[-1]
  el = n - 1
  y_LM = settled_labels(label, collection.top1_NM)
  feature = _FEATURES[predictor]
  static = dict(predictor=predictor, feature=feature, label=label, num_layers=n, dim=d)
  h_in, h_out = collection.h_in_NMD[:el], collection.h_out_NMD[:el]
  if predictor == "delta_norm":
    norm_LM = np.linalg.norm(h_out - h_in, axis=-1)
    signs, thresholds, scales = [], [], []
    for i in range(el):
      y, s = y_LM[i, :num_fit], norm_LM[i, :num_fit]
      # Direction from the fitting part: small or large updates may mean "settled".
      sign = 1.0 if not auroc(y, s) < 0.5 else -1.0
      signs.append(sign)
      thresholds.append(best_f1_threshold(y, sign * s))
      scales.append(max(float(s.std()), 1e-6))
    sign_L, thr_L, scale_L = (np.asarray(a, np.float32) for a in (signs, thresholds, scales))
    params = {"w": jnp.asarray((sign_L / scale_L)[:, None]),
              "b": jnp.asarray(-thr_L / scale_L)}
    probe = SaturationProbe(mean_GF=jnp.zeros((el, 1)), std_GF=jnp.ones((el, 1)),
                            params=params, hidden=0, shared=False,
                            flops_per_token=probe_flops(feature, d, 0), **static)
    return probe, {"sign": signs, "threshold": thresholds}
  if predictor not in LEARNED:
    raise UserError(f"unknown predictor {predictor!r}: choose one of {', '.join(PREDICTORS)}")
  hidden = 0 if predictor == "linear" else fit.hidden
  shared = predictor == "shared_mlp"
  x_LMF = np.asarray(jax.jit(probe_features, static_argnums=0)(feature, h_in, h_out))
  num_train = num_fit - max(1, int(round(num_fit * fit.dev_fraction)))
  if num_train < 2:
    raise UserError(f"fitting part of {num_fit} tokens is too small: raise the token budget")
  y_fit = y_LM[:, :num_fit]
  if shared:  # One group: every layer's training rows, then every layer's dev rows.
    f = x_LMF.shape[-1]
    parts = (slice(0, num_train), slice(num_train, num_fit))
    x = np.concatenate([x_LMF[:, p].reshape(-1, f) for p in parts])[None]
    y = np.concatenate([y_fit[:, p].reshape(-1) for p in parts])[None]
    idx = np.concatenate([np.broadcast_to(np.arange(el)[:, None], y_fit[:, p].shape).reshape(-1)
                          for p in parts])[None]
    groups_train = el * num_train
  else:
    x, y, idx = x_LMF[:, :num_fit], y_fit, np.zeros_like(y_fit, np.int32)
    groups_train = num_train
  mean_GF = x[:, :groups_train].mean(1)
  std_GF = np.maximum(x[:, :groups_train].std(1), 1e-6)
  x = (x - mean_GF[:, None]) / std_GF[:, None]
  w = np.ones(y.shape, np.float32)
  if balanced:
    p_G1 = np.clip(y[:, :groups_train].mean(1, keepdims=True), 1e-6, 1 - 1e-6)
    w = np.where(y, 0.5 / p_G1, 0.5 / (1 - p_G1)).astype(np.float32)
  params, info = _fit_groups(x.astype(np.float32), y, w, idx, groups_train, hidden=hidden,
                             num_embed=el if shared else 0, cfg=fit)
  probe = SaturationProbe(mean_GF=jnp.asarray(mean_GF, jnp.float32),
                          std_GF=jnp.asarray(std_GF, jnp.float32), params=params,
                          hidden=hidden, shared=shared,
                          flops_per_token=probe_flops(feature, d, hidden, shared), **static)
  return probe, info


# ----------------------------------------------------------------------------------------
# Probe checkpoints (orbax).


def save_probe(probe: SaturationProbe, directory: str, *,
               extra: dict[str, Any] | None = None) -> str:
  """Writes probe.json (static fields) and the arrays (orbax) to `directory`."""
  checkpoint.ensure_writable(directory)
  meta = {f.name: getattr(probe, f.name) for f in dataclasses.fields(probe)
          if f.name not in ("mean_GF", "std_GF", "params")}
  meta["extra"] = extra or {}
  arrays = {"mean_GF": probe.mean_GF, "std_GF": probe.std_GF, "params": dict(probe.params)}
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(os.path.abspath(directory), "arrays"), arrays, force=True)
  checkpoint.write_json(os.path.join(directory, PROBE_JSON), meta)
  return directory


def load_probe(directory: str, config: ModelConfig | None = None) -> SaturationProbe:
  """Loads a probe saved by `save_probe` (or `deepexit-probe`).

  Args:
    directory: the probe directory (holding probe.json and arrays/).
    config: the model the probe will run on; its depth and width must match.

  Raises:
    UserError: no probe there, or a probe fitted for another model shape.
  """
  path = os.path.join(directory, PROBE_JSON)
  if not os.path.exists(path):
    raise UserError(f"{directory} is not a saturation-probe directory (no {PROBE_JSON}): pass "
                    "a directory written by deepexit-probe, e.g. OUT/probes/best")
  meta = checkpoint.read_json(path)
  meta.pop("extra", None)
  if config is not None and (meta["num_layers"], meta["dim"]) != (config.num_layers,
                                                                   config.dim):
    raise UserError(
        f"probe {directory} was fitted for a model with {meta['num_layers']} layers of width "
        f"{meta['dim']}, but this model has {config.num_layers} layers of width {config.dim}: "
        "fit a probe on this checkpoint with deepexit-probe --checkpoint=...")
  el, n, d = meta["num_layers"] - 1, meta["num_layers"], meta["dim"]
  f = _feature_dim(meta["feature"], d)
  g = 1 if meta["shared"] else el
  key = jax.random.PRNGKey(0)
  params = jax.vmap(lambda k: _init_params(k, f, meta["hidden"], el if meta["shared"] else 0)
                    )(jax.random.split(key, g))
  del n
  target = {"mean_GF": jnp.zeros((g, f)), "std_GF": jnp.zeros((g, f)), "params": params}
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  try:
    with ocp.StandardCheckpointer() as ckptr:
      arrays = ckptr.restore(os.path.join(os.path.abspath(directory), "arrays"), abstract)
  except (ValueError, KeyError, FileNotFoundError) as e:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    raise UserError(f"probe arrays in {directory} do not match its {PROBE_JSON} ({first}): "
                    "fit the probe again") from None
  return SaturationProbe(mean_GF=arrays["mean_GF"], std_GF=arrays["std_GF"],
                         params=arrays["params"], **meta)
