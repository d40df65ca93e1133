"""Saturation probes: when is a token's top-1 prediction settled, and can a layer tell?

Shapes (suffixes on locals): N layers, B batch, T time, D model width, V vocabulary,
M collected tokens, K top-k ranks, L = N - 1 transitions (layer l -> l + 1 for
l = 1..N-1, indexed l - 1), F probe input features, H probe hidden width, G fitted
groups (one per layer, or one shared).

Pipeline:
  collect   one jitted pass of the model's single layer scan per batch keeps, per
            layer, the input/output hidden states, the top-k token ids of the shared
            exit head, the exit engine's confidences and the target NLL; the [B, T, V]
            logits of a layer live only inside the scan body, so nothing of size
            [N, B, T, V] is ever materialised (vocabularies of 32k fit).
  labels    from the per-layer top-1 (LABELS): `change` (top-1 at l + 1 differs from
            top-1 at l, the reference's transition l -> l + 1), `saturated` (top-1 at l
            equals the top-1 of EVERY later layer, strict) and `final` (top-1 at l
            equals the last layer's, CALM's label).
  predict   per transition, from what layer l has when it must decide to exit
            (h_in, h_out, delta = h_out - h_in): `delta_norm` (threshold on ||delta||),
            `linear` (logistic regression on delta), `mlp` (on delta), `mlp_h_delta`
            (on [h_out, delta]), `shared_mlp` (one MLP for all layers, with a learned
            layer embedding), and the exit engine's `state` and `softmax` measures as
            baselines. Fitted on the first part of the tokens, scored on the rest.
  metrics   the POSITIVE class is always "settled": label `change` is predicted as
            its complement (top-1 unchanged at the next layer), `saturated`/`final`
            as given. F1, precision, recall, AUROC, and the trivial baselines (the
            majority class's accuracy; F1 of always predicting "settled").

Every fitted probe is a `SaturationProbe` (a `ConfidenceProbe` for
`predict_with_exit(..., measure="probe")`) whose confidence is its estimated
probability that the layer's top-1 is settled; 0.5 is the decision threshold that
the study scores.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

from deepexit_jax import checkpoint, data, exits
from deepexit_jax.errors import UserError
from deepexit_jax.model import DeepSupervisionTransformer, ModelConfig

Array = jax.Array

LABELS = ("change", "saturated", "final")
LEARNED = ("linear", "mlp", "mlp_h_delta", "shared_mlp")
PREDICTORS = ("delta_norm",) + LEARNED + ("state", "softmax")
# What each probe reads from the layer: its residual delta, [h_out, delta], or ||delta||.
_FEATURES = {"delta_norm": "delta_norm", "linear": "delta", "mlp": "delta",
             "mlp_h_delta": "h_delta", "shared_mlp": "delta"}
DEFAULT_TOKENS = 65_536
PROBE_JSON = "probe.json"
LAYER_EMBED_DIM = 8


# ----------------------------------------------------------------------------------------
# Collection: one layer scan per batch, summaries only.


@dataclasses.dataclass
class Collection:
  """Per-layer summaries of M validation tokens, in text order (see module docstring).

  Attributes:
    hidden_NMD: [N + 1, M, D] float32 hidden states; index 0 is the embedding (the
      input of layer 1), index l the output of layer l. h_in of layer l is
      hidden[l - 1], h_out is hidden[l].
    topk_NMK: [N, M, K] int32 token ids ranked 1..K by each layer's exit head.
    softmax_NM, margin_NM, entropy_NM, state_NM: [N, M] the exit engine's
      confidence measures at every layer.
    nll_NM: [N, M] negative log-likelihood of the target at every layer.
    targets_M: [M] int32 next-token ids.
    positions_M: [M] int32 0-based positions inside their evaluation window.
    metadata: where the tokens came from (checkpoint, text, budget).
  """

  hidden_NMD: np.ndarray
  topk_NMK: np.ndarray
  softmax_NM: np.ndarray
  margin_NM: np.ndarray
  entropy_NM: np.ndarray
  state_NM: np.ndarray
  nll_NM: np.ndarray
  targets_M: np.ndarray
  positions_M: np.ndarray
  metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def num_layers(self) -> int:
    return self.topk_NMK.shape[0]

  @property
  def num_tokens(self) -> int:
    return self.topk_NMK.shape[1]

  @property
  def top1_NM(self) -> np.ndarray:
    return self.topk_NMK[..., 0]

  @property
  def h_in_NMD(self) -> np.ndarray:
    return self.hidden_NMD[:-1]

  @property
  def h_out_NMD(self) -> np.ndarray:
    return self.hidden_NMD[1:]

  @property
  def delta_NMD(self) -> np.ndarray:
    return self.hidden_NMD[1:] - self.hidden_NMD[:-1]

  def save(self, path: str) -> None:
    """Writes the arrays (and metadata as JSON) to one .npz file, atomically."""
    arrays = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
              if f.name != "metadata"}
    tmp = path + ".tmp.npz"
    np.savez(tmp, metadata=np.asarray(json.dumps(self.metadata)), **arrays)
    os.replace(tmp, path)

  @classmethod
  def load(cls, path: str) -> Collection:
    if not os.path.exists(path):
      raise UserError(f"collection file {path} not found: run the collection first "
                      "(deepexit-probe without --collection, or collect())")
    with np.load(path) as f:
      fields = {k: f[k] for k in f.files if k != "metadata"}
      metadata = json.loads(str(f["metadata"]))
    return cls(metadata=metadata, **fields)


def _layer_summaries(model: DeepSupervisionTransformer, tokens_BT: Array, targets_BT: Array,
                     top_k: int, use_scan: bool = True) -> dict[str, Array]:
  """Every layer's summaries [N, B, T, ...] from ONE layer scan (module docstring)."""

  def body(i, h_in_BTD, h_out_BTD, carry):
    del i
    logits_BTV = model.head(h_out_BTD).astype(jnp.float32)
    logp_BTV = jax.nn.log_softmax(logits_BTV, -1)
    top_logp_BTK, top_ids_BTK = jax.lax.top_k(logp_BTV, max(top_k, 2))
    p_BT2 = jnp.exp(top_logp_BTK[..., :2])
    out = {
        "hidden": h_out_BTD.astype(jnp.float32),
        "topk": top_ids_BTK[..., :top_k].astype(jnp.int32),
        "softmax": p_BT2[..., 0],
        "margin": p_BT2[..., 0] - p_BT2[..., 1],
        "entropy": jnp.sum(jnp.exp(logp_BTV) * logp_BTV, -1),
        "state": exits.state_confidence(h_in_BTD, h_out_BTD),
        "nll": -jnp.take_along_axis(logp_BTV, targets_BT[..., None], -1)[..., 0],
    }
    return h_out_BTD, carry, out

  h0_BTD = model.embed_tokens(tokens_BT)
  _, _, out = model.scan_layers(h0_BTD, body, use_scan=use_scan)
  out["embed"] = h0_BTD.astype(jnp.float32)
  return out


@functools.partial(jax.jit, static_argnames=("graphdef", "top_k", "use_scan"))
def _summaries_jit(graphdef, state, tokens_BT, targets_BT, top_k, use_scan=True):
  return _layer_summaries(nnx.merge(graphdef, state), tokens_BT, targets_BT, top_k, use_scan)


def layer_summaries(model: DeepSupervisionTransformer, tokens: Array, targets: Array, *,
                    top_k: int = 5, use_scan: bool = True) -> dict[str, Array]:
  """Jitted per-layer summaries of one batch (what `collect` keeps), [N, B, T, ...].

  Args:
    model: the early-exit model.
    tokens: int [B, T] inputs.
    targets: int [B, T] next tokens (for the per-layer NLL).
    top_k: ranks of each layer's prediction to keep (K >= 1).
    use_scan: False runs the model's Python-loop path (tested equal).

  Returns:
    {"embed" [B,T,D], "hidden" [N,B,T,D], "topk" [N,B,T,K], "softmax", "margin",
    "entropy", "state", "nll" [N,B,T]}.
  """
  graphdef, state = nnx.split(model)
  return _summaries_jit(graphdef, state, jnp.asarray(tokens, jnp.int32),
                        jnp.asarray(targets, jnp.int32), int(top_k), use_scan)


def collect(model: DeepSupervisionTransformer, batches: data.EvalBatches, num_tokens: int, *,
            top_k: int = 5, metadata: dict[str, Any] | None = None) -> Collection:
  """Collects the first `num_tokens` targets of a text (its evaluation windows in order).

  Args:
    model: the early-exit model.
    batches: `data.eval_batches` of the text; only the batches needed are run.
    num_tokens: the token budget M.
    top_k: ranks kept per layer.
    metadata: stored with the collection.

  Raises:
    UserError: the text has fewer than `num_tokens` targets, or top_k is out of range.
  """
  if not 1 <= top_k <= model.config.vocab_size:
    raise UserError(f"top_k={top_k} must be in 1..{model.config.vocab_size} (the vocabulary)")
  if num_tokens < 1 or num_tokens > batches.num_targets:
    raise UserError(
        f"token budget {num_tokens:,} exceeds the {batches.num_targets:,} targets of the "
        "validation text (or is < 1): lower --tokens or give a longer text (--val_chars)")
  per_batch = batches.inputs.shape[1] * batches.inputs.shape[2]
  parts: dict[str, list[np.ndarray]] = {}
  for b in range(math.ceil(num_tokens / per_batch)):
    out = jax.device_get(layer_summaries(model, batches.inputs[b], batches.targets[b],
                                         top_k=top_k))
    out["hidden"] = np.concatenate([out.pop("embed")[None], out["hidden"]])
    out["targets"] = np.asarray(batches.targets[b])[None]
    out["positions"] = np.broadcast_to(np.arange(batches.inputs.shape[2]),
                                       batches.inputs.shape[1:])[None]
    keep_M = np.asarray(batches.mask[b]).reshape(-1) > 0
    for name, value in out.items():  # every entry: [lead, B, T, trailing...]
      x = np.asarray(value)
      flat = x.reshape(x.shape[:1] + (-1,) + x.shape[3:])
      parts.setdefault(name, []).append(np.compress(keep_M, flat, axis=1))
  arr = {k: np.concatenate(v, axis=1) for k, v in parts.items()}
  m = num_tokens
  return Collection(
      hidden_NMD=arr["hidden"][:, :m], topk_NMK=arr["topk"][:, :m],
      softmax_NM=arr["softmax"][:, :m], margin_NM=arr["margin"][:, :m],
      entropy_NM=arr["entropy"][:, :m], state_NM=arr["state"][:, :m],
      nll_NM=arr["nll"][:, :m], targets_M=arr["targets"][0, :m].astype(np.int32),
      positions_M=arr["positions"][0, :m].astype(np.int32), metadata=dict(metadata or {}))


def text_batches(checkpoint_dir: str, *, skip_chars: int | None = None,
                 data_dir: str | None = None) -> tuple[Any, data.EvalBatches, dict[str, Any]]:
  """The checkpoint's model and the validation text the probe study reads.

  The text is the checkpoint's validation split AFTER its first `data.val_chars`
  characters (which chose the checkpoint and which `deepexit-sweep` evaluates), so a
  probe fitted here and then swept is scored on text it never saw.

  Args:
    checkpoint_dir: a `deepexit-train` workdir.
    skip_chars: characters of the validation split to skip; None: the run's
      data.val_chars (0 if it used the whole split).
    data_dir: overrides the run's data.data_dir.

  Returns:
    (the loaded `checkpoint.Checkpoint`, evaluation batches, metadata).
  """
  ckpt = checkpoint.load_checkpoint(checkpoint_dir)
  if ckpt.experiment is None or ckpt.tokenizer is None:
    raise UserError(f"{checkpoint_dir} lacks config.json/tokenizer.json: pass the --workdir "
                    "of a deepexit-train run")
  data_cfg = dict(ckpt.experiment["data"])
  if data_dir:
    data_cfg["data_dir"] = data_dir
  skip = (data_cfg.get("val_chars") or 0) if skip_chars is None else int(skip_chars)
  if skip < 0:
    raise UserError(f"skip_chars={skip} must be >= 0")
  data_cfg["val_chars"] = None
  corpus = data.load_corpus(data.DataConfig.from_dict(data_cfg))
  text = corpus.val_text[skip:]
  tokens = ckpt.tokenizer.encode(text)
  if len(tokens) < 2:
    raise UserError(f"the validation text has {len(corpus.val_text):,} characters, none left "
                    f"after skipping {skip:,}: pass a smaller --skip_chars")
  batches = data.eval_batches(tokens, data_cfg["seq_len"], data_cfg["batch_size"])
  meta = {"checkpoint": checkpoint_dir, "checkpoint_abspath": ckpt.path, "step": ckpt.step,
          "text": f"{corpus.description}; validation characters {skip:,}.."
                  f"{len(corpus.val_text):,}", "skip_chars": skip,
          "seq_len": data_cfg["seq_len"], "model": ckpt.model.config.to_dict()}
  return ckpt, batches, meta


# ----------------------------------------------------------------------------------------
# Labels: per transition l -> l + 1 (l = 1..N-1), from the per-layer top-1 [N, M].


def change_labels(top1_NM: np.ndarray) -> np.ndarray:
  """[N-1, M] True where the top-1 at layer l + 1 differs from the top-1 at layer l."""
  top1_NM = np.asarray(top1_NM)
  return top1_NM[1:] != top1_NM[:-1]


def saturated_labels(top1_NM: np.ndarray) -> np.ndarray:
  """[N-1, M] True where the top-1 at layer l equals the top-1 of every later layer."""
  top1_NM = np.asarray(top1_NM)
  same_next_LM = top1_NM[1:] == top1_NM[:-1]
  # Settled at l iff unchanged at l -> l+1 and settled at l+1 (layer N always is).
  return np.flip(np.logical_and.accumulate(np.flip(same_next_LM, 0), axis=0), 0)


def final_labels(top1_NM: np.ndarray) -> np.ndarray:
  """[N-1, M] True where the top-1 at layer l equals the last layer's (CALM's label)."""
  top1_NM = np.asarray(top1_NM)
  return top1_NM[:-1] == top1_NM[-1]


def settled_labels(label: str, top1_NM: np.ndarray) -> np.ndarray:
  """The POSITIVE class [N-1, M] of a label: "settled" (for `change`: unchanged)."""
  if label == "change":
    return ~change_labels(top1_NM)
  if label == "saturated":
    return saturated_labels(top1_NM)
  if label == "final":
    return final_labels(top1_NM)
  raise UserError(f"unknown label {label!r}: choose one of {', '.join(LABELS)}")


# ----------------------------------------------------------------------------------------
# Metrics (positive class = True).


def binary_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
  """Precision, recall, F1 and accuracy of predicting the True class (0 where undefined)."""
  y, p = np.asarray(y_true, bool), np.asarray(y_pred, bool)
  tp = float(np.sum(y & p))
  precision = tp / max(float(p.sum()), 1.0)
  recall = tp / max(float(y.sum()), 1.0)
  f1 = 2 * tp / max(float(y.sum() + p.sum()), 1.0)
  return {"precision": precision, "recall": recall, "f1": f1,
          "accuracy": float(np.mean(y == p))}


def auroc(y_true: np.ndarray, score: np.ndarray) -> float:
  """Area under the ROC curve: P(score of a positive > score of a negative), ties 1/2."""
  y = np.asarray(y_true, bool)
  s = np.asarray(score, np.float64)
  pos, neg = int(y.sum()), int((~y).sum())
  if pos == 0 or neg == 0:
    return float("nan")
  order = np.argsort(s, kind="mergesort")
  ranks = np.empty(len(s), np.float64)
  sorted_s = s[order]
  # Average ranks over ties (1-based), the Mann-Whitney statistic.
  starts = np.r_[0, np.flatnonzero(np.diff(sorted_s)) + 1]
  ends = np.r_[starts[1:], len(s)]
  avg = (starts + ends + 1) / 2.0
  ranks[order] = np.repeat(avg, ends - starts)
  return float((ranks[y].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


def best_f1_threshold(y_true: np.ndarray, score: np.ndarray) -> float:
  """The threshold t maximising F1 of `score >= t` (chosen on fitting data)."""
  y = np.asarray(y_true, bool)
  s = np.asarray(score, np.float64)
  order = np.argsort(-s, kind="mergesort")
  s_sorted, tp = s[order], np.cumsum(y[order])
  last = np.r_[np.flatnonzero(np.diff(s_sorted)), len(s) - 1]  # end of each tie group
  f1 = 2 * tp[last] / (y.sum() + last + 1)
  return float(s_sorted[last[int(np.argmax(f1))]])


def pearson_r(x: np.ndarray, y: np.ndarray) -> float:
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if x.std() == 0 or y.std() == 0:
    return float("nan")
  return float(np.corrcoef(x, y)[0, 1])


# ----------------------------------------------------------------------------------------
# Probes: features, the ConfidenceProbe, fitting.


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
    if self.hidden < 1:
      raise UserError(f"hidden={self.hidden} must be >= 1 (the MLP width)")
    if not 0.0 < self.dev_fraction < 1.0:
      raise UserError(f"dev_fraction={self.dev_fraction} must be in (0, 1)")
    if self.batch_size < 1 or self.max_epochs < 1 or self.patience < 1:
      raise UserError("batch_size, max_epochs and patience must be >= 1")


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


# ----------------------------------------------------------------------------------------
# Analyses.


def topk_settling(topk_NMK: np.ndarray) -> dict[str, Any]:
  """When does the rank-k token settle ("Looking Beyond the Top-1")?

  The rank-k token settles at layer s_k, the first layer from which every later layer
  (the last included) ranks the same token k-th; s_k in 1..N.

  Returns:
    {"settle_layer_KM": [K, M] int, "per_rank": [{"k", "mean", "median",
    "settled_at_1", "top1_no_later"}], "top1_first": share where s_1 <= s_k for every
    k, "top1_strictly_first": s_1 < s_k for every k > 1, "ordered": share with
    s_1 <= s_2 <= ... <= s_K}.
  """
  topk_NMK = np.asarray(topk_NMK)
  n = topk_NMK.shape[0]
  same_NMK = topk_NMK == topk_NMK[-1]
  settled_NMK = np.flip(np.logical_and.accumulate(np.flip(same_NMK, 0), axis=0), 0)
  settle_KM = (n - settled_NMK.sum(0) + 1).T
  per_rank = [{"k": k + 1, "mean": float(settle_KM[k].mean()),
               "median": float(np.median(settle_KM[k])),
               "settled_at_1": float(np.mean(settle_KM[k] == 1)),
               "top1_no_later": float(np.mean(settle_KM[0] <= settle_KM[k]))}
              for k in range(settle_KM.shape[0])]
  rest = settle_KM[1:]
  return {
      "settle_layer_KM": settle_KM, "per_rank": per_rank,
      "top1_first": float(np.mean(np.all(settle_KM[0] <= rest, 0))) if len(rest) else 1.0,
      "top1_strictly_first": float(np.mean(np.all(settle_KM[0] < rest, 0)))
      if len(rest) else 1.0,
      "ordered": float(np.mean(np.all(np.diff(settle_KM, axis=0) >= 0, 0))),
  }


def analyses(collection: Collection) -> dict[str, Any]:
  """Change rate and its correlation with ||delta||, delta statistics, top-k settling."""
  col = collection
  n = col.num_layers
  change_LM = change_labels(col.top1_NM)
  delta_NM = np.linalg.norm(col.delta_NMD, axis=-1)
  h_in_NM = np.linalg.norm(col.h_in_NMD, axis=-1)
  transitions = [{
      "transition": f"{i + 1}->{i + 2}", "layer": i + 1,
      "change_rate": float(change_LM[i].mean()),
      # ||delta|| of layer l (known when layer l decides to exit) and of layer l + 1
      # (the update that makes the change).
      "r_delta_l": pearson_r(delta_NM[i], change_LM[i]),
      "r_delta_next": pearson_r(delta_NM[i + 1], change_LM[i]),
  } for i in range(n - 1)]
  layers = [{
      "layer": i + 1, "mean_delta_norm": float(delta_NM[i].mean()),
      "mean_relative_delta": float(np.mean(delta_NM[i] / np.maximum(h_in_NM[i], 1e-30))),
      "mean_h_in_norm": float(h_in_NM[i].mean()),
      "ppl": float(np.exp(col.nll_NM[i].mean())),
      "mean_softmax": float(col.softmax_NM[i].mean()),
      "agrees_with_final": float(np.mean(col.top1_NM[i] == col.top1_NM[-1])),
  } for i in range(n)]
  topk = topk_settling(col.topk_NMK)
  topk.pop("settle_layer_KM")
  return {"transitions": transitions, "layers": layers, "topk": topk}


# ----------------------------------------------------------------------------------------
# The study: every label x predictor, per transition, on held-out tokens.


@dataclasses.dataclass
class ProbeStudy:
  """A finished probe study.

  Attributes:
    rows: one dict per (label, predictor, transition) with held-out metrics (F1,
      precision, recall, AUROC, accuracy; `f1_tuned` at a threshold chosen on the
      fitting part; `f1_negative_class` with "not settled" as the positive class)
      and the baselines (positive rate, majority-class accuracy, F1 of always
      predicting "settled").
    summary: the rows averaged over transitions, per (label, predictor).
    analyses: `analyses(collection)`.
    probes: fitted probes by "label/predictor" name.
    best: name of the best exit probe (highest mean AUROC on `exit_label`).
    flops: per-token FLOPs of the exit head, a block and every probe.
    metadata: text, budget, split and fitting settings.
  """

  rows: list[dict[str, Any]]
  summary: list[dict[str, Any]]
  analyses: dict[str, Any]
  probes: dict[str, SaturationProbe]
  best: str | None
  flops: dict[str, Any]
  metadata: dict[str, Any]


_METRICS = ("f1", "precision", "recall", "auroc", "accuracy", "f1_tuned", "f1_negative_class",
            "positive_rate", "majority_accuracy", "all_positive_f1")


def _score_rows(label: str, name: str, y_LM: np.ndarray, score_LM: np.ndarray,
                thr_L: np.ndarray, num_fit: int) -> list[dict[str, Any]]:
  rows = []
  for i in range(y_LM.shape[0]):
    y, s = y_LM[i, num_fit:], score_LM[i, num_fit:]
    pred = s >= thr_L[i]
    p = float(y.mean())
    tuned = best_f1_threshold(y_LM[i, :num_fit], score_LM[i, :num_fit])
    rows.append({
        "label": label, "predictor": name, "transition": f"{i + 1}->{i + 2}", "layer": i + 1,
        **binary_metrics(y, pred), "auroc": auroc(y, s),
        "f1_tuned": binary_metrics(y, s >= tuned)["f1"],
        "f1_negative_class": binary_metrics(~y, ~pred)["f1"],
        "positive_rate": p, "majority_accuracy": max(p, 1 - p),
        "all_positive_f1": 2 * p / (1 + p) if p > 0 else 0.0,
        "threshold": float(thr_L[i]), "num_heldout": int(y.size)})
  return rows


def _nan_mean(values: Sequence[float]) -> float:
  """Mean over the defined values (AUROC is undefined where one class is absent)."""
  finite = [v for v in values if not math.isnan(v)]
  return float(np.mean(finite)) if finite else float("nan")


def run_study(collection: Collection, *, labels: Sequence[str] = LABELS,
              predictors: Sequence[str] = PREDICTORS, balance: Sequence[bool] = (False, True),
              fit_fraction: float = 0.75, fit: FitConfig = FitConfig(),
              exit_label: str = "final") -> ProbeStudy:
  """Fits and scores every predictor for every label (module docstring).

  Args:
    collection: the collected layers (M tokens in text order).
    labels: labels to study (`LABELS`).
    predictors: predictors to fit (`PREDICTORS`).
    balance: for learned predictors, fit without (False) and/or with (True) the
      class-balanced loss; balanced ones are named "<predictor>_balanced".
    fit_fraction: the first share of the tokens is the fitting part, the rest is
      held out for every metric.
    fit: training hyper-parameters of the learned probes.
    exit_label: the label whose best learned probe is recommended for exit.

  Returns:
    A `ProbeStudy`.
  """
  for name in labels:
    if name not in LABELS:
      raise UserError(f"unknown label {name!r}: choose from {', '.join(LABELS)}")
  for name in predictors:
    if name not in PREDICTORS:
      raise UserError(f"unknown predictor {name!r}: choose from {', '.join(PREDICTORS)}")
  if exit_label not in LABELS:
    raise UserError(f"unknown exit label {exit_label!r}: choose from {', '.join(LABELS)}")
  if not 0.0 < fit_fraction < 1.0:
    raise UserError(f"fit_fraction={fit_fraction} must be in (0, 1)")
  if collection.num_layers < 2:
    raise UserError("a probe study needs a model with at least 2 layers")
  m = collection.num_tokens
  num_fit = int(m * fit_fraction)
  if num_fit < 16 or m - num_fit < 16:
    raise UserError(f"{m} tokens give too small a fitting or held-out part: raise the "
                    "token budget")
  el = collection.num_layers - 1
  rows: list[dict[str, Any]] = []
  probes: dict[str, SaturationProbe] = {}
  for label in labels:
    y_LM = settled_labels(label, collection.top1_NM)
    for predictor in predictors:
      if predictor in ("state", "softmax"):
        score_LM = getattr(collection, predictor + "_NM")[:el]
        thr_L = np.asarray([best_f1_threshold(y_LM[i, :num_fit], score_LM[i, :num_fit])
                            for i in range(el)])
        rows += _score_rows(label, predictor, y_LM, score_LM, thr_L, num_fit)
        continue
      for balanced in (balance if predictor in LEARNED else (False,)):
        name = predictor + ("_balanced" if balanced else "")
        probe, _ = fit_probe(collection, label, predictor, num_fit=num_fit,
                             balanced=balanced, fit=fit)
        probes[f"{label}/{name}"] = probe
        rows += _score_rows(label, name, y_LM, probe_scores(probe, collection),
                            np.zeros(el), num_fit)
  summary = []
  for key in dict.fromkeys((r["label"], r["predictor"]) for r in rows):
    sel = [r for r in rows if (r["label"], r["predictor"]) == key]
    summary.append({"label": key[0], "predictor": key[1],
                    **{k: _nan_mean([r[k] for r in sel]) for k in _METRICS}})
  candidates = [s for s in summary if s["label"] == exit_label
                and f"{s['label']}/{s['predictor']}" in probes
                and s["predictor"] != "delta_norm"]
  best = None
  if candidates:
    top = max(candidates, key=lambda s: s["auroc"])
    best = f"{top['label']}/{top['predictor']}"
  d = collection.hidden_NMD.shape[-1]
  model_cfg = collection.metadata.get("model", {})
  heads, kv_heads = model_cfg.get("num_heads"), model_cfg.get("num_kv_heads")
  counter = exits.FlopCounter(collection.num_layers, d, model_cfg.get("ffn_dim") or 4 * d,
                              model_cfg.get("vocab_size", 0),
                              d * kv_heads // heads if heads and kv_heads else None,
                              3 if model_cfg.get("mlp") == "swiglu" else 2)
  t_mid = int(collection.positions_M.max()) // 2
  flops = {"head": counter.head, "block_mid_position": int(counter.block(t_mid)),
           "mid_position": t_mid,
           "probes": {k: p.flops_per_token for k, p in probes.items()}}
  metadata = {**collection.metadata, "num_tokens": m, "num_fit": num_fit,
              "num_heldout": m - num_fit, "fit_fraction": fit_fraction,
              "fit": dataclasses.asdict(fit), "labels": list(labels),
              "predictors": list(predictors), "balance": list(balance),
              "exit_label": exit_label, "positive_class": "settled (label change: unchanged "
              "at the next layer; saturated/final: as defined)"}
  return ProbeStudy(rows=rows, summary=summary, analyses=analyses(collection), probes=probes,
                    best=best, flops=flops, metadata=metadata)


# ----------------------------------------------------------------------------------------
# Reports: probe.md, probe.csv, probe.json, probe.png.


def _f(x: float, digits: int = 1, pct: bool = True) -> str:
  if x is None or (isinstance(x, float) and math.isnan(x)):
    return "n/a"
  return f"{100 * x:.{digits}f}" if pct else f"{x:.{digits}f}"


def markdown(study: ProbeStudy) -> str:
  """The study as Markdown: analyses, per-transition F1 tables, summaries, FLOPs."""
  meta, an = study.metadata, study.analyses
  lines = [
      f"Probe study of {meta.get('checkpoint')} (step {meta.get('step')}) on "
      f"{meta['num_tokens']:,} tokens of {meta.get('text', 'the validation text')}: the "
      f"first {meta['num_fit']:,} fit the predictors (the last "
      f"{100 * meta['fit']['dev_fraction']:.1f}% of them stop training early), the last "
      f"{meta['num_heldout']:,} are held out for every metric.", "",
      "Positive class of F1/precision/recall: **settled** (label `change`: the top-1 does "
      "NOT change at the next layer; `saturated`: equals every later layer's top-1; "
      "`final`: equals the last layer's top-1). Transition l->l+1 is decided from layer "
      "l's h_in, h_out and delta = h_out - h_in. Learned probes and `delta_norm` decide at "
      "probability 0.5 (`delta_norm`'s threshold and the `state`/`softmax` thresholds are "
      "chosen for F1 on the fitting part); `F1 tuned` uses a threshold chosen on the "
      "fitting part for every predictor.", "",
      "### Change rate and ||delta|| (all tokens)", "",
      "| transition | change rate | r(||delta_l||, change) | r(||delta_l+1||, change) |",
      "|---|---|---|---|"]
  for t in an["transitions"]:
    lines.append(f"| {t['transition']} | {_f(t['change_rate'])}% | "
                 f"{_f(t['r_delta_l'], 3, False)} | {_f(t['r_delta_next'], 3, False)} |")
  lines += ["", "### Per layer", "",
            "| layer | mean ||delta|| | mean ||delta||/||h_in|| | mean ||h_in|| | PPL | "
            "mean max-prob | top-1 = final top-1 |", "|---|---|---|---|---|---|---|"]
  for r in an["layers"]:
    lines.append(f"| {r['layer']} | {r['mean_delta_norm']:.3f} | "
                 f"{r['mean_relative_delta']:.3f} | {r['mean_h_in_norm']:.3f} | "
                 f"{r['ppl']:.3f} | {r['mean_softmax']:.3f} | {_f(r['agrees_with_final'])}% |")
  topk = an["topk"]
  lines += ["", "### Top-k sequential saturation", "",
            "Rank-k token settles at the first layer from which every later layer ranks "
            "the same token k-th.", "",
            "| k | mean settle layer | median | settled at layer 1 | top-1 settles no later |",
            "|---|---|---|---|---|"]
  for r in topk["per_rank"]:
    lines.append(f"| {r['k']} | {r['mean']:.2f} | {r['median']:.0f} | "
                 f"{_f(r['settled_at_1'])}% | {_f(r['top1_no_later'])}% |")
  lines += ["", f"Top-1 settles no later than every rank 2..K: {_f(topk['top1_first'])}%; "
            f"strictly first: {_f(topk['top1_strictly_first'])}%; settle layers ordered "
            f"s_1 <= s_2 <= ... <= s_K: {_f(topk['ordered'])}%.", ""]
  for label in meta["labels"]:
    names = list(dict.fromkeys(r["predictor"] for r in study.rows if r["label"] == label))
    rows = [r for r in study.rows if r["label"] == label]
    lines += [f"### Label `{label}`: held-out F1 (%) per transition", "",
              "| transition | positive rate | majority acc. | all-settled F1 | "
              + " | ".join(names) + " |", "|" + "---|" * (4 + len(names))]
    for tr in dict.fromkeys(r["transition"] for r in rows):
      by = {r["predictor"]: r for r in rows if r["transition"] == tr}
      first = next(iter(by.values()))
      lines.append(f"| {tr} | {_f(first['positive_rate'])} | "
                   f"{_f(first['majority_accuracy'])} | {_f(first['all_positive_f1'])} | "
                   + " | ".join(_f(by[n]["f1"]) for n in names) + " |")
    lines += ["", f"Label `{label}`, means over transitions:", "",
              "| predictor | F1 | F1 tuned | precision | recall | AUROC | accuracy | "
              "F1 (negative class) | FLOPs/token |", "|---|---|---|---|---|---|---|---|---|"]
    for s in (s for s in study.summary if s["label"] == label):
      fl = study.flops["probes"].get(f"{label}/{s['predictor']}")
      fl = {"state": 6 * meta["model"]["dim"], "softmax": study.flops["head"]}.get(
          s["predictor"], fl)
      lines.append(f"| {s['predictor']} | {_f(s['f1'])} | {_f(s['f1_tuned'])} | "
                   f"{_f(s['precision'])} | {_f(s['recall'])} | {_f(s['auroc'], 3, False)} | "
                   f"{_f(s['accuracy'])} | {_f(s['f1_negative_class'])} | {fl} |")
    first = next(s for s in study.summary if s["label"] == label)
    lines += ["", f"Baselines (means): positive rate {_f(first['positive_rate'])}%, "
              f"majority-class accuracy {_f(first['majority_accuracy'])}%, F1 of always "
              f"predicting settled {_f(first['all_positive_f1'])}%.", ""]
  fl = study.flops
  lines += ["### Probe cost", "",
            f"Per token: exit head (2 D V) {fl['head']:,} FLOPs; one block at position "
            f"{fl['mid_position']} {fl['block_mid_position']:,} FLOPs. Softmax confidence "
            "needs the head at every exit check; a probe needs its own FLOPs (table above) "
            "per check and the head once, at the exit layer.", ""]
  if study.best:
    lines += [f"Best exit probe (highest mean AUROC on label `{meta['exit_label']}`): "
              f"`{study.best}`, {fl['probes'][study.best]:,} FLOPs per check "
              f"({_f(fl['probes'][study.best] / max(fl['head'], 1))}% of the head).", ""]
  return "\n".join(lines) + "\n"


def to_json(study: ProbeStudy) -> dict[str, Any]:
  return {"rows": study.rows, "summary": study.summary, "analyses": study.analyses,
          "best": study.best, "flops": study.flops, "metadata": study.metadata}


def plot(study: ProbeStudy, path: str) -> None:
  """Four panels: change rate and r, delta norms, F1 per transition, top-k settling."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  an = study.analyses
  fig, axes = plt.subplots(2, 2, figsize=(12, 8))
  tr = an["transitions"]
  xs = [t["layer"] for t in tr]
  ax = axes[0, 0]
  ax.plot(xs, [100 * t["change_rate"] for t in tr], "o-", label="change rate (%)")
  ax2 = ax.twinx()
  ax2.plot(xs, [t["r_delta_l"] for t in tr], "s--", color="tab:red",
           label="r(||delta_l||, change)")
  ax2.plot(xs, [t["r_delta_next"] for t in tr], "^--", color="tab:purple",
           label="r(||delta_l+1||, change)")
  ax.set_xticks(xs, [t["transition"] for t in tr])
  ax.set_title("top-1 change per transition")
  ax.legend(loc="upper left", fontsize=7)
  ax2.legend(loc="upper right", fontsize=7)
  ax = axes[0, 1]
  layers = an["layers"]
  ax.plot([r["layer"] for r in layers], [r["mean_delta_norm"] for r in layers], "o-",
          label="mean ||delta||")
  ax2 = ax.twinx()
  ax2.plot([r["layer"] for r in layers], [r["mean_relative_delta"] for r in layers], "s--",
           color="tab:green", label="mean ||delta|| / ||h_in||")
  ax.set_xlabel("layer")
  ax.set_title("residual update size")
  ax.legend(loc="upper left", fontsize=7)
  ax2.legend(loc="lower right", fontsize=7)
  ax = axes[1, 0]
  # AUROC, not F1: with most tokens settled, F1 mostly restates the base rate.
  label = study.metadata.get("exit_label", study.metadata["labels"][0])
  if label not in study.metadata["labels"]:
    label = study.metadata["labels"][0]
  names = list(dict.fromkeys(r["predictor"] for r in study.rows if r["label"] == label))
  for name in names:
    rows = [r for r in study.rows if r["label"] == label and r["predictor"] == name]
    ax.plot([r["layer"] for r in rows], [r["auroc"] for r in rows], marker="o", ms=3,
            color=plt.cm.tab10(names.index(name.removesuffix("_balanced")) % 10),
            ls="--" if name.endswith("_balanced") else "-", label=name)
  ax.axhline(0.5, color="black", ls=":", label="chance")
  ax.set_xticks(xs, [f"layer {x}" for x in xs])
  ax.set_title(f"held-out AUROC of 'settled', label `{label}`")
  ax.legend(fontsize=6, ncol=2)
  ax = axes[1, 1]
  per_rank = an["topk"]["per_rank"]
  ax.bar([r["k"] for r in per_rank], [r["mean"] for r in per_rank])
  ax.set_xlabel("rank k")
  ax.set_ylabel("mean settle layer")
  ax.set_title(f"top-k settling; top-1 first for {100 * an['topk']['top1_first']:.1f}%")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write_report(study: ProbeStudy, out_dir: str) -> dict[str, str]:
  """Writes probe.md, probe.csv (per-transition rows), probe.json and probe.png."""
  import csv

  checkpoint.ensure_writable(out_dir)
  paths = {ext: os.path.join(out_dir, f"probe.{ext}") for ext in ("md", "csv", "json", "png")}
  with open(paths["md"], "w") as f:
    f.write(markdown(study))
  with open(paths["csv"], "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(study.rows[0]))
    writer.writeheader()
    writer.writerows(study.rows)
  checkpoint.write_json(paths["json"], to_json(study))
  plot(study, paths["png"])
  return paths


# ----------------------------------------------------------------------------------------
# The `deepexit-probe` pipeline and binary.


def run_probes(checkpoint_dir: str, out_dir: str, *, tokens: int = DEFAULT_TOKENS,
               probe_dir: str | None = None, collection_path: str | None = None,
               labels: Sequence[str] = LABELS, predictors: Sequence[str] = PREDICTORS,
               balance: Sequence[bool] = (False, True), fit_fraction: float = 0.75,
               fit: FitConfig = FitConfig(), exit_label: str = "final", top_k: int = 5,
               skip_chars: int | None = None, data_dir: str | None = None) -> ProbeStudy:
  """Collects (or reloads), fits, scores, writes the reports and saves the probes.

  Args:
    checkpoint_dir: a `deepexit-train` workdir.
    out_dir: receives probe.md/csv/json/png.
    tokens: token budget M of validation text.
    probe_dir: where the fitted probes go (`<label>/<predictor>/` and `best/`);
      default OUT/probes.
    collection_path: .npz of the collected layers; reused when it holds the same
      checkpoint, text and budget, else (re)written. None: OUT/collection.npz.
    labels, predictors, balance, fit_fraction, fit, exit_label: see `run_study`.
    top_k: ranks kept per layer.
    skip_chars, data_dir: see `text_batches`.

  Returns:
    The `ProbeStudy` (its probes are saved under `probe_dir`).
  """
  from deepexit_jax import sweep

  checkpoint.ensure_writable(out_dir)
  probe_dir = probe_dir or os.path.join(out_dir, "probes")
  collection_path = collection_path or os.path.join(out_dir, "collection.npz")
  ckpt, batches, meta = text_batches(checkpoint_dir, skip_chars=skip_chars, data_dir=data_dir)
  meta.update(tokens=int(tokens), top_k=int(top_k),
              params_sha256=sweep.params_digest(ckpt.model))
  col = None
  if os.path.exists(collection_path):
    old = Collection.load(collection_path)
    same = ("params_sha256", "tokens", "top_k", "text")
    if all(old.metadata.get(k) == meta[k] for k in same):
      col = old
  if col is None:
    col = collect(ckpt.model, batches, tokens, top_k=top_k, metadata=meta)
    col.save(collection_path)
  study = run_study(col, labels=labels, predictors=predictors, balance=balance,
                    fit_fraction=fit_fraction, fit=fit, exit_label=exit_label)
  study.metadata["collection"] = os.path.abspath(collection_path)
  study.metadata["probe_dir"] = os.path.abspath(probe_dir)
  summary = {(s["label"], s["predictor"]): s for s in study.summary}
  for name, probe in study.probes.items():
    label, predictor = name.split("/")
    save_probe(probe, os.path.join(probe_dir, label, predictor),
               extra={"heldout_mean": summary[(label, predictor)],
                      "checkpoint": meta["checkpoint_abspath"]})
  if study.best:
    label, predictor = study.best.split("/")
    save_probe(study.probes[study.best], os.path.join(probe_dir, "best"),
               extra={"name": study.best, "heldout_mean": summary[(label, predictor)],
                      "checkpoint": meta["checkpoint_abspath"]})
  write_report(study, out_dir)
  return study


def run() -> None:
  """The `deepexit-probe` binary; flags are defined here so importing stays flag-free."""
  from absl import flags

  from deepexit_jax import cli

  ckpt_flag = flags.DEFINE_string("checkpoint", None, "Workdir of a deepexit-train run.")
  tokens_flag = flags.DEFINE_integer("tokens", DEFAULT_TOKENS,
                                     "Validation tokens to collect (the budget M).")
  out_flag = flags.DEFINE_string("out", None, "Output directory (default CHECKPOINT/probe).")
  probes_flag = flags.DEFINE_string("probe_dir", None, "Where fitted probes go "
                                    "(default OUT/probes; OUT/probes/best is the best).")
  collection_flag = flags.DEFINE_string("collection", None, "The .npz of collected layers "
                                        "(default OUT/collection.npz; reused if it matches).")
  labels_flag = flags.DEFINE_list("labels", list(LABELS), "Labels to study.")
  predictors_flag = flags.DEFINE_list("predictors", list(PREDICTORS), "Predictors to fit.")
  balance_flag = flags.DEFINE_list("balance", ["none", "balanced"],
                                   "Loss weighting of learned probes: none and/or balanced.")
  exit_label_flag = flags.DEFINE_enum("exit_label", "final", list(LABELS),
                                      "Label whose best probe is saved as OUT/probes/best.")
  fit_fraction_flag = flags.DEFINE_float("fit_fraction", 0.75, "Leading share of the "
                                         "tokens used for fitting; the rest is held out.")
  hidden_flag = flags.DEFINE_integer("hidden", FitConfig.hidden, "MLP hidden width.")
  epochs_flag = flags.DEFINE_integer("max_epochs", FitConfig.max_epochs, "Epochs at most.")
  seed_flag = flags.DEFINE_integer("seed", 0, "Probe initialisation and data-order seed.")
  top_k_flag = flags.DEFINE_integer("top_k", 5, "Ranks kept per layer (top-k settling).")
  skip_flag = flags.DEFINE_integer("skip_chars", None, "Validation characters to skip "
                                   "(default: the run's data.val_chars, which sweeps use).")
  data_flag = flags.DEFINE_string("data_dir", None, "Override the run's data.data_dir.")

  def main(argv):
    del argv
    if not ckpt_flag.value:
      raise UserError("--checkpoint is required: the --workdir of a deepexit-train run")
    bad = [b for b in balance_flag.value if b not in ("none", "balanced")]
    if bad or not balance_flag.value:
      raise UserError(f"--balance={','.join(balance_flag.value)}: give none and/or balanced")
    cli.log_devices()
    out = out_flag.value or os.path.join(ckpt_flag.value, "probe")
    study = run_probes(
        ckpt_flag.value, out, tokens=tokens_flag.value, probe_dir=probes_flag.value,
        collection_path=collection_flag.value, labels=labels_flag.value,
        predictors=predictors_flag.value,
        balance=tuple(b == "balanced" for b in balance_flag.value),
        fit_fraction=fit_fraction_flag.value,
        fit=FitConfig(hidden=hidden_flag.value, max_epochs=epochs_flag.value,
                      seed=seed_flag.value),
        exit_label=exit_label_flag.value, top_k=top_k_flag.value, skip_chars=skip_flag.value,
        data_dir=data_flag.value)
    print(markdown(study))
    print(f"wrote {out}/probe.{{md,csv,json,png}}; probes in {study.metadata['probe_dir']}"
          + (f" (best: {study.best} -> {study.metadata['probe_dir']}/best)"
             if study.best else ""))

  cli.run_main(main)


if __name__ == "__main__":
  run()
