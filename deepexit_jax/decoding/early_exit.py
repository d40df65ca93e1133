"""Real early-exit decoding: an incremental KV-cache decoder that skips the layers above the exit.

Shapes (suffixes on locals): N layers, B batch, S cache length (= config.max_len),
D model width, H key/value heads (the caches'), K head width, V vocabulary, E exit layers checked (below N),
Q pending-queue slots (`recompute`), R query rows of one layer call (1 in a decode step,
the prompt for the prefill, 1 + Q in a catch-up), M decode steps.

One decode step runs the token at position t through the layers in *segments* that end
at the exit layers (exit layers (2, 4) of N = 6 give segments 1-2, 3-4, 5-6). The first
segment always runs; every later one sits in a `lax.cond` on "the batch has stopped", so
a skipped segment costs only what the KV policy asks for:

  copy       (CALM state propagation, = `predict_with_exit(kv_policy="copy")`): the
             exited state is copied upward; each skipped layer computes only the
             keys/values of the copied state (one [B, D] x [D, 2D] projection).
  recompute  (EE-LLM / DEED, = `predict_with_exit(kv_policy="oracle")`): skipped layers
             compute nothing now. The exited position joins a queue of at most
             `max_pending` pending positions with its state and depth; the next token
             that runs a layer some pending position lacks runs that layer for them in
             the same call (R = 1 + Q query rows), so every deeper layer sees exactly
             the full-depth states. A token that would overflow the queue runs to full
             depth (its logits stay those of its exit layer), which flushes the queue.

Batches (B > 1) stop together; which rows' logits come from where:
  sync  CALM's rule: the batch exits at the first exit layer where EVERY row is
        confident; all rows share the exit layer.
  row   each row exits at its own first confident layer (its logits are taken
        there); the batch keeps running while any row is not done, and stops when
        all are. Under `copy` a done row's state is frozen (exactly the emulation, row
        by row); under `recompute` a done row keeps computing its full-depth states.
        A batch never runs more layers under `row` than under `sync`.

Layers are unrolled (N is small) with each layer's weights sliced once before the step
loop: a `lax.scan` over a slice of the stacked weights would copy a layer's weights on
every step, which at batch 1 costs as much as the layer's matmuls. Steps run in one
`lax.fori_loop`; the whole decode (prefill + steps + sampling) is one jitted call.

The full-depth baseline is the same code with no exit layer (`exit_layers=(N,)`): one
segment, no `lax.cond`, the same cache, prefill, loop and sampling.

Prompts of different lengths P_b (right-padded): step m runs position P_b - 1 + m in row
b (a token's cache slot is its position); every position read or written (token,
embedding, cache rows, the `recompute` queue and its masks) is then per row ([B] instead
of []). The prompt is prefilled to the longest one; a row's slots from P_b - 1 on hold
padding until its own steps rewrite them, and nothing reads them before. The decoder's
state is typed: `_Carry` (the step loop), `_Climb` (one token through the segments),
`_Queue` (`recompute`'s pending positions).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepexit_jax import exits
from deepexit_jax.decoding import compiled
from deepexit_jax.errors import UserError
from deepexit_jax.model import DeepSupervisionTransformer

Array = jax.Array

KV_POLICIES = ("copy", "recompute")
BATCH_EXITS = ("sync", "row")
# "probe": a learned probe (`probe=`), evaluated on the exit layer's (h_in, h_out).
MEASURES = ("softmax", "margin", "entropy", "state", "probe")
# The emulation's name for the same semantics as each decoding policy.
EMULATED_POLICY = {"copy": "copy", "recompute": "oracle"}


@flax.struct.dataclass
class DecodeResult:
  """What `generate` / `decode_teacher_forced` return; M = decode steps.

  Step m processes the token at position `start + m` and its logits choose (or, teacher
  forced, score) the token at position `start + m + 1`. With prompts of different lengths
  (`prompt_lengths` P_b), row b's step m processes position P_b - 1 + m instead.

  Attributes:
    tokens: [B, start + M + 1] int32: the prompt (or forced text) and every chosen token;
      with `prompt_lengths`, row b's prompt, its M tokens from position P_b, then padding
      (`eos_id`, or 0).
    exit_layer: [B, M] int32 1-based layer whose logits were used (N = full depth).
    confidence: [B, M] confidence at the exit layer, or at the last exit layer checked
      for full-depth tokens (NaN if no exit layer lies below N).
    checked_confidence: [B, M, E] confidence at each exit layer, NaN where the batch
      did not run that check (it stopped earlier).
    logits: [B, M, V] float32 logits at the exit layer (None unless requested).
    layers_run: [M] int32 layers the batch ran for the step's own token (>= every
      row's exit layer; N when a full queue forced a `recompute` token to full depth).
    recomputed_layers: [M] int32 (position, layer) pairs of pending positions run in the
      step (`recompute` catch-up; 0 under `copy`).
    checks: [M] int32 exit checks the batch ran.
    prompt_lengths: [B] int32 each row's prompt length when they differ (None: all
      `start + 1`).
    start: position of the first decode step (prompt length - 1 for `generate` (the
      longest prompt's with `prompt_lengths`), 0 teacher forced).
    exit_layers: the exit layers checked (static; below N, ascending).
  """

  tokens: Array
  exit_layer: Array
  confidence: Array
  checked_confidence: Array
  logits: Array | None
  layers_run: Array
  recomputed_layers: Array
  checks: Array
  prompt_lengths: Array | None = None
  start: int = flax.struct.field(pytree_node=False, default=0)
  exit_layers: tuple[int, ...] = flax.struct.field(pytree_node=False, default=())

  @property
  def new_tokens(self) -> Array:
    """[B, M] the tokens the steps chose (teacher forced: the next forced tokens)."""
    if self.prompt_lengths is None:
      return self.tokens[:, self.start + 1:]
    m = self.tokens.shape[1] - self.start - 1
    at_BM = np.asarray(self.prompt_lengths)[:, None] + np.arange(m)[None]
    return np.take_along_axis(np.asarray(self.tokens), at_BM, 1)

  @property
  def positions(self) -> np.ndarray:
    """[B, M] the position each step ran for each row (its token's cache slot)."""
    m = self.exit_layer.shape[1]
    start_B = (np.full((self.exit_layer.shape[0],), self.start) if self.prompt_lengths is None
               else np.asarray(self.prompt_lengths) - 1)
    return start_B[:, None] + np.arange(m)[None]


@dataclasses.dataclass(frozen=True)
class _Options:
  exit_layers: tuple[int, ...]  # checked exit layers, all < N
  measure: str
  kv_policy: str
  batch_exit: str
  max_pending: int
  prefill: int  # positions run at full depth (in one call) before the first step
  num_steps: int
  num_forced: int  # positions whose token is given, not sampled
  sample: bool
  top_k: int  # 0 = no top-k filter
  return_logits: bool
  eos_id: int = -1  # -1 = none
  static_probe: Any = None  # `exits.split_probe`'s static part (measure "probe")
  ragged: bool = False  # per-row positions (prompts of different lengths)

# ----------------------------------------------------------------------------------------
# Masks of the rows one layer call runs, and the keys/values of a copied state.


def _masks(pos_XR: Array, active_R: Array, s: int) -> tuple[Array, Array]:
  """Which cache positions [X, R, S] and which new rows [X, R, R] each row attends to.

  `pos_XR`: the rows' positions, [R] (the same for the batch: X = 1) or [B, R] (per
  batch row: X = B). A row sees positions <= its own; a cache position that an active
  row rewrites is stale, so that position's key/value comes from the new row instead.
  """
  r = active_R.shape[0]
  pos_XR = jnp.reshape(pos_XR, (-1, r))
  s_S = jnp.arange(s)
  rewritten_XS = jnp.any((pos_XR[:, :, None] == s_S) & active_R[None, :, None], 1)
  cache_XRS = (s_S <= pos_XR[:, :, None]) & ~rewritten_XS[:, None]
  new_XRR = active_R[None, None, :] & (pos_XR[:, None, :] <= pos_XR[:, :, None])
  return cache_XRS, new_XRR


def _column(buf_BL: Array, t: Array) -> Array:
  """buf[:, t] for one position t [] or a position per row [B]."""
  if t.ndim == 0:
    return jax.lax.dynamic_index_in_dim(buf_BL, t, axis=1, keepdims=False)
  return buf_BL[jnp.arange(buf_BL.shape[0]), t]


def _put_column(buf_BL: Array, value_B: Array, t: Array) -> Array:
  """buf with buf[:, t] = value, t [] or [B] (positions past the end are dropped)."""
  if t.ndim == 0:
    return jax.lax.dynamic_update_index_in_dim(buf_BL, value_B, t, 1)
  return buf_BL.at[jnp.arange(buf_BL.shape[0]), t].set(value_B, mode="drop")


def _put_rows(cache_BSHK: Array, rows_BXHK: Array, at: Array) -> Array:
  """The cache with rows [B, X, H, K] written at positions [X] or [B, X] (S drops a row)."""
  if at.ndim == 1:
    return cache_BSHK.at[:, at].set(rows_BXHK, mode="drop")
  return cache_BSHK.at[jnp.arange(at.shape[0])[:, None], at].set(rows_BXHK, mode="drop")


def _copied_kv(blocks_def: Any, blocks_state: Any, lo: int, h_BD: Array, t: Array
               ) -> tuple[Array, Array]:
  """`copy` for skipped layers lo..N-1: keys/values [L, B, G, K] of one copied state at
  position t, as one batched projection over the stacked weights (`Block.copied_kv`)."""
  def one(state):
    return nnx.merge(blocks_def, state).copied_kv(h_BD, t)

  return jax.vmap(one)(jax.tree.map(lambda x: x[lo:], blocks_state))

# ----------------------------------------------------------------------------------------
# The decoder's state: the step loop's carry and one token's climb through the layers.


@flax.struct.dataclass
class _Queue:
  """`recompute`'s pending positions: Q slots, an empty slot at depth N.

  Attributes:
    h_BQD: each pending position's state at the depth it reached.
    step_Q: the decode step that left it pending (its position is the step's).
    depth_Q: layers it has run (N = empty slot).
  """

  h_BQD: Array
  step_Q: Array
  depth_Q: Array


@flax.struct.dataclass
class _Carry:
  """The step loop's carry (M = decode steps, L = token-buffer length).

  Attributes:
    tokens_BL: the prompt (or forced text) and the tokens chosen so far.
    caches: per layer (keys, values) [B, S, H, K].
    rows: per layer the previous step's keys/values [B, H, K], written at the start of
      the next step (module docstring of `decoding`: no write right after a read).
    exit_BM, conf_BM, confs_BME, layers_run_M, recomputed_M, checks_M: `DecodeResult`'s
      fields, filled step by step.
    logits_BMV: every step's logits (None unless `return_logits`).
    ended_B: the row has generated its end-of-sequence token (None without `eos_id`).
    queue: `recompute`'s pending positions (None under `copy`).
    queue_rows: `recompute`: per layer the caught-up pending rows' keys/values
      [B, Q, H, K] and their positions [Q] ([B, Q] ragged; S = not written), written at the start of
      the next step (None under `copy`).
  """

  tokens_BL: Array
  caches: list
  rows: list
  exit_BM: Array
  conf_BM: Array
  confs_BME: Array
  layers_run_M: Array
  recomputed_M: Array
  checks_M: Array
  logits_BMV: Array | None = None
  ended_B: Array | None = None
  queue: _Queue | None = None
  queue_rows: list | None = None


@flax.struct.dataclass
class _Climb:
  """One step's token as it climbs the layers (and exit checks) of its segments.

  Attributes:
    h_BD: the token's state at the current depth (frozen for a done row under `copy`).
    h_in_BD, h_out_BD: the last layer's input and output (measures "state", "probe").
    done_B: the row has exited. stop: the whole batch stops here.
    logits_BV: the logits of each row's exit (full depth's for rows that reach N).
    exit_B, conf_B, confs_BE: exit layer, confidence there, confidence at each check.
    checks, layers_run, recomputed: exit checks run, layers run for the token, and
      (position, layer) pairs of pending positions caught up.
    kv: the new keys/values [B, H, K] of the layers not yet handed up, from the lowest
      one of the current segment (`_chain` passes only the rows of the layers above a
      check through its cond).
    queue: `recompute`'s pending positions (None under `copy`).
    queue_kv: `recompute`: per layer (keys, values [B, Q, H, K], rows run [Q]) of the
      pending positions caught up in this step, indexed like `kv` (None under `copy`).
  """

  h_BD: Array
  h_in_BD: Array
  h_out_BD: Array
  done_B: Array
  stop: Array
  logits_BV: Array
  exit_B: Array
  conf_B: Array
  confs_BE: Array
  checks: Array
  layers_run: Array
  recomputed: Array
  kv: list
  queue: _Queue | None = None
  queue_kv: list | None = None

# ----------------------------------------------------------------------------------------
# The jitted decoder.


def _segments(exit_layers: tuple[int, ...], n: int) -> list[tuple[int, int]]:
  """0-based [lo, hi) layer ranges ending at each exit layer, then at N."""
  ends = list(exit_layers) + [n]
  return list(zip([0] + ends[:-1], ends))


def decode(model: DeepSupervisionTransformer, tokens_BF: Array, threshold: Array,
           temperature: Array, rng: Array, dynamic_probe: Any, start_B: Array | None, *,
           opts: _Options) -> DecodeResult:
  """The traced early-exit decoder (`generate` and `decode_teacher_forced` jit it through
  `compiled.call`): prefill, then `opts.num_steps` decode steps in one `fori_loop`.

  Step m runs position `opts.prefill + m` for every row, or (`start_B` given: prompts of
  different lengths, right-padded) `start_B[b] + m` for row b: a token's cache slot is
  its position. `rng` is one key for the batch or one key per row ([B]).
  """
  probe = exits.merge_probe(opts.static_probe, dynamic_probe)
  cfg = model.config
  n, s, e, q, d = cfg.num_layers, cfg.max_len, len(opts.exit_layers), opts.max_pending, cfg.dim
  nh, hk = cfg.kv_heads, cfg.head_dim  # Caches hold the G key/value heads.
  b = tokens_BF.shape[0]
  copy = opts.kv_policy == "copy"
  segments = _segments(opts.exit_layers, n)
  # Each layer's weights sliced once, outside the step loop.
  blocks = [model.layer(i) for i in range(n)]
  blocks_def, blocks_state = nnx.split(model.blocks)

  length = opts.prefill + opts.num_steps + 1
  # Ragged rows end before the buffer does: their tail is padding (EOS or 0).
  tokens_BL = jnp.full((b, length), max(opts.eos_id, 0), jnp.int32).at[:, :opts.num_forced].set(
      tokens_BF[:, :opts.num_forced])
  zeros_BSHK = jnp.zeros((b, s, nh, hk), jnp.float32)
  caches = [(zeros_BSHK, zeros_BSHK) for _ in range(n)]
  # Keys/values of the previous step's position, written at the start of a step.
  zeros_BHK = jnp.zeros((b, nh, hk), jnp.float32)
  rows = [(zeros_BHK, zeros_BHK) for _ in range(n)]

  if opts.prefill:  # The prompt at full depth, all positions in one call per layer.
    pos_P = jnp.arange(opts.prefill)
    masks = _masks(pos_P, jnp.ones_like(pos_P, bool), s)
    h_BPD = model.embed_tokens(tokens_BL[:, :opts.prefill], pos_P[None])
    for i in range(n):
      h_BPD, k_BPHK, v_BPHK = blocks[i].extend(h_BPD, caches[i], *masks, pos_P)
      caches[i] = (zeros_BSHK.at[:, :opts.prefill].set(k_BPHK),
                   zeros_BSHK.at[:, :opts.prefill].set(v_BPHK))
      # The first step rewrites position (start - 1) with these same rows.
      if start_B is None:
        rows[i] = (k_BPHK[:, -1], v_BPHK[:, -1])
      else:
        at_B = jnp.maximum(start_B - 1, 0)
        rows[i] = (k_BPHK[jnp.arange(b), at_B], v_BPHK[jnp.arange(b), at_B])

  def head(h_BD: Array) -> Array:
    return model.head(h_BD).astype(jnp.float32)

  def write_rows(carry: _Carry, t: Array) -> list:
    """The caches with the previous step's rows (and caught-up pending rows) written,
    before anything reads them (in place). At the first step of a teacher-forced decode
    this writes zeros at position 0, which nothing reads (a row's own key/value is taken
    from the row)."""
    caches = []
    for i in range(n):
      k_BSHK, v_BSHK = carry.caches[i]
      if not copy:  # Caught-up pending rows; index S (out of range) drops a write.
        qk_BQHK, qv_BQHK, idx = carry.queue_rows[i]
        k_BSHK, v_BSHK = _put_rows(k_BSHK, qk_BQHK, idx), _put_rows(v_BSHK, qv_BQHK, idx)
      k_BHK, v_BHK = carry.rows[i]
      prev = jnp.maximum(t - 1, 0)
      if t.ndim == 0:
        at = (0, prev, 0, 0)
        caches.append((jax.lax.dynamic_update_slice(k_BSHK, k_BHK[:, None], at),
                       jax.lax.dynamic_update_slice(v_BSHK, v_BHK[:, None], at)))
      else:
        caches.append((_put_rows(k_BSHK, k_BHK[:, None], prev[:, None]),
                       _put_rows(v_BSHK, v_BHK[:, None], prev[:, None])))
    return caches

  def queue_pos(step_Q: Array) -> Array:
    """Positions of queued steps: [Q], or [B, Q] ragged."""
    return opts.prefill + step_Q if start_B is None else start_B[:, None] + step_Q

  def step(m: Array, carry: _Carry) -> _Carry:
    t = opts.prefill + m if start_B is None else start_B + m  # [] or [B]
    caches = write_rows(carry, t)

    def run_layers(st: _Climb, lo: int, hi: int) -> _Climb:
      """Layers lo..hi-1 for the step's token, plus the pending positions that lack them."""
      frozen_B1 = st.done_B[:, None] if copy else None

      def plain(st: _Climb) -> _Climb:
        kv = list(st.kv)
        for i in range(lo, hi):
          h_in = st.h_BD
          h_out, k_BHK, v_BHK = blocks[i].extend_one(h_in, caches[i], t)
          kv[i - lo] = (k_BHK, v_BHK)
          st = st.replace(h_in_BD=h_in, h_out_BD=h_out, h_BD=(
              h_out if frozen_B1 is None else jnp.where(frozen_B1, h_in, h_out)))
        return st.replace(kv=kv)

      def catch_up(st: _Climb) -> _Climb:
        kv, queue_kv, qu = list(st.kv), list(st.queue_kv), st.queue
        pos_R = jnp.concatenate([t[..., None], queue_pos(qu.step_Q)], -1)  # [R] or [B, R]
        recomputed = st.recomputed
        for i in range(lo, hi):
          active_Q = qu.depth_Q <= i  # Empty slots hold depth N.
          h_in = st.h_BD
          h_BRD = jnp.concatenate([h_in[:, None], qu.h_BQD], 1)
          masks = _masks(pos_R, jnp.concatenate([jnp.ones((1,), bool), active_Q]), s)
          h_BRD, k_BRHK, v_BRHK = blocks[i].extend(h_BRD, caches[i], *masks, pos_R)
          kv[i - lo] = (k_BRHK[:, 0], v_BRHK[:, 0])
          queue_kv[i - lo] = (k_BRHK[:, 1:], v_BRHK[:, 1:], active_Q)
          st = st.replace(h_in_BD=h_in, h_out_BD=h_BRD[:, 0], h_BD=h_BRD[:, 0])
          qu = qu.replace(h_BQD=jnp.where(active_Q[None, :, None], h_BRD[:, 1:], qu.h_BQD),
                          depth_Q=jnp.where(active_Q, i + 1, qu.depth_Q))
          recomputed = recomputed + jnp.sum(active_Q, dtype=jnp.int32)
        return st.replace(kv=kv, queue_kv=queue_kv, queue=qu, recomputed=recomputed)

      if copy:
        st = plain(st)
      else:
        st = jax.lax.cond(jnp.any(st.queue.depth_Q < hi), catch_up, plain, st)
      return st.replace(layers_run=jnp.int32(hi))

    def check(st: _Climb, j: int) -> _Climb:
      """The exit check at exit layer `opts.exit_layers[j]`."""
      k = opts.exit_layers[j]
      if opts.measure in exits.LOGIT_MEASURES:
        logits_BV = head(st.h_BD)
        conf_B = exits.logit_confidence(opts.measure, logits_BV)
      elif opts.measure == "state":
        logits_BV = None
        conf_B = exits.state_confidence(st.h_in_BD, st.h_out_BD)
      else:
        logits_BV = None
        conf_B = exits.probe_confidence(probe, st.h_in_BD, st.h_out_BD, jnp.int32(k))
      ok_B = conf_B >= threshold
      if opts.batch_exit == "sync":
        ok_B = jnp.broadcast_to(jnp.all(ok_B), ok_B.shape)
      new_B = ok_B & ~st.done_B
      if logits_BV is None:  # state, probe: the head only runs when a row exits here.
        logits_BV = jax.lax.cond(jnp.any(new_B), head,
                                 lambda h: jnp.zeros((b, cfg.vocab_size), jnp.float32),
                                 st.h_BD)
      done_B = st.done_B | new_B
      stop = jnp.all(done_B)
      if not copy:  # Stopping leaves this position pending: it needs a free queue slot.
        stop = stop & jnp.any(st.queue.depth_Q == n)
      return st.replace(
          logits_BV=jnp.where(new_B[:, None], logits_BV, st.logits_BV),
          exit_B=jnp.where(new_B, k, st.exit_B),
          conf_B=jnp.where(st.done_B, st.conf_B, conf_B),
          confs_BE=st.confs_BE.at[:, j].set(conf_B), done_B=done_B, checks=st.checks + 1,
          stop=stop)

    def skip_rest(st: _Climb, lo: int) -> _Climb:
      """Layers lo..N-1 of a stopped batch: under `copy` the keys/values of the copied
      state (one batched projection); under `recompute` nothing (the position's rows of
      these layers are written later by its catch-up, before anyone reads them)."""
      if not copy:
        return st
      k_LBHK, v_LBHK = _copied_kv(blocks_def, blocks_state, lo, st.h_BD, t)
      return st.replace(kv=[(k_LBHK[i], v_LBHK[i]) for i in range(n - lo)])

    def chain(st: _Climb, j: int) -> _Climb:
      """Segment j and, unless the batch stops after it, the segments above it."""
      lo, hi = segments[j]
      st = run_layers(st, lo, hi)
      if hi == n:
        return st.replace(logits_BV=jnp.where(st.done_B[:, None], st.logits_BV,
                                              head(st.h_BD)))
      st = check(st, j)
      # Only the rows of the layers not yet run go through the cond.
      own_kv, own_queue_kv = st.kv[:hi - lo], None
      st = st.replace(kv=st.kv[hi - lo:])
      if not copy:
        own_queue_kv = st.queue_kv[:hi - lo]
        st = st.replace(queue_kv=st.queue_kv[hi - lo:])
      st = jax.lax.cond(st.stop, functools.partial(skip_rest, lo=hi),
                        functools.partial(chain, j=j + 1), st)
      st = st.replace(kv=own_kv + list(st.kv))
      if not copy:
        st = st.replace(queue_kv=own_queue_kv + list(st.queue_kv))
      return st

    tok_B = _column(carry.tokens_BL, t)
    h_BD = model.embed_tokens(tok_B[:, None], jnp.reshape(t, (-1, 1)))[:, 0]
    st = _Climb(
        h_BD=h_BD, h_in_BD=h_BD, h_out_BD=h_BD, done_B=jnp.zeros((b,), bool),
        stop=jnp.bool_(False), logits_BV=jnp.zeros((b, cfg.vocab_size), jnp.float32),
        exit_B=jnp.full((b,), n, jnp.int32), conf_B=jnp.full((b,), jnp.nan, jnp.float32),
        confs_BE=jnp.full((b, e), jnp.nan, jnp.float32), checks=jnp.int32(0),
        layers_run=jnp.int32(0), recomputed=jnp.int32(0), kv=[(zeros_BHK, zeros_BHK)] * n)
    if not copy:
      zeros_BQHK = jnp.zeros((b, q, nh, hk), jnp.float32)
      st = st.replace(queue=carry.queue,
                      queue_kv=[(zeros_BQHK, zeros_BQHK, jnp.zeros((q,), bool))] * n)
    st = chain(st, 0)

    queue, queue_rows = None, None
    if not copy:
      # Where the next step writes the caught-up rows (before slots move).
      queue_rows = [(qk_BQHK, qv_BQHK, jnp.where(wrote_Q, queue_pos(st.queue.step_Q), s))
                    for qk_BQHK, qv_BQHK, wrote_Q in st.queue_kv]
      # A stopped step leaves its position pending at the depth it reached.
      qu, slot, push = st.queue, jnp.argmax(st.queue.depth_Q == n), st.stop
      queue = _Queue(
          h_BQD=jnp.where(push, qu.h_BQD.at[:, slot].set(st.h_BD), qu.h_BQD),
          step_Q=jnp.where(push, qu.step_Q.at[slot].set(m), qu.step_Q),
          depth_Q=jnp.where(push, qu.depth_Q.at[slot].set(st.layers_run), qu.depth_Q))

    if opts.sample:
      logits_BV = st.logits_BV / temperature
      if opts.top_k:
        kth_B1 = jax.lax.top_k(logits_BV, opts.top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
      next_B = compiled.categorical(compiled.fold_in(rng, t), logits_BV)
    else:
      next_B = jnp.argmax(st.logits_BV, -1).astype(jnp.int32)
    forcing = opts.num_forced > opts.prefill + 1  # Teacher forced: the text's next token.
    if forcing:
      next_B = jnp.where(t + 1 < opts.num_forced, _column(carry.tokens_BL, t + 1), next_B)
    ended_B = carry.ended_B
    if opts.eos_id >= 0:  # After its end-of-sequence token a row only pads (with EOS).
      next_B = jnp.where(ended_B, opts.eos_id, next_B)
      new_eos_B = next_B == opts.eos_id
      if forcing:  # A forced token does not end a row.
        new_eos_B = new_eos_B & (t + 1 >= opts.num_forced)
      ended_B = ended_B | new_eos_B

    def put(buf: Array, value: Array) -> Array:  # Step m's column of a [B, M, ...] buffer.
      return jax.lax.dynamic_update_index_in_dim(buf, value, m, 1)

    return _Carry(
        tokens_BL=_put_column(carry.tokens_BL, next_B, t + 1),
        caches=caches, rows=st.kv, exit_BM=put(carry.exit_BM, st.exit_B),
        conf_BM=put(carry.conf_BM, st.conf_B), confs_BME=put(carry.confs_BME, st.confs_BE),
        layers_run_M=carry.layers_run_M.at[m].set(st.layers_run),
        recomputed_M=carry.recomputed_M.at[m].set(st.recomputed),
        checks_M=carry.checks_M.at[m].set(st.checks),
        logits_BMV=None if carry.logits_BMV is None else put(carry.logits_BMV, st.logits_BV),
        ended_B=ended_B, queue=queue, queue_rows=queue_rows)

  steps = opts.num_steps
  carry = _Carry(
      tokens_BL=tokens_BL, caches=caches, rows=rows,
      exit_BM=jnp.zeros((b, steps), jnp.int32), conf_BM=jnp.zeros((b, steps), jnp.float32),
      confs_BME=jnp.zeros((b, steps, e), jnp.float32),
      layers_run_M=jnp.zeros((steps,), jnp.int32), recomputed_M=jnp.zeros((steps,), jnp.int32),
      checks_M=jnp.zeros((steps,), jnp.int32),
      logits_BMV=(jnp.zeros((b, steps, cfg.vocab_size), jnp.float32) if opts.return_logits
                  else None),
      ended_B=jnp.zeros((b,), bool) if opts.eos_id >= 0 else None)
  if not copy:
    zeros_BQHK = jnp.zeros((b, q, nh, hk), jnp.float32)
    carry = carry.replace(
        queue=_Queue(h_BQD=jnp.zeros((b, q, d), jnp.float32), step_Q=jnp.zeros((q,), jnp.int32),
                     depth_Q=jnp.full((q,), n, jnp.int32)),
        queue_rows=[(zeros_BQHK, zeros_BQHK,
                     jnp.full((q,) if start_B is None else (b, q), s, jnp.int32))] * n)
  carry = jax.lax.fori_loop(0, steps, step, carry)
  return DecodeResult(
      tokens=carry.tokens_BL, exit_layer=carry.exit_BM, confidence=carry.conf_BM,
      checked_confidence=carry.confs_BME, logits=carry.logits_BMV,
      layers_run=carry.layers_run_M, recomputed_layers=carry.recomputed_M,
      checks=carry.checks_M, start=opts.prefill, exit_layers=opts.exit_layers,
      prompt_lengths=None if start_B is None else start_B + 1)


# ----------------------------------------------------------------------------------------
# Validation and the public entry points.


def _check_options(model: DeepSupervisionTransformer, exit_layers: Sequence[int],
                   measure: str, kv_policy: str, batch_exit: str, max_pending: int
                   ) -> tuple[int, ...]:
  if not isinstance(model, DeepSupervisionTransformer):
    raise UserError(f"model must be a DeepSupervisionTransformer, got {type(model).__name__}")
  layers = exits.check_exit_layers(exit_layers, model.config.num_layers)
  exits.check_choice("measure", measure, MEASURES)
  exits.check_choice("kv_policy", kv_policy, KV_POLICIES)
  exits.check_choice("batch_exit", batch_exit, BATCH_EXITS)
  if not isinstance(max_pending, (int, np.integer)) or isinstance(max_pending, bool) or (
      max_pending < 1):
    raise UserError(f"max_pending={max_pending!r} must be an integer >= 1 (pending positions "
                    "the recompute policy may hold)")
  return layers


def _check_probe_and_threshold(model, threshold, exit_layers, measure, kv_policy, probe
                               ) -> tuple[Array, Any, Any, int]:
  """`exits.check_probe_and_threshold` under this decode's settings (a calibrated threshold
  must have been calibrated under them), and a scalar threshold."""
  checked = exits.check_probe_and_threshold(threshold, measure, probe, exits.exit_settings(
      model.config.num_layers, exit_layers=exit_layers, measure=measure,
      kv_policy=EMULATED_POLICY[kv_policy]))
  if checked[0].ndim:
    raise UserError(f"threshold must be a scalar for decoding, got shape {checked[0].shape}")
  return checked


def generate(
    model: DeepSupervisionTransformer,
    prompt: Array,
    max_new_tokens: int,
    threshold: float | Array = jnp.inf,
    *,
    exit_layers: Sequence[int] = (2,),
    measure: str = "softmax",
    kv_policy: str = "copy",
    batch_exit: str = "sync",
    temperature: float = 0.0,
    top_k: int = 0,
    rng: Array | None = None,
    max_pending: int = 8,
    return_logits: bool = False,
    eos_id: int | None = None,
    probe: Any = None,
    prompt_lengths: Any = None,
) -> DecodeResult:
  """Generates tokens with early exit: one jitted call, KV cache, skipped layers.

  The prompt runs at full depth except its last token, which is the first decode step;
  every generated token comes from a step that may exit early. The threshold (and the
  temperature) are traced: new values never recompile.

  Args:
    model: a `DeepSupervisionTransformer`.
    prompt: int [B, P] (or [P]) token ids, or a list of B token sequences of different
      lengths (each >= 1; see `prompt_lengths`).
    max_new_tokens: M >= 1 tokens to generate per row; P + M - 1 <= config.max_len (P:
      the longest prompt).
    threshold: confidence threshold (as in `predict_with_exit`); `jnp.inf` never exits.
    exit_layers: strictly ascending 1-based layers; `(N,)` is the full-depth baseline
      (no checks, no conds).
    measure: "softmax", "margin", "entropy", "state" or "probe".
    kv_policy: "copy" or "recompute" (module docstring).
    batch_exit: "sync" (the batch exits when every row is confident) or "row".
    temperature: 0 = greedy; > 0 samples from softmax(logits / temperature).
    top_k: sample only among the k most likely tokens (0 = all); needs temperature > 0.
    rng: PRNG key for sampling (default `jax.random.key(0)`), or one key per row ([B],
      e.g. `jax.random.split(key, B)`): row b's tokens then depend only on its own key,
      so they equal the tokens of row b decoded alone with key `rng[b:b + 1]`.
    max_pending: queue slots of `recompute` (pending exited positions).
    return_logits: also return every step's [B, M, V] logits.
    eos_id: end-of-sequence token id: a row that generates it stops, and its remaining
      positions hold `eos_id` (the batch keeps its static shape; None = no stop).
    probe: the confidence probe of measure "probe" (e.g. `probes.load_probe(dir)`), as
      in `predict_with_exit`; its weights are traced (new weights never recompile).
    prompt_lengths: int [B]: prompts of different lengths in one batch, right-padded in
      `prompt` (row b's prompt is prompt[b, :prompt_lengths[b]]; the padding is ignored).
      Each row decodes at its own positions (a token's cache slot is its position) and
      generates M tokens from position P_b, as it would alone: with batch_exit="row" (or
      no exit), the same tokens as the row decoded alone. None = every row is P long.

  Returns:
    A `DecodeResult` with `start = P - 1`; `result.new_tokens` are the M new tokens
    (row b's from position P_b with `prompt_lengths`).
  """
  layers = _check_options(model, exit_layers, measure, kv_policy, batch_exit, max_pending)
  threshold, static_probe, dynamic_probe, _ = _check_probe_and_threshold(
      model, threshold, exit_layers, measure, kv_policy, probe)
  eos = compiled.check_eos(eos_id, model.config.vocab_size)
  prompt_BP, lengths_B = compiled.check_prompts(prompt, prompt_lengths,
                                                model.config.vocab_size, pad=max(eos, 0))
  p, max_len = prompt_BP.shape[1], model.config.max_len
  if (not isinstance(max_new_tokens, (int, np.integer)) or isinstance(max_new_tokens, bool)
      or max_new_tokens < 1):
    raise UserError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 1")
  if p + max_new_tokens - 1 > max_len:
    raise UserError(
        f"prompt length {p} + max_new_tokens {max_new_tokens} - 1 exceeds model.max_len="
        f"{max_len} (the KV cache length): ask for at most {max_len - p + 1} new tokens or "
        "shorten the prompt")
  compiled.check_sampling(temperature, top_k, model.config.vocab_size)
  opts = _Options(exit_layers=layers, measure=measure, kv_policy=kv_policy,
                  batch_exit=batch_exit, max_pending=int(max_pending), prefill=p - 1,
                  num_steps=int(max_new_tokens), num_forced=p, sample=temperature > 0,
                  top_k=int(top_k), return_logits=bool(return_logits), eos_id=eos,
                  static_probe=static_probe, ragged=lengths_B is not None)
  rng = compiled.check_rng(rng, prompt_BP.shape[0])
  start_B = None if lengths_B is None else lengths_B - 1
  return compiled.call(decode, model, prompt_BP, threshold,
                       np.float32(max(temperature, 1e-6)), rng, dynamic_probe, start_B,
                       opts=opts)


def decode_teacher_forced(
    model: DeepSupervisionTransformer,
    tokens: Array,
    threshold: float | Array,
    *,
    exit_layers: Sequence[int] = (2,),
    measure: str = "softmax",
    kv_policy: str = "copy",
    batch_exit: str = "row",
    max_pending: int = 8,
    return_logits: bool = True,
    probe: Any = None,
) -> DecodeResult:
  """Runs the incremental decoder over a fixed text, one position per step from position 0.

  Each step takes the given next token instead of sampling, so the exit layers and
  logits are directly comparable with `predict_with_exit(model, tokens, threshold,
  kv_policy=EMULATED_POLICY[kv_policy])`, position by position (with `batch_exit="row"`
  for batches; B = 1 makes "sync" and "row" identical).

  Args:
    model, threshold, exit_layers, measure, kv_policy, batch_exit, max_pending,
      return_logits, probe: as for `generate`.
    tokens: int [B, T] token ids, T <= config.max_len.

  Returns:
    A `DecodeResult` with `start = 0` and M = T steps.
  """
  layers = _check_options(model, exit_layers, measure, kv_policy, batch_exit, max_pending)
  threshold, static_probe, dynamic_probe, _ = _check_probe_and_threshold(
      model, threshold, exit_layers, measure, kv_policy, probe)
  tokens_BT = compiled.check_tokens(tokens, "tokens")
  compiled.check_vocab(tokens_BT, model.config.vocab_size, "tokens")
  t = tokens_BT.shape[1]
  if t > model.config.max_len:
    raise UserError(f"sequence length {t} exceeds model.max_len={model.config.max_len}: "
                    "shorten the input")
  opts = _Options(exit_layers=layers, measure=measure, kv_policy=kv_policy,
                  batch_exit=batch_exit, max_pending=int(max_pending), prefill=0,
                  num_steps=t, num_forced=t, sample=False, top_k=0,
                  return_logits=bool(return_logits), static_probe=static_probe)
  return compiled.call(decode, model, tokens_BT, threshold, np.float32(1.0),
                       compiled.default_rng(), dynamic_probe, None, opts=opts)
