"""An independent float64 NumPy forward pass of the deep-supervision Transformer.

Written from the architecture's definition, not from `deepexit_jax.model`: it reads only
the parameter arrays (by name) and never calls the package's modules, so a bug in the
block code (a wrong LayerNorm, a missing bias, a non-causal mask, the wrong GELU) shows
up as a disagreement instead of being reproduced.

Architecture (per layer l = 1..N, pre-LayerNorm, residual stream h):
  h_0   = E[token] + P[position]                  (learned positions)
  a     = LN1(h) -> QKV projection -> causal multi-head softmax(q k^T / sqrt(K)) v
  h'    = h + a W_o + b_o
  h_l   = h' + GELU_tanh(LN2(h') W_1 + b_1) W_2 + b_2
  logits_l = LN_f(h_l) U + u                      (one shared exit head; U = E^T if tied)
LayerNorm: (x - mean) / sqrt(var + 1e-6) * scale + bias, variance over the last axis.
GELU: the tanh approximation (jax.nn.gelu's default).
"""

from __future__ import annotations

import numpy as np

LN_EPS = 1e-6  # flax.nnx.LayerNorm's default epsilon


def params64(model) -> dict:
  """The model's parameters as a nested dict of float64 NumPy arrays (names as in nnx)."""
  from flax import nnx

  def convert(tree):
    if isinstance(tree, dict):
      return {k: convert(v) for k, v in tree.items()}
    return np.asarray(tree, np.float64)

  return convert(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def layer_norm(x, p):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + LN_EPS) * p["scale"] + p["bias"]


def dense(x, p):
  return x @ p["kernel"] + p["bias"]


def gelu_tanh(x):
  return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def layer_params(params: dict, i: int) -> dict:
  """Block i's (0-based) parameters, sliced from the stacked [N, ...] arrays."""
  return {name: {k: v[i] for k, v in sub.items()} for name, sub in params["blocks"].items()}


def head(params: dict, h, tied: bool):
  x = layer_norm(h, params["final_norm"])
  if tied:
    return x @ params["embed"]["embedding"].T
  return dense(x, params["unembed"])


def embed(params: dict, tokens_BT, positions_T=None):
  t = tokens_BT.shape[-1]
  positions_T = np.arange(t) if positions_T is None else positions_T
  return params["embed"]["embedding"][tokens_BT] + params["pos_embed"][positions_T]


def attention(q_BTHK, k_BSHK, v_BSHK, mask_TS):
  """softmax(q k^T / sqrt(K)) v over the keys where mask is True."""
  scores = np.einsum("bthk,bshk->bhts", q_BTHK, k_BSHK) / np.sqrt(q_BTHK.shape[-1])
  scores = np.where(mask_TS[None, None], scores, -np.inf)
  scores = np.exp(scores - scores.max(-1, keepdims=True))
  probs = scores / scores.sum(-1, keepdims=True)
  return np.einsum("bhts,bshk->bthk", probs, v_BSHK)


def block(p: dict, h_BTD, num_heads: int, cache=None):
  """One block over T new positions; `cache` = (keys, values) [B, S, H, K] of the S
  positions before them (None: no earlier positions). Returns (h_out, keys, values) with
  the keys/values of all S + T positions."""
  b, t, d = h_BTD.shape
  q, k, v = np.split(dense(layer_norm(h_BTD, p["ln1"]), p["qkv"]), 3, axis=-1)
  q, k, v = (x.reshape(b, t, num_heads, d // num_heads) for x in (q, k, v))
  if cache is not None:
    k = np.concatenate([cache[0], k], 1)
    v = np.concatenate([cache[1], v], 1)
  s = k.shape[1]
  pos_T = np.arange(s - t, s)
  mask_TS = pos_T[:, None] >= np.arange(s)[None, :]
  att = attention(q, k, v, mask_TS).reshape(b, t, d)
  h = h_BTD + dense(att, p["attn_out"])
  h = h + dense(gelu_tanh(dense(layer_norm(h, p["ln2"]), p["fc1"])), p["fc2"])
  return h, k, v


def all_layer_logits(model, tokens_BT) -> np.ndarray:
  """[N, B, T, V] float64 logits of every layer's exit, index 0 = layer 1."""
  cfg = model.config
  params = params64(model)
  h = embed(params, np.asarray(tokens_BT))
  out = []
  for i in range(cfg.num_layers):
    h, _, _ = block(layer_params(params, i), h, cfg.num_heads)
    out.append(head(params, h, cfg.tie_embeddings))
  return np.stack(out)


def decode_full_depth(model, tokens_BT) -> np.ndarray:
  """[B, T, V] full-depth logits computed one position at a time with a KV cache per
  layer (the incremental decoder's algorithm, at full depth)."""
  cfg = model.config
  params = params64(model)
  tokens_BT = np.asarray(tokens_BT)
  b, t = tokens_BT.shape
  caches = [None] * cfg.num_layers
  out = []
  for pos in range(t):
    h = embed(params, tokens_BT[:, pos:pos + 1], np.array([pos]))
    for i in range(cfg.num_layers):
      h, k, v = block(layer_params(params, i), h, cfg.num_heads, caches[i])
      caches[i] = (k, v)
    out.append(head(params, h, cfg.tie_embeddings)[:, 0])
  return np.stack(out, 1)
