"""Deep-supervision decoder Transformer: every layer feeds one shared exit head.

Shapes are named once here and used as suffixes on locals:
  N layers, B batch, T time (sequence), D model width, F ffn width, H heads,
  K head width (D / H), V vocabulary.

All layers run inside ONE `jax.lax.scan` over stacked block parameters, so the
compile time does not grow with the number of layers. The scan body is
pluggable (`DeepSupervisionTransformer.scan_layers`): the plain forward pass,
the exit engine's state-copy policy and the probe collection all reuse the same
scan with their own per-layer function, instead of re-implementing the layer loop.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

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
      precision: parameters, LayerNorms, the residual stream, attention softmax,
      logits and the loss stay float32).
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

  def __post_init__(self):
    for name in ("vocab_size", "num_layers", "dim", "num_heads", "max_len", "attention_chunks"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UserError(f"model.{name} must be an integer >= 1, got {value!r}")
    if self.dim % self.num_heads:
      raise UserError(
          f"model.num_heads={self.num_heads} must divide model.dim={self.dim}: "
          "choose a head count that divides the width")
    if self.ffn_dim is not None and (not isinstance(self.ffn_dim, int) or self.ffn_dim < 1):
      raise UserError(f"model.ffn_dim must be an integer >= 1 or None, got {self.ffn_dim!r}")
    if not 0.0 <= self.dropout < 1.0:
      raise UserError(f"model.dropout must be in [0, 1), got {self.dropout!r}")
    if self.remat not in REMAT_POLICIES:
      raise UserError(f"model.remat={self.remat!r}: choose one of {', '.join(REMAT_POLICIES)}")
    if self.dtype not in COMPUTE_DTYPES:
      raise UserError(f"model.dtype={self.dtype!r}: choose one of {', '.join(COMPUTE_DTYPES)}")

  @property
  def compute_dtype(self) -> Any:
    """The matmul dtype handed to `nnx.Linear` (None = float32, the parameters' own)."""
    return COMPUTE_DTYPES[self.dtype]

  @property
  def ffn_width(self) -> int:
    return self.ffn_dim if self.ffn_dim is not None else 4 * self.dim

  @property
  def head_dim(self) -> int:
    return self.dim // self.num_heads

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


class Block(nnx.Module):
  """Pre-LayerNorm Transformer block: causal self-attention, then a GELU MLP."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    d, f = config.dim, config.ffn_width
    init = nnx.initializers.normal(0.02)
    # Residual projections scaled down with depth (GPT-2), so deep stacks start stable.
    out_init = nnx.initializers.normal(0.02 / (2 * config.num_layers) ** 0.5)
    self.num_heads = config.num_heads
    self.dropout = config.dropout
    self.attention_chunks = config.attention_chunks
    self.ln1 = nnx.LayerNorm(d, rngs=rngs)
    dt = config.compute_dtype
    self.qkv = nnx.Linear(d, 3 * d, kernel_init=init, dtype=dt, rngs=rngs)
    self.attn_out = nnx.Linear(d, d, kernel_init=out_init, dtype=dt, rngs=rngs)
    self.ln2 = nnx.LayerNorm(d, rngs=rngs)
    self.fc1 = nnx.Linear(d, f, kernel_init=init, dtype=dt, rngs=rngs)
    self.fc2 = nnx.Linear(f, d, kernel_init=out_init, dtype=dt, rngs=rngs)

  def kv(self, h_BTD: Array) -> tuple[Array, Array]:
    """Keys and values [B, T, H, K] this layer computes from its input states."""
    b, t, d = h_BTD.shape
    _, k_BTHK, v_BTHK = self._project(h_BTD.reshape(b * t, d), b, t)
    return k_BTHK, v_BTHK

  def _heads(self, x_MD: Array, b: int, t: int) -> Array:
    return x_MD.reshape(b, t, self.num_heads, x_MD.shape[-1] // self.num_heads)

  def _project(self, x_MD: Array, b: int, t: int) -> tuple[Array, Array, Array]:
    """Queries, keys and values [B, T, H, K] of the input rows x [B*T, D] (LayerNorm 1, QKV)."""
    q_MD, k_MD, v_MD = jnp.split(self.qkv(self.ln1(x_MD)), 3, axis=-1)
    return self._heads(q_MD, b, t), self._heads(k_MD, b, t), self._heads(v_MD, b, t)

  def _residual(self, x_MD: Array, att_BTHK: Array, keys: tuple[Array | None, Array | None]
                ) -> Array:
    """The rest of the block after attention: output projection, residual, MLP, residual."""
    h_MD = x_MD + _dropout(self.attn_out(att_BTHK.reshape(x_MD.shape)), self.dropout, keys[0])
    mlp_MD = self.fc2(jax.nn.gelu(self.fc1(self.ln2(h_MD))))
    return h_MD + _dropout(mlp_MD, self.dropout, keys[1])

  def __call__(self, h_BTD: Array, key: Array | None = None) -> Array:
    """Applies the block causally over the whole sequence.

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
    att_BTHK = causal_attention(*self._project(x_MD, b, t), chunks=self.attention_chunks)
    return self._residual(x_MD, att_BTHK, keys).reshape(b, t, d)

  def extend(self, h_BRD: Array, cache: tuple[Array, Array], cache_mask_BRS: Array,
             new_mask_BRR: Array) -> tuple[Array, Array, Array]:
    """The block for R new rows against a KV cache: the cache-aware step of every decoder.

    Each row attends to the cache positions `cache_mask_BRS` allows and to the new rows
    `new_mask_BRR` allows (a row's own key/value comes from the rows, never the cache).
    The cache is only read; the rows' keys/values are returned for the caller to write
    (decoders choose when, see `deepexit_jax.decoding`). No dropout (inference).

    Args:
      h_BRD: the rows' input states.
      cache: (keys, values) [B, S, H, K] of this layer.
      cache_mask_BRS: bool [B or 1, R, S]: which cache positions each row sees.
      new_mask_BRR: bool [B or 1, R, R]: which new rows each row sees (itself included).

    Returns:
      (output states [B, R, D], float32 keys [B, R, H, K], float32 values [B, R, H, K]).
    """
    b, r, d = h_BRD.shape
    x_MD = h_BRD.reshape(b * r, d)
    q_BRHK, k_BRHK, v_BRHK = self._project(x_MD, b, r)
    att_BRHK = cached_attention(q_BRHK, k_BRHK, v_BRHK, *cache, cache_mask_BRS, new_mask_BRR)
    f32 = jnp.float32  # Decoders keep float32 caches whatever the compute dtype.
    return (self._residual(x_MD, att_BRHK, (None, None)).reshape(b, r, d),
            k_BRHK.astype(f32), v_BRHK.astype(f32))

  def extend_one(self, h_BD: Array, cache: tuple[Array, Array], t: Array
                 ) -> tuple[Array, Array, Array]:
    """`extend` for one row per batch row at position t ([] or [B]): it sees cache
    positions < t and itself. The same attention, with the row's own key/value handled
    element-wise beside the cache, which is faster for R = 1.

    Returns:
      (output states [B, D], keys [B, H, K], values [B, H, K]).
    """
    b, d = h_BD.shape
    q_BHK, k_BHK, v_BHK = (x[:, 0] for x in self._project(h_BD, b, 1))
    k_BSHK, v_BSHK = cache
    s = k_BSHK.shape[1]
    scale = jnp.sqrt(jnp.asarray(q_BHK.shape[-1], q_BHK.dtype))
    scores_BHS = jnp.einsum("bhk,bshk->bhs", q_BHK, k_BSHK) / scale
    visible_B1S = (jnp.arange(s)[None] < jnp.reshape(t, (-1, 1)))[:, None]
    scores_BHS = jnp.where(visible_B1S, scores_BHS, jnp.finfo(scores_BHS.dtype).min)
    self_BH1 = jnp.sum(q_BHK * k_BHK, -1, keepdims=True) / scale
    p_BHX = jax.nn.softmax(jnp.concatenate([scores_BHS, self_BH1], -1), axis=-1)
    att_BHK = jnp.einsum("bhs,bshk->bhk", p_BHX[..., :s], v_BSHK) + p_BHX[..., s:] * v_BHK
    f32 = jnp.float32
    return self._residual(h_BD, att_BHK, (None, None)), k_BHK.astype(f32), v_BHK.astype(f32)


# body(layer_index, h_in_BTD, h_out_BTD, carry) -> (h_next_BTD, carry, per_layer_output)
LayerBody = Callable[[Array, Array, Array, Any], tuple[Array, Any, Any]]


class DeepSupervisionTransformer(nnx.Module):
  """Decoder-only causal Transformer whose every layer has logits.

  One shared exit head (final LayerNorm + unembedding) is applied after every
  layer, the deep-supervision setup of CALM / LayerSkip / EE-LLM.
  """

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.config = config
    init = nnx.initializers.normal(0.02)
    self.embed = nnx.Embed(config.vocab_size, config.dim, embedding_init=init, rngs=rngs)
    self.pos_embed = nnx.Param(init(rngs.params(), (config.max_len, config.dim)))

    @nnx.split_rngs(splits=config.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make_blocks(rngs: nnx.Rngs) -> Block:
      return Block(config, rngs=rngs)

    self.blocks = make_blocks(rngs)
    self.final_norm = nnx.LayerNorm(config.dim, rngs=rngs)
    if config.tie_embeddings:
      self.unembed = None
    else:
      self.unembed = nnx.Linear(config.dim, config.vocab_size, kernel_init=init,
                                dtype=config.compute_dtype, rngs=rngs)

  def embed_tokens(self, tokens_BT: Array, positions_BT: Array | None = None) -> Array:
    """Token + learned position embedding: the input of layer 1."""
    if positions_BT is None:
      positions_BT = jnp.arange(tokens_BT.shape[-1])[None, :]
    return self.embed(tokens_BT) + self.pos_embed[...][positions_BT]

  def head(self, h_BTD: Array) -> Array:
    """The shared exit head: final LayerNorm, then the unembedding, to float32 logits."""
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
