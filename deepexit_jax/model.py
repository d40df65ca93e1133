"""Deep-supervision decoder Transformer: every layer feeds one shared exit head.

Shapes are named once here and used as suffixes on locals:
  N layers, B batch, T time (sequence), D model width, F ffn width, H heads,
  G key/value heads (grouped-query attention; G = H by default), K head width (D / H),
  V vocabulary.

Architecture options (`ModelConfig`; the defaults are the original GPT-2-style block, so
every older config and checkpoint computes the same numbers): LayerNorm or RMSNorm,
learned positions or rotary embeddings (RoPE, Hugging Face's rotate-half convention,
Llama-3 frequency scaling), a GELU or SwiGLU MLP, G < H key/value heads, biases per
projection group, tied or untied unembedding. Together they cover Llama- and
GPT-2-family checkpoints (`deepexit_jax.pretrained`).

All layers run inside ONE `jax.lax.scan` over stacked block parameters, so the
compile time does not grow with the number of layers. The scan body is
pluggable (`DeepSupervisionTransformer.scan_layers`): the plain forward pass,
the exit engine's state-copy policy and the probe collection all reuse the same
scan with their own per-layer function, instead of re-implementing the layer loop.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepexit_jax import validation
from deepexit_jax.attention import ATTENTION_RESIDUALS, cached_attention, causal_attention
from deepexit_jax.errors import UserError

Array = jax.Array

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "attention": jax.checkpoint_policies.save_only_these_names(*ATTENTION_RESIDUALS),
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
COMPUTE_DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}
PARAM_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
NORMS = ("layernorm", "rmsnorm")
POSITIONS = ("learned", "rope")
MLPS = ("gelu", "swiglu")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of a `DeepSupervisionTransformer`.

  Attributes:
    vocab_size: number of token ids (V).
    num_layers: number of Transformer blocks (N); every one has an exit.
    dim: model width (D).
    num_heads: attention heads (H); must divide `dim`.
    ffn_dim: MLP hidden width (F); None means 4 * dim.
    max_len: longest sequence the learned positional embedding supports.
    dropout: residual dropout rate during training, in [0, 1).
    tie_embeddings: if True the unembedding is the transposed input embedding.
    remat: rematerialisation of each layer inside the scan, one of `REMAT_POLICIES`:
      "none" stores every intermediate for the backward pass; "full" stores only
      the layer inputs and recomputes the rest; "attention" also keeps each
      layer's attention output and softmax log-normaliser ([B, T, D] + [B, H, T]),
      so the backward pass recomputes the cheap projections but not the
      attention forward; "dots" keeps matmul outputs; "dots_no_batch" keeps the
      weight matmuls but recomputes attention.
    attention_chunks: causal attention in this many query blocks, each computing
      only the scores it can see (see `causal_attention`); 1 = one T x T block.
    dtype: compute dtype of the matmuls, "float32" or "bfloat16" (mixed
      precision: parameters (unless `param_dtype`), LayerNorms, the residual stream,
      attention softmax, logits and the loss stay float32).
    norm: "layernorm" (GPT-2) or "rmsnorm" (Llama) for both block norms and the
      exit head's final norm.
    norm_eps: the norms' epsilon (flax's 1e-6 by default; GPT-2 1e-5, Llama its
      `rms_norm_eps`).
    positions: "learned" (a [max_len, D] embedding added to the tokens) or "rope"
      (rotary embeddings on queries and keys; max_len then only bounds sequences
      and the decoders' KV caches).
    rope_theta: RoPE base frequency.
    rope_scaling: Llama-3 frequency scaling factor (Llama 3.1/3.2's `rope_scaling`
      with rope_type "llama3"); 1.0 = none. With it: rope_low_freq_factor,
      rope_high_freq_factor, rope_original_max_len.
    mlp: "gelu" (fc2(gelu_tanh(fc1 x))) or "swiglu" (fc2(silu(gate x) * up x), the
      gate and up projections stacked in fc1's kernel as [gate | up]).
    num_kv_heads: key/value heads G (grouped-query attention); must divide
      num_heads; None = num_heads. Decoders' caches hold G heads.
    attention_bias: biases on the QKV and output projections.
    mlp_bias: biases on the MLP projections.
    unembed_bias: a bias on the untied unembedding (Llama and GPT-2 have none).
    param_dtype: storage dtype of every parameter, "float32" or "bfloat16" (half the
      memory, e.g. for a large imported model; for inference: the residual stream,
      norms' arithmetic, softmax and logits still run in float32 (`dtype` decides the
      matmuls), but training would update bf16 weights).
  """

  vocab_size: int
  num_layers: int
  dim: int
  num_heads: int
  ffn_dim: int | None = None
  max_len: int = 128
  dropout: float = 0.0
  tie_embeddings: bool = False
  remat: str = "none"
  attention_chunks: int = 2
  dtype: str = "float32"
  norm: str = "layernorm"
  norm_eps: float = 1e-6
  positions: str = "learned"
  rope_theta: float = 10000.0
  rope_scaling: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_len: int = 8192
  mlp: str = "gelu"
  num_kv_heads: int | None = None
  attention_bias: bool = True
  mlp_bias: bool = True
  unembed_bias: bool = True
  param_dtype: str = "float32"

  def __post_init__(self):
    for name in ("vocab_size", "num_layers", "dim", "num_heads", "max_len", "attention_chunks"):
      validation.check_int(f"model.{name}", getattr(self, name), 1)
    if self.dim % self.num_heads:
      raise UserError(
          f"model.num_heads={self.num_heads} must divide model.dim={self.dim}: "
          "choose a head count that divides the width")
    validation.check_int("model.ffn_dim", self.ffn_dim, 1, none_means="(4 * dim)")
    validation.check_float("model.dropout", self.dropout, 0.0, 1.0, high_open=True)
    for name, choices in (("remat", REMAT_POLICIES), ("dtype", COMPUTE_DTYPES),
                          ("param_dtype", PARAM_DTYPES), ("norm", NORMS),
                          ("positions", POSITIONS), ("mlp", MLPS)):
      validation.check_choice(f"model.{name}", getattr(self, name), list(choices))
    for name in ("norm_eps", "rope_theta"):
      value = getattr(self, name)
      validation.require(validation.is_number(value) and value > 0, f"model.{name}", value,
                         "be a number > 0")
    for name in ("attention_bias", "mlp_bias", "unembed_bias"):
      value = getattr(self, name)
      validation.require(isinstance(value, bool), f"model.{name}", value, "be True or False")
    kv = self.num_kv_heads
    validation.require(
        kv is None or (validation.is_int(kv) and kv >= 1 and self.num_heads % kv == 0),
        "model.num_kv_heads", kv, f"be an integer >= 1 that divides model.num_heads="
        f"{self.num_heads} (or None for one key/value head per head)")
    if self.positions == "rope":
      if self.head_dim % 2:
        raise UserError(
            f"model.positions='rope' needs an even head width, but dim / num_heads = "
            f"{self.head_dim}: change model.dim or model.num_heads")
      validation.require(validation.is_number(self.rope_scaling) and self.rope_scaling >= 1,
                         "model.rope_scaling", self.rope_scaling,
                         "be a number >= 1 (1 = no scaling)")
      if self.rope_scaling > 1 and not (
          0 < self.rope_low_freq_factor < self.rope_high_freq_factor
          and validation.is_int(self.rope_original_max_len)
          and self.rope_original_max_len >= 1):
        raise UserError(
            "model.rope_low_freq_factor, rope_high_freq_factor, rope_original_max_len must "
            "satisfy 0 < low < high and an integer length >= 1, got "
            f"{self.rope_low_freq_factor!r}, {self.rope_high_freq_factor!r}, "
            f"{self.rope_original_max_len!r}: copy them from the checkpoint's rope_scaling")

  @property
  def compute_dtype(self) -> Any:
    """The matmul dtype handed to `nnx.Linear` (None = float32, the parameters' own)."""
    return COMPUTE_DTYPES[self.dtype]

  @property
  def parameter_dtype(self) -> Any:
    """The dtype every parameter is stored in (`param_dtype`)."""
    return PARAM_DTYPES[self.param_dtype]

  @property
  def ffn_width(self) -> int:
    return self.ffn_dim if self.ffn_dim is not None else 4 * self.dim

  @property
  def head_dim(self) -> int:
    return self.dim // self.num_heads

  @property
  def kv_heads(self) -> int:
    """Key/value heads G (`num_kv_heads`, or one per query head)."""
    return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

  @property
  def ffn_matrices(self) -> int:
    """Weight matrices of the MLP: 2 (GELU), 3 (SwiGLU's gate, up and down)."""
    return 3 if self.mlp == "swiglu" else 2

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def architecture(self) -> dict[str, Any]:
    """`to_dict()` without `EXECUTION_FIELDS`: two configs with equal architectures have
    the same parameters and compute the same function (a checkpoint of one loads, and a
    run of one resumes, under the other)."""
    return {k: v for k, v in self.to_dict().items() if k not in EXECUTION_FIELDS}


# Fields that change how a model computes (memory, speed), not what: float rounding aside,
# outputs and gradients do not depend on them (tested).
EXECUTION_FIELDS = ("remat", "attention_chunks")


@flax.struct.dataclass
class ModelOutput:
  """What one forward pass returns.

  Attributes:
    embed_BTD: token + position embedding, the input of layer 1 (h_in of layer 1).
    hidden_NBTD: output of every layer; index 0 is layer 1.
    per_layer: stacked (leading axis N) result of the per-layer function, by
      default the exit head's logits [N, B, T, V]; large-vocabulary callers pass
      a function that returns small summaries instead.
  """

  embed_BTD: Array
  hidden_NBTD: Array
  per_layer: Any


def _dropout(x: Array, rate: float, key: Array | None) -> Array:
  if key is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0.0)


def rope_frequencies(config: ModelConfig) -> np.ndarray:
  """RoPE inverse frequencies [K / 2] (float32), with Llama-3 scaling if configured.

  theta^(-2i / K) for i < K / 2 (Hugging Face's `_compute_default_rope_parameters`); with
  `rope_scaling` s > 1 (`_compute_llama3_parameters`): wavelengths longer than
  original_max_len / low_freq_factor are divided by s, those shorter than
  original_max_len / high_freq_factor kept, and the band between interpolated.
  """
  k = config.head_dim
  inv = 1.0 / (config.rope_theta ** (np.arange(0, k, 2, dtype=np.float32) / np.float32(k)))
  inv = inv.astype(np.float32)
  if config.rope_scaling > 1:
    s, lo, hi = config.rope_scaling, config.rope_low_freq_factor, config.rope_high_freq_factor
    old = config.rope_original_max_len
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > old / lo, inv / s, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
    inv = np.where(medium, (1 - smooth) * scaled / s + smooth * scaled, scaled)
  return inv.astype(np.float32)


def apply_rope(x_BTHK: Array, positions_BT: Array, inv_freq: np.ndarray) -> Array:
  """Rotary embedding, rotate-half convention (the first and second halves of each head
  are the pair rotated together, as in Hugging Face Llama), computed in float32.

  Args:
    x_BTHK: queries or keys. positions_BT: int positions ([B or 1, T]).
    inv_freq: `rope_frequencies` [K / 2].
  """
  angles_BT1F = (positions_BT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq))[:, :, None]
  cos, sin = jnp.cos(angles_BT1F), jnp.sin(angles_BT1F)
  x1, x2 = jnp.split(x_BTHK.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BTHK.dtype)


def make_norm(config: ModelConfig, rngs: nnx.Rngs) -> nnx.Module:
  """The configured normalisation over D (`config.norm`, `config.norm_eps`)."""
  if config.norm == "rmsnorm":
    return nnx.RMSNorm(config.dim, epsilon=config.norm_eps, param_dtype=config.parameter_dtype,
                       rngs=rngs)
  return nnx.LayerNorm(config.dim, epsilon=config.norm_eps, param_dtype=config.parameter_dtype,
                       rngs=rngs)


class Block(nnx.Module):
  """Pre-norm Transformer block: causal self-attention, then an MLP (see `ModelConfig`).

  Parameters: ln1, qkv (one [D, (H + 2G) K] kernel: queries, keys, values), attn_out,
  ln2, fc1 ([D, F], or [D, 2F] = [gate | up] for SwiGLU), fc2 ([F, D]).
  """

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    d, f, k = config.dim, config.ffn_width, config.head_dim
    init = nnx.initializers.normal(0.02)
    # Residual projections scaled down with depth (GPT-2), so deep stacks start stable.
    out_init = nnx.initializers.normal(0.02 / (2 * config.num_layers) ** 0.5)
    self.num_heads = config.num_heads
    self.num_kv_heads = config.kv_heads
    self.swiglu = config.mlp == "swiglu"
    # A tuple (hashable, part of the graph definition), not an array attribute.
    self.rope = (tuple(float(x) for x in rope_frequencies(config))
                 if config.positions == "rope" else None)
    self.dropout = config.dropout
    self.attention_chunks = config.attention_chunks
    self.ln1 = make_norm(config, rngs)
    dt, pdt = config.compute_dtype, config.parameter_dtype
    qkv_width = (config.num_heads + 2 * config.kv_heads) * k
    self.qkv = nnx.Linear(d, qkv_width, kernel_init=init, dtype=dt, param_dtype=pdt,
                          use_bias=config.attention_bias, rngs=rngs)
    self.attn_out = nnx.Linear(d, d, kernel_init=out_init, dtype=dt, param_dtype=pdt,
                               use_bias=config.attention_bias, rngs=rngs)
    self.ln2 = make_norm(config, rngs)
    self.fc1 = nnx.Linear(d, f * (2 if self.swiglu else 1), kernel_init=init, dtype=dt,
                          param_dtype=pdt, use_bias=config.mlp_bias, rngs=rngs)
    self.fc2 = nnx.Linear(f, d, kernel_init=out_init, dtype=dt, param_dtype=pdt,
                          use_bias=config.mlp_bias, rngs=rngs)

  def kv(self, h_BTD: Array, positions_BT: Array | None = None) -> tuple[Array, Array]:
    """Keys and values [B, T, G, K] this layer computes from its input states."""
    b, t, d = h_BTD.shape
    _, k_BTGK, v_BTGK = self._project(h_BTD.reshape(b * t, d), b, t, positions_BT)
    return k_BTGK, v_BTGK

  def copied_kv(self, h_BD: Array, t: Array) -> tuple[Array, Array]:
    """float32 keys/values [B, G, K] of the states h at position t ([] or [B]), without the
    query projection: what a layer the `copy` KV policy skips writes to its cache."""
    b, d = h_BD.shape
    k = d // self.num_heads
    x_BD = self.ln1(h_BD)
    start = self.num_heads * k
    kernel_DE = self.qkv.kernel[...][:, start:]
    if self.qkv.dtype is not None:
      x_BD, kernel_DE = x_BD.astype(self.qkv.dtype), kernel_DE.astype(self.qkv.dtype)
    kv_BE = x_BD @ kernel_DE
    if self.qkv.bias is not None:
      kv_BE = kv_BE + self.qkv.bias[...][start:].astype(kv_BE.dtype)
    k_B1GK, v_B1GK = (x.reshape(b, 1, self.num_kv_heads, k) for x in jnp.split(kv_BE, 2, -1))
    if self.rope is not None:
      k_B1GK = apply_rope(k_B1GK, jnp.reshape(t, (-1, 1)), np.asarray(self.rope, np.float32))
    return k_B1GK[:, 0].astype(jnp.float32), v_B1GK[:, 0].astype(jnp.float32)

  def _project(self, x_MD: Array, b: int, t: int, positions_BT: Array | None
               ) -> tuple[Array, Array, Array]:
    """Queries [B, T, H, K], keys and values [B, T, G, K] of the input rows x [B*T, D]
    (norm 1, QKV projection, rotary embedding at `positions_BT` [B or 1, T]; None means
    0..T-1)."""
    k = x_MD.shape[-1] // self.num_heads
    hk, gk = self.num_heads * k, self.num_kv_heads * k
    q_MX, k_MX, v_MX = jnp.split(self.qkv(self.ln1(x_MD)), [hk, hk + gk], axis=-1)
    q_BTHK = q_MX.reshape(b, t, self.num_heads, k)
    k_BTGK = k_MX.reshape(b, t, self.num_kv_heads, k)
    v_BTGK = v_MX.reshape(b, t, self.num_kv_heads, k)
    if self.rope is not None:
      if positions_BT is None:
        positions_BT = jnp.arange(t)[None]
      inv_freq = np.asarray(self.rope, np.float32)
      q_BTHK = apply_rope(q_BTHK, positions_BT, inv_freq)
      k_BTGK = apply_rope(k_BTGK, positions_BT, inv_freq)
    return q_BTHK, k_BTGK, v_BTGK

  def _heads(self, x_BSGK: Array) -> Array:
    """Grouped-query attention: key/value head g serves query heads g*H/G..(g+1)*H/G-1
    (Hugging Face's `repeat_kv`); the identity when G = H."""
    rep = self.num_heads // self.num_kv_heads
    return x_BSGK if rep == 1 else jnp.repeat(x_BSGK, rep, axis=2)

  def _residual(self, x_MD: Array, att_BTHK: Array, keys: tuple[Array | None, Array | None]
                ) -> Array:
    """The rest of the block after attention: output projection, residual, MLP, residual."""
    h_MD = x_MD + _dropout(self.attn_out(att_BTHK.reshape(x_MD.shape)), self.dropout, keys[0])
    up_MF = self.fc1(self.ln2(h_MD))
    if self.swiglu:
      gate_MF, up_MF = jnp.split(up_MF, 2, axis=-1)
      act_MF = jax.nn.silu(gate_MF) * up_MF
    else:
      act_MF = jax.nn.gelu(up_MF)
    return h_MD + _dropout(self.fc2(act_MF), self.dropout, keys[1])

  def __call__(self, h_BTD: Array, key: Array | None = None) -> Array:
    """Applies the block causally over the whole sequence (positions 0..T-1).

    Args:
      h_BTD: input hidden states.
      key: dropout PRNG key; None (evaluation) disables dropout.

    Returns:
      The block's output hidden states [B, T, D].
    """
    # Projections run on [B*T, D] matrices (M = B*T): XLA:CPU lowers 2-D dots, and
    # their gradients, to fast GEMMs, while 3-D ones were ~3x slower in the backward.
    b, t, d = h_BTD.shape
    keys = (None, None) if key is None else tuple(jax.random.split(key))
    x_MD = h_BTD.reshape(b * t, d)
    q_BTHK, k_BTGK, v_BTGK = self._project(x_MD, b, t, None)
    att_BTHK = causal_attention(q_BTHK, self._heads(k_BTGK), self._heads(v_BTGK),
                                chunks=self.attention_chunks)
    return self._residual(x_MD, att_BTHK, keys).reshape(b, t, d)

  def extend(self, h_BRD: Array, cache: tuple[Array, Array], cache_mask_BRS: Array,
             new_mask_BRR: Array, positions: Array | None = None
             ) -> tuple[Array, Array, Array]:
    """The block for R new rows against a KV cache: the cache-aware step of every decoder.

    Each row attends to the cache positions `cache_mask_BRS` allows and to the new rows
    `new_mask_BRR` allows (a row's own key/value comes from the rows, never the cache).
    The cache is only read; the rows' keys/values are returned for the caller to write
    (decoders choose when, see `deepexit_jax.decoding`). No dropout (inference).

    Args:
      h_BRD: the rows' input states.
      cache: (keys, values) [B, S, G, K] of this layer.
      cache_mask_BRS: bool [B or 1, R, S]: which cache positions each row sees.
      new_mask_BRR: bool [B or 1, R, R]: which new rows each row sees (itself included).
      positions: int [R] or [B, R]: the rows' positions (rotary embeddings need them;
        learned positions are added by `embed_tokens` and ignore them).

    Returns:
      (output states [B, R, D], float32 keys [B, R, G, K], float32 values [B, R, G, K]).
    """
    b, r, d = h_BRD.shape
    if self.rope is not None and positions is None:
      raise ValueError("Block.extend of a rotary-position model needs the rows' positions")
    positions_BR = None if positions is None else jnp.reshape(positions, (-1, r))
    x_MD = h_BRD.reshape(b * r, d)
    q_BRHK, k_BRGK, v_BRGK = self._project(x_MD, b, r, positions_BR)
    k_BSGK, v_BSGK = cache
    att_BRHK = cached_attention(q_BRHK, self._heads(k_BRGK), self._heads(v_BRGK),
                                self._heads(k_BSGK), self._heads(v_BSGK),
                                cache_mask_BRS, new_mask_BRR)
    f32 = jnp.float32  # Decoders keep float32 caches whatever the compute dtype.
    return (self._residual(x_MD, att_BRHK, (None, None)).reshape(b, r, d),
            k_BRGK.astype(f32), v_BRGK.astype(f32))

  def extend_one(self, h_BD: Array, cache: tuple[Array, Array], t: Array
                 ) -> tuple[Array, Array, Array]:
    """`extend` for one row per batch row at position t ([] or [B]): it sees cache
    positions < t and itself. The same attention, with the row's own key/value handled
    element-wise beside the cache, which is faster for R = 1; query heads are grouped
    by key/value head (U = H / G query heads per group), so the cache is never repeated.

    Returns:
      (output states [B, D], keys [B, G, K], values [B, G, K]).
    """
    b, d = h_BD.shape
    q_BHK, k_BGK, v_BGK = (x[:, 0] for x in self._project(h_BD, b, 1, jnp.reshape(t, (-1, 1))))
    k_BSGK, v_BSGK = cache
    s, g = k_BSGK.shape[1], self.num_kv_heads
    q_BGUK = q_BHK.reshape(b, g, self.num_heads // g, q_BHK.shape[-1])
    scale = jnp.sqrt(jnp.asarray(q_BHK.shape[-1], q_BHK.dtype))
    scores_BGUS = jnp.einsum("bguk,bsgk->bgus", q_BGUK, k_BSGK) / scale
    visible_B11S = (jnp.arange(s)[None] < jnp.reshape(t, (-1, 1)))[:, None, None]
    scores_BGUS = jnp.where(visible_B11S, scores_BGUS, jnp.finfo(scores_BGUS.dtype).min)
    self_BGU1 = jnp.sum(q_BGUK * k_BGK[:, :, None], -1, keepdims=True) / scale
    p_BGUX = jax.nn.softmax(jnp.concatenate([scores_BGUS, self_BGU1], -1), axis=-1)
    att_BGUK = (jnp.einsum("bgus,bsgk->bguk", p_BGUX[..., :s], v_BSGK)
                + p_BGUX[..., s:] * v_BGK[:, :, None])
    f32 = jnp.float32
    return (self._residual(h_BD, att_BGUK.reshape(q_BHK.shape), (None, None)),
            k_BGK.astype(f32), v_BGK.astype(f32))


# body(layer_index, h_in_BTD, h_out_BTD, carry) -> (h_next_BTD, carry, per_layer_output)
LayerBody = Callable[[Array, Array, Array, Any], tuple[Array, Any, Any]]


class DeepSupervisionTransformer(nnx.Module):
  """Decoder-only causal Transformer whose every layer has logits.

  One shared exit head (final norm + unembedding) is applied after every layer, the
  deep-supervision setup of CALM / LayerSkip / EE-LLM (for an imported pretrained
  model: its own final norm and LM head, LayerSkip's exit semantics).
  """

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.config = config
    init = nnx.initializers.normal(0.02)
    pdt = config.parameter_dtype
    self.embed = nnx.Embed(config.vocab_size, config.dim, embedding_init=init, param_dtype=pdt,
                           rngs=rngs)
    if config.positions == "learned":
      self.pos_embed = nnx.Param(init(rngs.params(), (config.max_len, config.dim), pdt))
    else:  # Rotary embeddings act inside the blocks.
      self.pos_embed = None

    @nnx.split_rngs(splits=config.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make_blocks(rngs: nnx.Rngs) -> Block:
      return Block(config, rngs=rngs)

    self.blocks = make_blocks(rngs)
    self.final_norm = make_norm(config, rngs)
    if config.tie_embeddings:
      self.unembed = None
    else:
      self.unembed = nnx.Linear(config.dim, config.vocab_size, kernel_init=init,
                                dtype=config.compute_dtype, param_dtype=pdt,
                                use_bias=config.unembed_bias, rngs=rngs)

  def embed_tokens(self, tokens_BT: Array, positions_BT: Array | None = None) -> Array:
    """Token + learned position embedding (rotary models: the token embedding; their
    positions enter in the blocks): the input of layer 1."""
    # float32 whatever `param_dtype` stores: the residual stream stays float32.
    if self.pos_embed is None:
      return self.embed(tokens_BT).astype(jnp.float32)
    if positions_BT is None:
      positions_BT = jnp.arange(tokens_BT.shape[-1])[None, :]
    return (self.embed(tokens_BT) + self.pos_embed[...][positions_BT]).astype(jnp.float32)

  def head(self, h_BTD: Array) -> Array:
    """The shared exit head: final norm, then the unembedding, to float32 logits."""
    *lead, d = h_BTD.shape
    x_MD = self.final_norm(h_BTD.reshape(-1, d))
    dt = self.config.compute_dtype
    if self.unembed is not None:
      logits_MV = self.unembed(x_MD)
    elif dt is None:
      logits_MV = self.embed.attend(x_MD)
    else:
      logits_MV = x_MD.astype(dt) @ self.embed.embedding[...].astype(dt).T
    return logits_MV.astype(jnp.float32).reshape(*lead, -1)

  def layer(self, index: int) -> Block:
    """Block `index` (0-based) as a stand-alone module (for loops and decoding)."""
    graphdef, state = nnx.split(self.blocks)
    return nnx.merge(graphdef, jax.tree.map(lambda x: x[index], state))

  def scan_layers(
      self,
      h_BTD: Array,
      body: LayerBody,
      carry: Any = None,
      *,
      dropout_rng: Array | None = None,
      layer_keep_NB: Array | None = None,
      use_scan: bool = True,
  ) -> tuple[Array, Any, Any]:
    """Runs every block in order, letting `body` decide what each layer keeps.

    Args:
      h_BTD: input of layer 1.
      body: `body(i, h_in, h_out, carry) -> (h_next, carry, out)` where `i` is the
        0-based layer index (a traced int), `h_out` the block's output and
        `h_next` what layer i+1 receives. `out` is stacked over layers.
      carry: extra state threaded through the layers.
      dropout_rng: PRNG key for dropout; None disables dropout.
      layer_keep_NB: layer dropout (LayerSkip), bool [N, B]: where False, sample
        b skips block i (its h_out is its h_in). Applied inside the scan, before
        `body` sees h_out; None (evaluation) runs every block.
      use_scan: True runs one `lax.scan`; False a Python loop (same results;
        kept as the readable reference and tested against the scan).

    Returns:
      (h of the last layer, final carry, stacked outputs with leading axis N).
    """
    n = self.config.num_layers
    keys_N2 = None if dropout_rng is None else jax.random.split(dropout_rng, n)
    graphdef, state = nnx.split(self.blocks)

    def step(c, xs):
      h_in, extra = c
      layer_state, i, key, keep_B = xs
      h_out = nnx.merge(graphdef, layer_state)(h_in, key)
      if keep_B is not None:
        h_out = jnp.where(keep_B[:, None, None], h_out, h_in)
      h_next, extra, out = body(i, h_in, h_out, extra)
      return (h_next, extra), out

    policy = REMAT_POLICIES[self.config.remat]
    if policy is not None:
      step = jax.checkpoint(step, policy=policy, prevent_cse=False)
    xs = (state, jnp.arange(n), keys_N2, layer_keep_NB)
    if use_scan:
      (h_BTD, carry), outs = jax.lax.scan(step, (h_BTD, carry), xs)
      return h_BTD, carry, outs
    outs = []
    for i in range(n):
      (h_BTD, carry), out = step((h_BTD, carry), jax.tree.map(lambda x, i=i: x[i], xs))
      outs.append(out)
    return h_BTD, carry, jax.tree.map(lambda *xs: jnp.stack(xs), *outs)

  def __call__(
      self,
      tokens_BT: Array,
      *,
      per_layer_fn: Callable[[Array], Any] | None = None,
      dropout_rng: Array | None = None,
      layer_keep_NB: Array | None = None,
      use_scan: bool = True,
  ) -> ModelOutput:
    """Full-depth forward pass returning every layer's hidden state and head output.

    Args:
      tokens_BT: int32 token ids.
      per_layer_fn: maps a layer's output hidden state [B, T, D] to what is kept
        for that layer; default `self.head` (logits). Runs inside the scan, so a
        summary function never materialises [N, B, T, V].
      dropout_rng: PRNG key enabling dropout (training); None for evaluation.
      layer_keep_NB: per-sample layer dropout mask (training); see `scan_layers`.
      use_scan: see `scan_layers`.

    Returns:
      A `ModelOutput`.
    """
    fn = self.head if per_layer_fn is None else per_layer_fn
    h0_BTD = self.embed_tokens(tokens_BT)

    def body(i, h_in, h_out, carry):
      del i, h_in
      return h_out, carry, (h_out, fn(h_out))

    _, _, (hidden_NBTD, per_layer) = self.scan_layers(
        h0_BTD, body, dropout_rng=dropout_rng, layer_keep_NB=layer_keep_NB, use_scan=use_scan)
    return ModelOutput(embed_BTD=h0_BTD, hidden_NBTD=hidden_NBTD, per_layer=per_layer)


def create_model(config: ModelConfig, seed: int = 0) -> DeepSupervisionTransformer:
  """Builds a freshly initialised model, ready for the functions of this package."""
  return DeepSupervisionTransformer(config, rngs=nnx.Rngs(params=seed))


def pure_params(model: nnx.Module) -> dict:
  """The model's parameters as a plain nested dict of arrays (what orbax stores)."""
  return nnx.state(model, nnx.Param).to_pure_dict()


def abstract_model(config: ModelConfig) -> DeepSupervisionTransformer:
  """The model's structure with shape-only parameters (no initialisation cost)."""
  return nnx.eval_shape(lambda: create_model(config))


@nnx.jit(static_argnames=("use_scan",))
def all_layer_logits(model: DeepSupervisionTransformer, tokens: Array,
                     use_scan: bool = True) -> Array:
  """Logits of every layer's exit, [num_layers, B, T, V]; index 0 is layer 1.

  Args:
    model: a `DeepSupervisionTransformer` (from `create_model` or `load_model`).
    tokens: int32 [B, T] token ids, T <= config.max_len.
    use_scan: False runs the Python-loop reference path.
  """
  return model(jnp.asarray(tokens, jnp.int32), use_scan=use_scan).per_layer


def count_params(model: nnx.Module) -> int:
  """Number of trainable parameters."""
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
