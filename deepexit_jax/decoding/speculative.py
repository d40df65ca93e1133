"""Self-speculative decoding: layers 1..E and the shared exit head draft, layers E+1..N verify.

Shapes (suffixes on locals): B batch, P prompt length, M new tokens per row, W = P + M +
K + 1 token-buffer width, S cache length (= config.max_len), D width, H heads, K head
width (a `_k` suffix) or draft length (`draft_len`), R = draft_len + 1 verified rows per
cycle, V vocabulary, C cycles (at most M: every cycle commits at least one token).

A row's state between cycles is its committed length L (the prompt plus accepted
tokens) and every layer's KV cache, valid for positions < L - 1: the newest token (at
L - 1) has not been run by any layer yet. One cycle (LayerSkip, Elhoushi et al. 2024):

  draft    iteration j = 0, 1, ... runs the token at position L - 1 + j (the newest
           token, then the drafts) through layers 1..E (`Block.extend_one`), writes those
           layers' keys/values, keeps the layer-E state (the exit-query cache) and, while
           the row still drafts, applies the exit head and drafts the next token (argmax
           or a sample of q). A row stops drafting after `draft_len` tokens, when it has
           as many as it still needs, or (adaptive) when the draft's confidence falls
           below `draft_threshold` (Kangaroo / SWIFT). The loop runs while any row still
           has a drafted token that layers 1..E have not seen (at most draft_len + 1
           iterations; a `lax.while_loop`, so a batch that stops early stops paying).
  verify   layers E+1..N run all R positions L - 1 .. L - 1 + draft_len at once from the
           cached layer-E states (`Block.extend`: layers 1..E are not recomputed), write
           their keys/values and apply the head: the full model's logits p at every
           drafted position and one past it. Under adaptive drafting only the first
           `size` positions run, the smallest of a few compiled sizes that holds the
           batch's longest draft + 1 (`verify_sizes`, one `lax.switch`).
  accept   greedy: the longest prefix of drafts equal to argmax p, then argmax p at the
           first mismatch (the correction) or after the last draft (the bonus token).
           Sampling (Leviathan et al. 2023; Chen et al. 2023): draft x_i is accepted with
           probability min(1, p_i(x_i) / q_i(x_i)); at the first rejection the token is
           drawn from normalize(max(0, p_i - q_i)), after k acceptances from p_{k+1}; with
           temperature / top-k, p and q are the transformed distributions. The output is
           then distributed exactly as sampling the full model.
  rollback the row's length becomes L + accepted + 1. Nothing is erased: cache positions
           >= the new L - 1 are never read before they are rewritten (draft attention
           reads positions < its own; verification reads cache positions < L - 1 and
           takes newer keys/values from its own rows).

Batches: each row accepts its own prefix and advances its own length (per-row positions
in every cache read and write); a finished row drafts nothing and stops counting, and the
whole decode is one `lax.while_loop` over cycles, so compile time does not depend on M.
The prompt (all but its last token) is prefilled at full depth, as in `generate`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from deepexit_jax import exits
from deepexit_jax.decoding import compiled
from deepexit_jax.errors import UserError
from deepexit_jax.model import DeepSupervisionTransformer

Array = jax.Array

# Draft-confidence measures for adaptive drafting (larger = more confident).
DRAFT_MEASURES = ("softmax", "margin", "entropy", "state", "probe")


@flax.struct.dataclass
class SpeculativeResult:
  """What `speculative_generate` returns; C = cycles of the batch (<= M).

  Attributes:
    tokens: int32 [B, P + M]: the prompt, then exactly M new tokens per row.
    cycle_length: int32 [C, B] each row's committed length L at the start of each cycle
      of the batch (0 for cycles the row did not take part in: it was done, or the batch
      had stopped).
    drafted: int32 [C, B] tokens the row drafted in each cycle.
    accepted: int32 [C, B] drafted tokens the verification accepted.
    committed: int32 [C, B] tokens the cycle added to the row (accepted + 1, fewer when
      an end-of-sequence token ended the row).
    draft_iterations: int32 [C] iterations of the draft loop the batch ran (0 = no cycle).
    verified: int32 [C] positions the cycle's verification ran (its row count: the
      smallest of `verify_sizes` that holds the batch's longest draft + 1; 0 = no cycle).
    logits: float32 [B, M, V] the full-depth logits (of a verification) that chose each
      new token (None unless requested).
    prompt_lengths: int32 [B] each row's prompt length P_b (row b's new tokens start at
      P_b; the rows of `tokens` are right-padded past P_b + M).
    prompt_len, draft_layer, draft_len: the call's P (the longest prompt), E and k
      (static).
  """

  tokens: Array
  cycle_length: Array
  drafted: Array
  accepted: Array
  committed: Array
  draft_iterations: Array
  verified: Array
  logits: Array | None = None
  prompt_lengths: Array | None = None
  prompt_len: int = flax.struct.field(pytree_node=False, default=0)
  draft_layer: int = flax.struct.field(pytree_node=False, default=0)
  draft_len: int = flax.struct.field(pytree_node=False, default=0)
  verify_sizes: tuple[int, ...] = flax.struct.field(pytree_node=False, default=())

  @property
  def new_tokens(self) -> Array:
    """[B, M] the generated tokens (row b's from position P_b)."""
    tokens = np.asarray(self.tokens)
    m = tokens.shape[1] - self.prompt_len
    at_BM = np.asarray(self.prompt_lengths)[:, None] + np.arange(m)[None]
    return np.take_along_axis(tokens, at_BM, 1)

  @property
  def cycles(self) -> np.ndarray:
    """[B] verification passes each row took."""
    return (np.asarray(self.cycle_length) > 0).sum(0)

  @property
  def acceptance_rate(self) -> float:
    """Accepted drafted tokens / drafted tokens, over all rows (NaN if nothing was drafted)."""
    drafted = int(np.asarray(self.drafted).sum())
    return int(np.asarray(self.accepted).sum()) / drafted if drafted else math.nan

  @property
  def tokens_per_cycle(self) -> float:
    """Mean tokens committed per verification pass, over all rows."""
    return float(np.asarray(self.committed).sum() / self.cycles.sum())

  @property
  def num_cycles(self) -> int:
    """Cycles the batch ran (the slowest row's)."""
    return int((np.asarray(self.draft_iterations) > 0).sum())


@dataclasses.dataclass(frozen=True)
class _Options:
  draft_layer: int
  draft_len: int
  prompt_len: int
  num_new: int
  sample: bool
  top_k: int  # 0 = no filter
  adaptive: bool  # stop a row's draft when its confidence < the threshold
  verify_sizes: tuple[int, ...]  # verification row counts compiled (ascending, last = k + 1)
  measure: str
  return_logits: bool
  eos_id: int  # -1 = none
  static_probe: Any = None  # `exits.split_probe`'s static part (draft_measure "probe")


@flax.struct.dataclass
class _Draft:
  """The draft loop's carry.

  Attributes:
    j: the iteration (0-based): it runs the token at position L - 1 + j.
    more_B: the row drafted at iteration j - 1 (so it needs iteration j).
    num_B: drafted tokens so far.
    tokens_BR: [x_0 (the newest token), x_1, ..., x_k (drafts)].
    h_BRD: layer-E output state at each iteration.
    logq_BRV: log q at each iteration (sampling only, else [B, R, 0]): row j is the
      distribution draft x_{j+1} was drawn from.
    caches: (keys, values) [B, S, H, K] of layers 1..E.
    rows: the keys/values [B, H, K] of layers 1..E of the previous iteration's token,
      not yet written (`_write`'s note), and their positions [B].
  """

  j: Array
  more_B: Array
  num_B: Array
  tokens_BR: Array
  h_BRD: Array
  logq_BRV: Array
  caches: list
  rows: tuple


@flax.struct.dataclass
class _Cycles:
  """The cycle loop's carry (C = M slots, one per possible cycle).

  Attributes:
    c: the cycle (0-based).
    length_B: each row's committed length L.
    tokens_BW: the prompts, then the committed tokens (padded past each row's end).
    caches: per layer (keys, values) [B, S, H, K].
    draft_rows: keys/values of layers 1..E of the last draft iteration, not yet written,
      and their positions [B] (`_write`).
    verify_rows: keys/values [B, R, H, K] of layers E+1..N of the last verification, not
      yet written, and their positions [B, R].
    cycle_length_CB, drafted_CB, accepted_CB, committed_CB, draft_iterations_C,
      verified_C: `SpeculativeResult`'s fields, filled cycle by cycle.
    logits_BMV: the full-depth logits that chose each new token (None unless requested).
  """

  c: Array
  length_B: Array
  tokens_BW: Array
  caches: list
  draft_rows: tuple
  verify_rows: tuple
  cycle_length_CB: Array
  drafted_CB: Array
  accepted_CB: Array
  committed_CB: Array
  draft_iterations_C: Array
  verified_C: Array
  logits_BMV: Array | None = None


def _log_probs(logits_XV: Array, temperature: Array, top_k: int) -> Array:
  """log softmax of logits / temperature, restricted to the top-k (ties kept) when top_k."""
  logits_XV = logits_XV / temperature
  if top_k:
    kth_X1 = jax.lax.top_k(logits_XV, top_k)[0][..., -1:]
    logits_XV = jnp.where(logits_XV < kth_X1, -jnp.inf, logits_XV)
  return jax.nn.log_softmax(logits_XV, axis=-1)


def _draft_confidence(measure: str, probe: Any, logits_BV: Array, h_in_BD: Array,
                      h_out_BD: Array, layer: int) -> Array:
  """The draft's confidence at layer E (`exits`' measures: larger = more confident)."""
  if measure in exits.LOGIT_MEASURES:
    return exits.logit_confidence(measure, logits_BV)
  if measure == "state":
    return exits.state_confidence(h_in_BD, h_out_BD)
  return exits.probe_confidence(probe, h_in_BD, h_out_BD, jnp.int32(layer))


def _write(caches: list, rows: tuple) -> list:
  """Writes pending rows (keys/values [B, (X,) H, K] per layer) at their per-row positions
  ([B] or [B, X]); positions >= S are dropped.

  Like `generate`, the decoder never writes a cache right after reading it: a layer call
  returns its rows, and they are written at the start of the NEXT call that reads that
  cache (so a read never precedes a write of the same buffer in one loop iteration;
  otherwise XLA copies every cache buffer on every iteration).
  """
  kv, pos_BX = rows
  b_B = jnp.arange(pos_BX.shape[0]).reshape((-1,) + (1,) * (pos_BX.ndim - 1))
  return [(k.at[b_B, pos_BX].set(rk, mode="drop"), v.at[b_B, pos_BX].set(rv, mode="drop"))
          for (k, v), (rk, rv) in zip(caches, kv)]


def speculative_decode(model: DeepSupervisionTransformer, prompt_BP: Array,
                       prompt_len_B: Array, threshold: Array, temperature: Array, rng: Array,
                       dynamic_probe: Any, *, opts: _Options) -> SpeculativeResult:
  """The traced self-speculative decoder (module docstring); `speculative_generate` jits it."""
  probe = exits.merge_probe(opts.static_probe, dynamic_probe)
  cfg = model.config
  n, e, kd = cfg.num_layers, opts.draft_layer, opts.draft_len
  s, nh, hk, d, v = cfg.max_len, cfg.kv_heads, cfg.head_dim, cfg.dim, cfg.vocab_size
  b, p = prompt_BP.shape  # p: the longest prompt; row b's is prompt_len_B[b] long.
  m, r = opts.num_new, kd + 1
  total_B = prompt_len_B + m
  width = p + m + r
  blocks = [model.layer(i) for i in range(n)]  # Weights sliced once, outside the loops.
  b_B = jnp.arange(b)
  r_R = jnp.arange(r)

  zeros_BSHK = jnp.zeros((b, s, nh, hk), jnp.float32)
  caches = [(zeros_BSHK, zeros_BSHK) for _ in range(n)]
  if p > 1:  # The prompts but their last tokens, at full depth. A shorter row's padding
    # runs too, at positions >= its P_b - 1, which nothing reads before they are rewritten.
    pos_Q = jnp.arange(p - 1)
    h_BQD = model.embed_tokens(prompt_BP[:, :p - 1], pos_Q[None])
    no_cache_1QS = jnp.zeros((1, p - 1, s), bool)
    causal_1QQ = (pos_Q[:, None] >= pos_Q[None, :])[None]
    for i in range(n):
      h_BQD, k_BQHK, v_BQHK = blocks[i].extend(h_BQD, caches[i], no_cache_1QS, causal_1QQ,
                                               pos_Q)
      caches[i] = (zeros_BSHK.at[:, :p - 1].set(k_BQHK), zeros_BSHK.at[:, :p - 1].set(v_BQHK))

  def draft_step(st: _Draft, length_B: Array, key: Array) -> _Draft:
    """Iteration j: the token at L - 1 + j through layers 1..E; maybe draft the next."""
    j = st.j
    pos_B = length_B - 1 + j
    tok_B = st.tokens_BR[:, j]
    h_BD = model.embed_tokens(tok_B[:, None], jnp.minimum(pos_B, s - 1)[:, None])[:, 0]
    caches = _write(st.caches, st.rows)
    h_in_BD, kv = h_BD, []
    for i in range(e):
      h_in_BD = h_BD
      h_BD, k_BHK, v_BHK = blocks[i].extend_one(h_BD, caches[i], pos_B)
      kv.append((k_BHK.astype(jnp.float32), v_BHK.astype(jnp.float32)))
    # The head only while some row may still draft (iteration draft_len never drafts).
    logits_BV = jax.lax.cond(j < kd, model.head,
                             lambda h: jnp.zeros((b, v), jnp.float32), h_BD)
    if opts.sample:
      logq_BV = _log_probs(logits_BV, temperature, opts.top_k)
      next_B = compiled.categorical(compiled.fold_in(key, j), logq_BV)
    else:
      next_B = jnp.argmax(logits_BV, -1).astype(jnp.int32)
    # Never more drafts than the row still needs beyond the token every cycle commits.
    cap_B = jnp.clip(total_B - length_B - 1, 0, kd)
    keep_B = st.more_B & (j < cap_B)
    if opts.adaptive:
      conf_B = _draft_confidence(opts.measure, probe, logits_BV, h_in_BD, h_BD, e)
      keep_B = keep_B & (conf_B >= threshold)
    logq_BRV = st.logq_BRV
    if opts.sample:  # Slot draft_len (the last iteration's) is never read.
      logq_BRV = jax.lax.dynamic_update_index_in_dim(logq_BRV, logq_BV, j, 1)
    return _Draft(
        j=j + 1, more_B=keep_B, num_B=jnp.where(keep_B, j + 1, st.num_B),
        tokens_BR=st.tokens_BR.at[:, jnp.minimum(j + 1, kd)].set(
            jnp.where(keep_B, next_B, st.tokens_BR[:, jnp.minimum(j + 1, kd)])),
        h_BRD=jax.lax.dynamic_update_index_in_dim(st.h_BRD, h_BD, j, 1),
        logq_BRV=logq_BRV, caches=caches, rows=(kv, pos_B))

  def verify(h_BRD: Array, caches: list, *, length_B: Array, size: int
             ) -> tuple[Array, list]:
    """Layers E+1..N and the head on positions L - 1 .. L - 2 + size (static size <= R),
    padded back to R rows: (logits [B, R, V], per layer (keys, values) [B, R, H, K])."""
    r_X = jnp.arange(size)
    cache_mask_BXS = (jnp.arange(s)[None, None] < (length_B - 1)[:, None, None])
    causal_1XX = (r_X[:, None] >= r_X[None, :])[None]
    pos_BX = length_B[:, None] - 1 + r_X[None]
    h_BXD, kv = h_BRD[:, :size], []

    def pad(x_BX: Array) -> Array:
      return jnp.pad(x_BX, [(0, 0), (0, r - size)] + [(0, 0)] * (x_BX.ndim - 2))

    for i in range(e, n):
      h_BXD, k_BXHK, v_BXHK = blocks[i].extend(h_BXD, caches[i - e], cache_mask_BXS,
                                               causal_1XX, pos_BX)
      kv.append((pad(k_BXHK.astype(jnp.float32)), pad(v_BXHK.astype(jnp.float32))))
    return pad(model.head(h_BXD)), kv

  def cycle(carry: _Cycles) -> _Cycles:
    c, length_B, tokens_BW = carry.c, carry.length_B, carry.tokens_BW
    active_B = length_B < total_B
    key = compiled.fold_in(rng, c)  # One key, or one per row.
    caches = carry.caches

    # Draft.
    newest_B = tokens_BW[b_B, length_B - 1]
    st = _Draft(
        j=jnp.int32(0), more_B=active_B, num_B=jnp.zeros((b,), jnp.int32),
        tokens_BR=jnp.zeros((b, r), jnp.int32).at[:, 0].set(newest_B),
        h_BRD=jnp.zeros((b, r, d), jnp.float32),
        logq_BRV=jnp.zeros((b, r, v if opts.sample else 0), jnp.float32),
        caches=list(caches[:e]), rows=carry.draft_rows)
    st = jax.lax.while_loop(lambda st: jnp.any(st.more_B) & (st.j <= kd),
                            lambda st: draft_step(st, length_B, key), st)
    caches = list(st.caches) + _write(caches[e:], carry.verify_rows)

    # Verify: layers E+1..N from the cached layer-E states, on the first `size` of the R
    # positions, the smallest compiled size that holds every row's draft (rows past a
    # row's draft are never read: their keys/values land past its new length).
    pos_BR = length_B[:, None] - 1 + r_R[None]
    need = jnp.max(jnp.where(active_B, st.num_B, 0)) + 1
    which = jnp.sum(jnp.asarray(opts.verify_sizes[:-1]) < need, dtype=jnp.int32)
    branches = [functools.partial(verify, length_B=length_B, size=size)
                for size in opts.verify_sizes]
    if len(branches) == 1:
      logits_BRV, kv = branches[0](st.h_BRD, caches[e:])
    else:
      logits_BRV, kv = jax.lax.switch(which, branches, st.h_BRD, caches[e:])

    # Accept.
    drafts_BK = st.tokens_BR[:, 1:]
    valid_BK = jnp.arange(kd)[None] < st.num_B[:, None]
    if opts.sample:
      logp_BRV = _log_probs(logits_BRV, temperature, opts.top_k)
      logp_BK = jnp.take_along_axis(logp_BRV[:, :kd], drafts_BK[..., None], -1)[..., 0]
      logq_BK = jnp.take_along_axis(st.logq_BRV[:, :kd], drafts_BK[..., None], -1)[..., 0]
      u_BK = compiled.uniform(compiled.fold_in(key, kd + 1), (b, kd))
      ok_BK = u_BK < jnp.exp(jnp.minimum(logp_BK - logq_BK, 0.0))
    else:
      ok_BK = drafts_BK == jnp.argmax(logits_BRV[:, :kd], -1)
    acc_B = jnp.sum(jnp.cumprod(ok_BK & valid_BK, axis=1), axis=1).astype(jnp.int32)
    at_B1 = acc_B[:, None, None]
    if opts.sample:
      logp_BV = jnp.take_along_axis(logp_BRV, at_B1, 1)[:, 0]
      logq_BV = jnp.take_along_axis(st.logq_BRV, at_B1, 1)[:, 0]
      # After a rejection: normalize(max(0, p - q)); after k acceptances: p.
      resid_BV = jnp.maximum(jnp.exp(logp_BV) - jnp.exp(logq_BV), 0.0)
      use_p_B1 = ((acc_B >= st.num_B) | (jnp.sum(resid_BV, -1) <= 0))[:, None]
      final_logits_BV = jnp.where(use_p_B1, logp_BV, jnp.log(resid_BV))
      final_B = compiled.categorical(compiled.fold_in(key, kd + 2), final_logits_BV)
    else:
      final_B = jnp.argmax(jnp.take_along_axis(logits_BRV, at_B1, 1)[:, 0], -1)

    # Commit: accepted drafts, then the final token; rows that were done write nothing.
    new_BR = jnp.concatenate([drafts_BK, jnp.zeros((b, 1), jnp.int32)], 1)
    new_BR = jnp.where(r_R[None] == acc_B[:, None], final_B.astype(jnp.int32)[:, None], new_BR)
    write_BR = (r_R[None] <= acc_B[:, None]) & active_B[:, None]
    ended_B = jnp.zeros((b,), bool)
    if opts.eos_id >= 0:  # A row ends at its first EOS; the buffer already holds EOS after.
      eos_BR = write_BR & (new_BR == opts.eos_id)
      ended_B = jnp.any(eos_BR, 1)
      write_BR = write_BR & (jnp.cumsum(eos_BR, 1) - eos_BR == 0)
    tokens_BW = tokens_BW.at[b_B[:, None], jnp.where(write_BR, length_B[:, None] + r_R[None],
                                                     width)].set(new_BR, mode="drop")
    if opts.return_logits:  # New token i of a row sits at index i = position - P.
      at_BR = jnp.where(write_BR, (length_B - prompt_len_B)[:, None] + r_R[None], m)
      logits_BMV = carry.logits_BMV.at[b_B[:, None], at_BR].set(logits_BRV, mode="drop")
    else:
      logits_BMV = None

    def put(buf: Array, value: Array) -> Array:  # Cycle c's row of a [C, ...] buffer.
      return buf.at[c].set(value)

    return _Cycles(
        c=c + 1, tokens_BW=tokens_BW, caches=caches, draft_rows=st.rows,
        verify_rows=(kv, pos_BR),
        length_B=jnp.where(ended_B, total_B, jnp.where(active_B, length_B + acc_B + 1, length_B)),
        cycle_length_CB=put(carry.cycle_length_CB, jnp.where(active_B, length_B, 0)),
        drafted_CB=put(carry.drafted_CB, jnp.where(active_B, st.num_B, 0)),
        accepted_CB=put(carry.accepted_CB, jnp.where(active_B, acc_B, 0)),
        committed_CB=put(carry.committed_CB, jnp.sum(write_BR, 1, dtype=jnp.int32)),
        draft_iterations_C=put(carry.draft_iterations_C, st.j),
        verified_C=put(carry.verified_C, jnp.asarray(opts.verify_sizes)[which]),
        logits_BMV=logits_BMV)

  zeros_BHK = jnp.zeros((b, nh, hk), jnp.float32)
  zeros_BRHK = jnp.zeros((b, r, nh, hk), jnp.float32)
  nowhere_B = jnp.full((b,), s, jnp.int32)  # Pending rows at position S are dropped.
  carry = _Cycles(
      c=jnp.int32(0), length_B=prompt_len_B,
      tokens_BW=jnp.full((b, width), max(opts.eos_id, 0), jnp.int32).at[:, :p].set(
          jnp.where(jnp.arange(p)[None] < prompt_len_B[:, None], prompt_BP,
                    max(opts.eos_id, 0))),
      caches=caches,
      draft_rows=([(zeros_BHK, zeros_BHK)] * e, nowhere_B),
      verify_rows=([(zeros_BRHK, zeros_BRHK)] * (n - e),
                   jnp.broadcast_to(nowhere_B[:, None], (b, r))),
      cycle_length_CB=jnp.zeros((m, b), jnp.int32), drafted_CB=jnp.zeros((m, b), jnp.int32),
      accepted_CB=jnp.zeros((m, b), jnp.int32), committed_CB=jnp.zeros((m, b), jnp.int32),
      draft_iterations_C=jnp.zeros((m,), jnp.int32), verified_C=jnp.zeros((m,), jnp.int32),
      logits_BMV=jnp.zeros((b, m, v), jnp.float32) if opts.return_logits else None)
  carry = jax.lax.while_loop(lambda c: jnp.any(c.length_B < total_B), cycle, carry)
  return SpeculativeResult(
      tokens=carry.tokens_BW[:, :p + m], cycle_length=carry.cycle_length_CB,
      drafted=carry.drafted_CB, accepted=carry.accepted_CB, committed=carry.committed_CB,
      draft_iterations=carry.draft_iterations_C, verified=carry.verified_C,
      logits=carry.logits_BMV, prompt_lengths=prompt_len_B, prompt_len=p, draft_layer=e,
      draft_len=kd, verify_sizes=opts.verify_sizes)


def verify_sizes(draft_len: int) -> tuple[int, ...]:
  """The verification row counts adaptive drafting compiles: powers of two below
  draft_len + 1, then draft_len + 1 (k = 6: 1, 2, 4, 7). One `lax.switch` picks the
  smallest that holds the batch's longest draft, so a short draft pays a short
  verification; each size is one more copy of layers E+1..N in the program."""
  sizes = [1 << i for i in range(draft_len.bit_length() + 1) if (1 << i) < draft_len + 1]
  return tuple(sizes) + (draft_len + 1,)


def _check_verify_sizes(sizes: Any, k: int, adaptive: bool) -> tuple[int, ...]:
  if sizes is None:
    return verify_sizes(k) if adaptive else (k + 1,)
  try:
    sizes = tuple(int(x) for x in sizes)
  except (TypeError, ValueError):
    sizes = ()
  if (not sizes or sizes[-1] != k + 1 or sizes[0] < 1
      or any(a >= b for a, b in zip(sizes, sizes[1:]))):
    raise UserError(f"verify_sizes={sizes!r} must be ascending integers >= 1 ending at "
                    f"draft_len + 1 = {k + 1}")
  return sizes


def speculative_generate(
    model: DeepSupervisionTransformer,
    prompt: Array,
    max_new_tokens: int,
    *,
    draft_layer: int,
    draft_len: int = 4,
    temperature: float = 0.0,
    top_k: int = 0,
    rng: Array | None = None,
    draft_threshold: float | None = None,
    draft_measure: str = "softmax",
    return_logits: bool = False,
    eos_id: int | None = None,
    probe: Any = None,
    prompt_lengths: Any = None,
    verify_sizes: Any = None,
) -> SpeculativeResult:
  """Generates tokens by self-speculation: exactly the full model's greedy tokens (or, when
  sampling, exactly its distribution), several tokens per full-depth pass.

  Layers 1..`draft_layer` and the shared exit head draft up to `draft_len` tokens; layers
  above verify them all in one pass (module docstring). One jitted call; `temperature`
  and `draft_threshold` are traced (new values never recompile).

  Args:
    model: a `DeepSupervisionTransformer` trained with a loss at `draft_layer` (any model
      works; acceptance is what training at that layer buys).
    prompt: int [B, P] (or [P]) token ids, or a list of B token sequences of different
      lengths (each >= 1; see `prompt_lengths`).
    max_new_tokens: M >= 1 new tokens per row; P + M - 1 <= config.max_len (P: the
      longest prompt).
    draft_layer: E, 1 <= E < N: the layer whose exit drafts.
    draft_len: k >= 1: most tokens drafted per cycle.
    temperature: 0 = greedy; > 0 samples from softmax(logits / temperature).
    top_k: sample among the k most likely tokens (0 = all); needs temperature > 0.
    rng: PRNG key for sampling (default `jax.random.key(0)`), or one key per row ([B]):
      row b's tokens then depend only on its own key, so they equal row b's decoded alone
      with key `rng[b:b + 1]`.
    draft_threshold: adaptive drafting: a row stops drafting when the draft's confidence
      (`draft_measure`) falls below this (None = always draft `draft_len`).
    draft_measure: "softmax", "margin", "entropy", "state" or "probe" (as in
      `predict_with_exit`; "probe" evaluates `probe` at layer E).
    return_logits: also return the full-depth logits that chose each new token.
    eos_id: end-of-sequence token id: a row stops at it and its remaining positions hold
      `eos_id` (it stops counting cycles; the batch keeps its shape). None = no stop.
    probe: the confidence probe of draft_measure "probe" (e.g. `probes.load_probe(dir)`).
    prompt_lengths: int [B]: prompts of different lengths in one batch, right-padded in
      `prompt` (row b's prompt is prompt[b, :prompt_lengths[b]]; the padding is ignored).
      Each row decodes at its own positions and generates M tokens from position P_b,
      exactly as it would alone. None = every row is P long.
    verify_sizes: the verification row counts compiled (ascending, the last draft_len +
      1); each cycle runs the smallest that holds the batch's longest draft + 1. None =
      `verify_sizes(draft_len)` under adaptive drafting, else (draft_len + 1,) (a static
      draft is always full length). `(draft_len + 1,)` with a threshold is the static
      verification (for A/B timing).

  Returns:
    A `SpeculativeResult`; `speculative_cost(model.config, result)` gives its FLOPs.
  """
  if not isinstance(model, DeepSupervisionTransformer):
    raise UserError(f"model must be a DeepSupervisionTransformer, got {type(model).__name__}")
  cfg = model.config
  n = cfg.num_layers
  if n < 2:
    raise UserError("self-speculative decoding needs a model of at least 2 layers (layers "
                    "1..E draft, the rest verify)")
  e = compiled.check_count(draft_layer, "draft_layer",
                           hint=f" and below the model's {n} layers: the layer that drafts")
  if e >= n:
    raise UserError(f"draft_layer={e} must be below the model's {n} layers (1..{n - 1}): the "
                    "layers above it verify")
  k = compiled.check_count(draft_len, "draft_len", hint=" (tokens drafted per cycle)")
  eos = compiled.check_eos(eos_id, cfg.vocab_size)
  prompt_BP, lengths_B = compiled.check_prompts(prompt, prompt_lengths, cfg.vocab_size,
                                                pad=max(eos, 0))
  b, p = prompt_BP.shape
  m = compiled.check_count(max_new_tokens, "max_new_tokens")
  if lengths_B is None:  # Positions are per row anyway: equal lengths are no special case.
    lengths_B = np.full((b,), p, np.int32)
  if p + m - 1 > cfg.max_len:
    raise UserError(
        f"prompt length {p} + max_new_tokens {m} - 1 exceeds model.max_len={cfg.max_len} (the "
        f"KV cache length): ask for at most {cfg.max_len - p + 1} new tokens or shorten the "
        "prompt")
  compiled.check_sampling(temperature, top_k, cfg.vocab_size)
  if draft_measure not in DRAFT_MEASURES:
    raise UserError(f"unknown draft_measure={draft_measure!r}: choose one of "
                    f"{', '.join(DRAFT_MEASURES)}")
  adaptive = draft_threshold is not None
  if draft_measure == "probe" and (probe is None or not adaptive):
    raise UserError("draft_measure='probe' needs probe=... and a draft_threshold")
  if probe is not None and draft_measure != "probe":
    raise UserError("probe=... is the draft measure: pass draft_measure='probe'")
  static_probe, dynamic_probe, _ = exits.split_probe(probe)
  if adaptive:
    threshold = exits.check_threshold(draft_threshold, draft_measure)
    if threshold.ndim:
      raise UserError(f"draft_threshold must be a scalar, got shape {threshold.shape}")
  else:
    threshold = np.float32(-np.inf)
  opts = _Options(draft_layer=e, draft_len=k, prompt_len=p, num_new=m, sample=temperature > 0,
                  top_k=int(top_k), adaptive=adaptive,
                  verify_sizes=_check_verify_sizes(verify_sizes, k, adaptive), measure=draft_measure,
                  return_logits=bool(return_logits),
                  eos_id=eos, static_probe=static_probe)
  rng = compiled.check_rng(rng, b)
  return compiled.call(speculative_decode, model, prompt_BP, lengths_B, threshold,
                       np.float32(max(temperature, 1e-6)), rng, dynamic_probe, opts=opts)
