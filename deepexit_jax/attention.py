"""Attention: causal self-attention for the forward pass and attention over a KV cache.

Shapes (suffixes on locals): B batch, T queries, S keys, R new rows, H heads, K head width.

`causal_attention` picks its implementation at trace time (`attention_implementation`):
  chunked  ours, written out (einsum + mask + softmax) with a FlashAttention-style
           custom VJP and query chunks that skip most masked scores: the CPU path, and
           every path with an explicit mask (KV caches);
  cudnn    `jax.nn.dot_product_attention(implementation="cudnn")`, the fused flash
           kernel, on GPUs when it supports the dtype and head width (float16/bfloat16,
           K <= 128 and a multiple of 8);
  xla      `jax.nn.dot_product_attention(implementation="xla")`: other GPU cases and TPUs
           (XLA:TPU fuses it).
`DEEPEXIT_ATTENTION=chunked|xla|cudnn` forces one (`cudnn` falls back to `xla` where
jax refuses it). Outputs and gradients of `xla` equal ours (tested on CPU); the GPU and
TPU paths are untested here (BUILD_NOTES.md).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

Array = jax.Array

# Names of the residuals the custom-VJP attention saves (see `_attend`); the fused paths
# name their output the same, so the "attention" remat policy keeps it there too.
ATTENTION_RESIDUALS = ("attention_out", "attention_lse")
IMPLEMENTATIONS = ("chunked", "xla", "cudnn")
ENV_VAR = "DEEPEXIT_ATTENTION"


def attention_implementation(dtype, head_dim: int, backend: str | None = None) -> str:
  """Which implementation `causal_attention` uses (module docstring), decided at trace time.

  Args:
    dtype: the queries' dtype.
    head_dim: K.
    backend: `jax.default_backend()` unless given.

  Returns:
    "chunked", "xla" or "cudnn".
  """
  forced = os.environ.get(ENV_VAR, "")
  if forced:
    if forced not in IMPLEMENTATIONS:
      raise ValueError(f"{ENV_VAR}={forced!r}: choose from {', '.join(IMPLEMENTATIONS)}")
    return forced
  backend = backend or jax.default_backend()
  if backend == "gpu" or backend == "cuda":
    cudnn_ok = (jnp.dtype(dtype) in (jnp.float16, jnp.bfloat16) and head_dim <= 128
                and head_dim % 8 == 0)
    return "cudnn" if cudnn_ok else "xla"
  if backend == "tpu":
    return "xla"
  return "chunked"


def _fused_causal(q_BTHK: Array, k_BSHK: Array, v_BSHK: Array, implementation: str) -> Array:
  """Causal attention through `jax.nn.dot_product_attention`."""
  def attend(impl):
    return jax.nn.dot_product_attention(q_BTHK, k_BSHK, v_BSHK, is_causal=True,
                                        implementation=impl)
  if implementation == "cudnn":
    try:
      out_BTHK = attend("cudnn")
    except (ValueError, NotImplementedError, RuntimeError):  # Shapes/dtype cuDNN refuses.
      out_BTHK = attend("xla")
  else:
    out_BTHK = attend("xla")
  return checkpoint_name(out_BTHK, ATTENTION_RESIDUALS[0])


def cached_attention(q_BRHK: Array, k_BRHK: Array, v_BRHK: Array, k_BSHK: Array,
                     v_BSHK: Array, cache_mask_BRS: Array, new_mask_BRR: Array) -> Array:
  """Softmax attention of R new rows over [cache; new rows], without concatenating the cache.

  Args:
    q_BRHK, k_BRHK, v_BRHK: the new rows' queries, keys and values.
    k_BSHK, v_BSHK: the cache.
    cache_mask_BRS, new_mask_BRR: bool masks ([B or 1, R, S], [B or 1, R, R]).

  Returns:
    [B, R, H, K] attention outputs.
  """
  s = k_BSHK.shape[1]
  scale = jnp.sqrt(jnp.asarray(q_BRHK.shape[-1], q_BRHK.dtype))
  scores_BHRX = jnp.concatenate([jnp.einsum("brhk,bshk->bhrs", q_BRHK, k_BSHK),
                                 jnp.einsum("brhk,bshk->bhrs", q_BRHK, k_BRHK)], -1) / scale
  lead, r = max(cache_mask_BRS.shape[0], new_mask_BRR.shape[0]), q_BRHK.shape[1]
  mask_BRX = jnp.concatenate([jnp.broadcast_to(cache_mask_BRS, (lead, r, s)),
                              jnp.broadcast_to(new_mask_BRR, (lead, r, r))], -1)
  scores_BHRX = jnp.where(mask_BRX[:, None], scores_BHRX, jnp.finfo(scores_BHRX.dtype).min)
  p_BHRX = jax.nn.softmax(scores_BHRX, axis=-1)
  return (jnp.einsum("bhrs,bshk->brhk", p_BHRX[..., :s], v_BSHK)
          + jnp.einsum("bhrs,bshk->brhk", p_BHRX[..., s:], v_BRHK))


def causal_attention(q_BTHK: Array, k_BSHK: Array, v_BSHK: Array,
                     mask_BTS: Array | None = None, chunks: int = 1) -> Array:
  """Softmax attention of T queries over S keys; causal (query i sees keys <= i) by default.

  Causal attention with T = S goes through `jax.nn.dot_product_attention` where the
  backend has a fused kernel (`attention_implementation`); a mask, and CPUs, use ours.

  Args:
    q_BTHK: queries. k_BSHK, v_BSHK: keys and values.
    mask_BTS: optional boolean mask replacing the causal one (e.g. a KV cache).
    chunks: causal attention on the chunked path only: split the queries into this
      many blocks, each attending only to the keys it can see, which skips most masked
      scores (about a quarter of the attention work for 2 blocks). Same outputs up to
      float rounding.

  Returns:
    [B, T, H, K] attention outputs.
  """
  t = q_BTHK.shape[1]
  if mask_BTS is None and q_BTHK.shape[1] == k_BSHK.shape[1]:
    implementation = attention_implementation(q_BTHK.dtype, q_BTHK.shape[-1])
    if implementation != "chunked":
      return _fused_causal(q_BTHK, k_BSHK, v_BSHK, implementation)
  if mask_BTS is not None or chunks <= 1 or t < 2 * chunks:
    mask_BTS = _causal_mask(0, t, k_BSHK.shape[1]) if mask_BTS is None else mask_BTS
    return _attend(q_BTHK, k_BSHK, v_BSHK, mask_BTS)
  bounds = [round(i * t / chunks) for i in range(chunks + 1)]
  return jnp.concatenate([
      _attend(q_BTHK[:, lo:hi], k_BSHK[:, :hi], v_BSHK[:, :hi], _causal_mask(lo, hi, hi))
      for lo, hi in zip(bounds[:-1], bounds[1:])], axis=1)


def _causal_mask(lo: int, hi: int, s: int) -> Array:
  """[1, hi - lo, s] mask: query at position lo + i sees keys 0..lo + i."""
  return (jnp.arange(lo, hi)[:, None] >= jnp.arange(s)[None, :])[None]


def _scores(q_BTHK: Array, k_BSHK: Array, mask_BTS: Array) -> Array:
  """Masked attention logits [B, H, T, S] in float32 (masked entries: the float32 minimum)."""
  scores_BHTS = jnp.einsum("bthk,bshk->bhts", q_BTHK, k_BSHK) / jnp.sqrt(
      jnp.asarray(q_BTHK.shape[-1], q_BTHK.dtype))
  # The softmax runs in float32 whatever the compute dtype (no-op for float32).
  scores_BHTS = scores_BHTS.astype(jnp.float32)
  return jnp.where(mask_BTS[:, None], scores_BHTS, jnp.finfo(jnp.float32).min)


@jax.custom_vjp
def _attend(q_BTHK: Array, k_BSHK: Array, v_BSHK: Array, mask_BTS: Array) -> Array:
  """softmax(q k^T / sqrt(K), masked) v, with a flash-attention-style backward pass.

  The forward pass saves only the output and each row's log-normaliser (lse), not
  the [B, H, T, S] probabilities; the backward pass recomputes the probabilities
  as exp(scores - lse), one pass with no max or sum reduction, and uses
  rowsum(dO * O) instead of rowsum(dP * P) (Dao et al., FlashAttention). Both
  residuals carry `checkpoint_name`s, so the "attention" remat policy keeps them
  while the rest of the layer is recomputed. Gradients equal autodiff of the
  plain softmax to float rounding (tested).
  """
  return _attend_fwd(q_BTHK, k_BSHK, v_BSHK, mask_BTS)[0]


def _attend_fwd(q_BTHK, k_BSHK, v_BSHK, mask_BTS):
  scores_BHTS = _scores(q_BTHK, k_BSHK, mask_BTS)
  max_BHT1 = jnp.max(scores_BHTS, axis=-1, keepdims=True)
  exp_BHTS = jnp.exp(scores_BHTS - max_BHT1)
  sum_BHT1 = jnp.sum(exp_BHTS, axis=-1, keepdims=True)
  out_BTHK = jnp.einsum("bhts,bshk->bthk", (exp_BHTS / sum_BHT1).astype(v_BSHK.dtype), v_BSHK)
  out_BTHK = checkpoint_name(out_BTHK, ATTENTION_RESIDUALS[0])
  lse_BHT = checkpoint_name((max_BHT1 + jnp.log(sum_BHT1))[..., 0], ATTENTION_RESIDUALS[1])
  return out_BTHK, (q_BTHK, k_BSHK, v_BSHK, mask_BTS, out_BTHK, lse_BHT)


def _attend_bwd(residuals, dout_BTHK):
  q_BTHK, k_BSHK, v_BSHK, mask_BTS, out_BTHK, lse_BHT = residuals
  probs_BHTS = jnp.exp(_scores(q_BTHK, k_BSHK, mask_BTS) - lse_BHT[..., None])
  dout_BTHK = dout_BTHK.astype(v_BSHK.dtype)
  dv_BSHK = jnp.einsum("bhts,bthk->bshk", probs_BHTS.astype(v_BSHK.dtype), dout_BTHK)
  dprobs_BHTS = jnp.einsum("bthk,bshk->bhts", dout_BTHK, v_BSHK).astype(jnp.float32)
  # rowsum(dP * P) = rowsum(dO * O): [B, T, H, K] instead of [B, H, T, S] work.
  delta_BHT = jnp.einsum("bthk,bthk->bht", dout_BTHK.astype(jnp.float32),
                         out_BTHK.astype(jnp.float32))
  dscores_BHTS = probs_BHTS * (dprobs_BHTS - delta_BHT[..., None]) / jnp.sqrt(
      jnp.asarray(q_BTHK.shape[-1], jnp.float32))
  dscores_BHTS = dscores_BHTS.astype(q_BTHK.dtype)
  dq_BTHK = jnp.einsum("bhts,bshk->bthk", dscores_BHTS, k_BSHK)
  dk_BSHK = jnp.einsum("bhts,bthk->bshk", dscores_BHTS, q_BTHK)
  return dq_BTHK, dk_BSHK, dv_BSHK, None


_attend.defvjp(_attend_fwd, _attend_bwd)
