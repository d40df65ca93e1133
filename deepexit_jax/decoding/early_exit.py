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
# The learned probes are not supported: their per-token cost and state would need a
# decoding-time interface of their own.
MEASURES = ("softmax", "margin", "entropy", "state", "probe")
# The emulation's name for the same semantics as each decoding policy.
EMULATED_POLICY = {"copy": "copy", "recompute": "oracle"}


@flax.struct.dataclass
class DecodeResult:
  """What `generate` / `decode_teacher_forced` return; M = decode steps.

  Step m processes the token at position `start + m` and its logits choose (or, teacher
  forced, score) the token at position `start + m + 1`.

  Attributes:
    tokens: [B, start + M + 1] int32: the prompt (or forced text) and every chosen token.
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
    start: position of the first decode step (prompt length - 1 for `generate`, 0
      teacher forced).
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
  start: int = flax.struct.field(pytree_node=False, default=0)
  exit_layers: tuple[int, ...] = flax.struct.field(pytree_node=False, default=())

  @property
  def new_tokens(self) -> Array:
    """[B, M] the tokens the steps chose (teacher forced: the next forced tokens)."""
    return self.tokens[:, self.start + 1:]


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

# ----------------------------------------------------------------------------------------
# Masks of the rows one layer call runs, and the keys/values of a copied state.


def _masks(pos_R: Array, active_R: Array, s: int) -> tuple[Array, Array]:
  """Which cache positions [1, R, S] and which new rows [1, R, R] each row attends to.

  A row sees positions <= its own; a cache position that an active row rewrites is
  stale, so that position's key/value comes from the new row instead.
  """
  s_S = jnp.arange(s)
  rewritten_S = jnp.any((pos_R[:, None] == s_S[None]) & active_R[:, None], 0)
  cache_RS = (s_S[None] <= pos_R[:, None]) & ~rewritten_S[None]
  new_RR = active_R[None, :] & (pos_R[None, :] <= pos_R[:, None])
  return cache_RS[None], new_RR[None]


def _copied_kv(blocks_def: Any, blocks_state: Any, lo: int, h_BD: Array, t: Array
               ) -> tuple[Array, Array]:
  """`copy` for skipped layers lo..N-1: keys/values [L, B, G, K] of one copied state at
  position t, as one batched projection over the stacked weights (`Block.copied_kv`)."""
  def one(state):
    return nnx.merge(blocks_def, state).copied_kv(h_BD, t)

  return jax.vmap(one)(jax.tree.map(lambda x: x[lo:], blocks_state))

# ----------------------------------------------------------------------------------------
# The jitted decoder.


def _segments(exit_layers: tuple[int, ...], n: int) -> list[tuple[int, int]]:
  """0-based [lo, hi) layer ranges ending at each exit layer, then at N."""
  ends = list(exit_layers) + [n]
  return list(zip([0] + ends[:-1], ends))


def decode(model: DeepSupervisionTransformer, tokens_BF: Array, threshold: Array,
           temperature: Array, rng: Array, dynamic_probe: Any, *, opts: _Options
           ) -> DecodeResult:
  """The traced early-exit decoder (`generate` and `decode_teacher_forced` jit it through
  `compiled.call`): prefill, then `opts.num_steps` decode steps in one `fori_loop`."""
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
  tokens_BL = jnp.zeros((b, length), jnp.int32).at[:, :opts.num_forced].set(
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
      # The first step rewrites position prefill - 1 with these same rows.
      rows[i] = (k_BPHK[:, -1], v_BPHK[:, -1])

  def head(h_BD: Array) -> Array:
    return model.head(h_BD).astype(jnp.float32)

  def step(m: Array, carry: dict) -> dict:
    t = opts.prefill + m
    # The previous step's rows, written before anything reads the caches (in place);
    # at the first step of a teacher-forced decode this writes zeros at position 0,
    # which nothing reads (a row's own key/value is taken from the row).
    caches = []
    for i in range(n):
      k_BSHK, v_BSHK = carry["caches"][i]
      if not copy:  # Caught-up pending rows; index S (out of range) drops a write.
        qk_BQHK, qv_BQHK, idx_Q = carry["q_rows"][i]
        k_BSHK = k_BSHK.at[:, idx_Q].set(qk_BQHK, mode="drop")
        v_BSHK = v_BSHK.at[:, idx_Q].set(qv_BQHK, mode="drop")
      k_BHK, v_BHK = carry["rows"][i]
      at = (0, jnp.maximum(t - 1, 0), 0, 0)
      caches.append((jax.lax.dynamic_update_slice(k_BSHK, k_BHK[:, None], at),
                     jax.lax.dynamic_update_slice(v_BSHK, v_BHK[:, None], at)))

    def run_layers(st: dict, lo: int, hi: int) -> dict:
      """Layers lo..hi-1 for the step's token, plus the pending positions that lack them.

      `st["kv"]` holds the new keys/values of layers lo..N-1 (index i - lo).
      """
      frozen_B1 = st["done"][:, None] if copy else None

      def plain(st):
        st = dict(st, kv=list(st["kv"]))
        for i in range(lo, hi):
          h_in = st["h"]
          h_out, k_BHK, v_BHK = blocks[i].extend_one(h_in, caches[i], t)
          st["kv"][i - lo] = (k_BHK, v_BHK)
          st["h_in"], st["h_out"] = h_in, h_out
          st["h"] = h_out if frozen_B1 is None else jnp.where(frozen_B1, h_in, h_out)
        return st

      def catch_up(st):
        st = dict(st, kv=list(st["kv"]), q_kv=list(st["q_kv"]))
        pos_R = jnp.concatenate([t[None], st["q_pos"]])
        for i in range(lo, hi):
          active_Q = st["q_depth"] <= i  # Empty slots hold depth N.
          h_in = st["h"]
          h_BRD = jnp.concatenate([h_in[:, None], st["q_h"]], 1)
          masks = _masks(pos_R, jnp.concatenate([jnp.ones((1,), bool), active_Q]), s)
          h_BRD, k_BRHK, v_BRHK = blocks[i].extend(h_BRD, caches[i], *masks, pos_R)
          st["kv"][i - lo] = (k_BRHK[:, 0], v_BRHK[:, 0])
          st["q_kv"][i - lo] = (k_BRHK[:, 1:], v_BRHK[:, 1:], active_Q)
          st["h_in"], st["h_out"] = h_in, h_BRD[:, 0]
          st["h"] = h_BRD[:, 0]
          st["q_h"] = jnp.where(active_Q[None, :, None], h_BRD[:, 1:], st["q_h"])
          st["q_depth"] = jnp.where(active_Q, i + 1, st["q_depth"])
          st["recomputed"] = st["recomputed"] + jnp.sum(active_Q, dtype=jnp.int32)
        return st

      if copy:
        st = plain(st)
      else:
        st = jax.lax.cond(jnp.any(st["q_depth"] < hi), catch_up, plain, st)
      st["layers_run"] = jnp.int32(hi)
      return st

    def check(st: dict, j: int) -> dict:
      """The exit check at exit layer `opts.exit_layers[j]`."""
      st = dict(st)
      k = opts.exit_layers[j]
      if opts.measure in exits.LOGIT_MEASURES:
        logits_BV = head(st["h"])
        conf_B = exits.logit_confidence(opts.measure, logits_BV)
      elif opts.measure == "state":
        logits_BV = None
        conf_B = exits.state_confidence(st["h_in"], st["h_out"])
      else:
        logits_BV = None
        conf_B = exits.probe_confidence(probe, st["h_in"], st["h_out"], jnp.int32(k))
      ok_B = conf_B >= threshold
      if opts.batch_exit == "sync":
        ok_B = jnp.broadcast_to(jnp.all(ok_B), ok_B.shape)
      new_B = ok_B & ~st["done"]
      if logits_BV is None:  # state, probe: the head only runs when a row exits here.
        logits_BV = jax.lax.cond(jnp.any(new_B), head,
                                 lambda h: jnp.zeros((b, cfg.vocab_size), jnp.float32),
                                 st["h"])
      st["logits"] = jnp.where(new_B[:, None], logits_BV, st["logits"])
      st["exit"] = jnp.where(new_B, k, st["exit"])
      st["conf"] = jnp.where(st["done"], st["conf"], conf_B)
      st["confs"] = st["confs"].at[:, j].set(conf_B)
      st["done"] = st["done"] | new_B
      st["checks"] = st["checks"] + 1
      stop = jnp.all(st["done"])
      if not copy:  # Stopping leaves this position pending: it needs a free queue slot.
        stop = stop & jnp.any(st["q_depth"] == n)
      st["stop"] = stop
      return st

    def skip_rest(st: dict, lo: int) -> dict:
      """Layers lo..N-1 of a stopped batch: under `copy` the keys/values of the copied
      state (one batched projection); under `recompute` nothing (the position's rows of
      these layers are written later by its catch-up, before anyone reads them)."""
      if not copy:
        return st
      k_LBHK, v_LBHK = _copied_kv(blocks_def, blocks_state, lo, st["h"], t)
      return dict(st, kv=[(k_LBHK[i], v_LBHK[i]) for i in range(n - lo)])

    def chain(st: dict, j: int) -> dict:
      """Segment j and, unless the batch stops after it, the segments above it."""
      lo, hi = segments[j]
      st = run_layers(st, lo, hi)
      if hi == n:
        return dict(st, logits=jnp.where(st["done"][:, None], st["logits"], head(st["h"])))
      st = check(st, j)
      # Only the rows of the layers not yet run go through the cond.
      own = {key: st[key][:hi - lo] for key in ("kv", "q_kv") if key in st}
      st.update({key: st[key][hi - lo:] for key in own})
      st = jax.lax.cond(st["stop"], functools.partial(skip_rest, lo=hi),
                        functools.partial(chain, j=j + 1), st)
      return dict(st, **{key: own[key] + list(st[key]) for key in own})

    tok_B = jax.lax.dynamic_index_in_dim(carry["tokens"], t, axis=1, keepdims=False)
    h_BD = model.embed_tokens(tok_B[:, None], jnp.reshape(t, (1, 1)))[:, 0]
    st = {
        "h": h_BD, "h_in": h_BD, "h_out": h_BD, "done": jnp.zeros((b,), bool),
        "stop": jnp.bool_(False), "logits": jnp.zeros((b, cfg.vocab_size), jnp.float32),
        "exit": jnp.full((b,), n, jnp.int32), "conf": jnp.full((b,), jnp.nan, jnp.float32),
        "confs": jnp.full((b, e), jnp.nan, jnp.float32), "checks": jnp.int32(0),
        "layers_run": jnp.int32(0), "recomputed": jnp.int32(0),
        "kv": [(zeros_BHK, zeros_BHK)] * n,
    }
    if not copy:
      zeros_BQHK = jnp.zeros((b, q, nh, hk), jnp.float32)
      st.update({key: carry[key] for key in ("q_h", "q_pos", "q_depth")})
      st["q_kv"] = [(zeros_BQHK, zeros_BQHK, jnp.zeros((q,), bool))] * n
    st = chain(st, 0)

    if not copy:  # Where the next step writes the caught-up rows (before slots move).
      st["q_kv"] = [(qk_BQHK, qv_BQHK, jnp.where(wrote_Q, st["q_pos"], s))
                    for qk_BQHK, qv_BQHK, wrote_Q in st["q_kv"]]
    if not copy:  # A stopped step leaves its position pending at the depth it reached.
      slot = jnp.argmax(st["q_depth"] == n)
      push = st["stop"]
      st["q_h"] = jnp.where(push, st["q_h"].at[:, slot].set(st["h"]), st["q_h"])
      st["q_pos"] = jnp.where(push, st["q_pos"].at[slot].set(t), st["q_pos"])
      st["q_depth"] = jnp.where(push, st["q_depth"].at[slot].set(st["layers_run"]),
                                st["q_depth"])

    if opts.sample:
      logits_BV = st["logits"] / temperature
      if opts.top_k:
        kth_B1 = jax.lax.top_k(logits_BV, opts.top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
      next_B = jax.random.categorical(jax.random.fold_in(rng, t), logits_BV).astype(jnp.int32)
    else:
      next_B = jnp.argmax(st["logits"], -1).astype(jnp.int32)
    forced_B = jax.lax.dynamic_index_in_dim(carry["tokens"], t + 1, axis=1, keepdims=False)
    next_B = jnp.where(t + 1 < opts.num_forced, forced_B, next_B)
    if opts.eos_id >= 0:  # After its end-of-sequence token a row only pads (with EOS).
      next_B = jnp.where(carry["ended"], opts.eos_id, next_B)

    out = dict(carry, caches=caches, rows=st["kv"])
    out["tokens"] = jax.lax.dynamic_update_index_in_dim(carry["tokens"], next_B, t + 1, 1)
    for key, value in (("exit", st["exit"]), ("conf", st["conf"]), ("confs", st["confs"])):
      out[key] = jax.lax.dynamic_update_index_in_dim(carry[key], value, m, 1)
    for key, value in (("layers_run", st["layers_run"]), ("recomputed", st["recomputed"]),
                       ("checks", st["checks"])):
      out[key] = carry[key].at[m].set(value)
    if opts.return_logits:
      out["logits"] = jax.lax.dynamic_update_index_in_dim(carry["logits"], st["logits"], m, 1)
    if opts.eos_id >= 0:
      out["ended"] = carry["ended"] | ((next_B == opts.eos_id) & (t + 1 >= opts.num_forced))
    if not copy:
      out.update({key: st[key] for key in ("q_h", "q_pos", "q_depth")})
      out["q_rows"] = st["q_kv"]
    return out

  steps = opts.num_steps
  carry = {
      "tokens": tokens_BL, "caches": caches, "rows": rows,
      "exit": jnp.zeros((b, steps), jnp.int32), "conf": jnp.zeros((b, steps), jnp.float32),
      "confs": jnp.zeros((b, steps, e), jnp.float32),
      "layers_run": jnp.zeros((steps,), jnp.int32), "recomputed": jnp.zeros((steps,), jnp.int32),
      "checks": jnp.zeros((steps,), jnp.int32),
  }
  if opts.return_logits:
    carry["logits"] = jnp.zeros((b, steps, cfg.vocab_size), jnp.float32)
  if opts.eos_id >= 0:
    carry["ended"] = jnp.zeros((b,), bool)
  if not copy:
    zeros_BQHK = jnp.zeros((b, q, nh, hk), jnp.float32)
    carry.update(q_h=jnp.zeros((b, q, d), jnp.float32), q_pos=jnp.zeros((q,), jnp.int32),
                 q_depth=jnp.full((q,), n, jnp.int32),
                 q_rows=[(zeros_BQHK, zeros_BQHK, jnp.full((q,), s, jnp.int32))] * n)
  carry = jax.lax.fori_loop(0, steps, step, carry)
  return DecodeResult(
      tokens=carry["tokens"], exit_layer=carry["exit"], confidence=carry["conf"],
      checked_confidence=carry["confs"], logits=carry.get("logits"),
      layers_run=carry["layers_run"], recomputed_layers=carry["recomputed"],
      checks=carry["checks"], start=opts.prefill, exit_layers=opts.exit_layers)


# ----------------------------------------------------------------------------------------
# Validation and the public entry points.


def _check_options(model: DeepSupervisionTransformer, exit_layers: Sequence[int],
                   measure: str, kv_policy: str, batch_exit: str, max_pending: int
                   ) -> tuple[int, ...]:
  if not isinstance(model, DeepSupervisionTransformer):
    raise UserError(f"model must be a DeepSupervisionTransformer, got {type(model).__name__}")
  layers = exits._check_exit_layers(exit_layers, model.config.num_layers)
  exits._check_choice("measure", measure, MEASURES)
  exits._check_choice("kv_policy", kv_policy, KV_POLICIES)
  exits._check_choice("batch_exit", batch_exit, BATCH_EXITS)
  if not isinstance(max_pending, (int, np.integer)) or isinstance(max_pending, bool) or (
      max_pending < 1):
    raise UserError(f"max_pending={max_pending!r} must be an integer >= 1 (pending positions "
                    "the recompute policy may hold)")
  return layers


def _check_probe_and_threshold(model, threshold, exit_layers, measure, kv_policy, probe
                               ) -> tuple[Array, Any, Any, int]:
  """(threshold, static probe, traced probe, probe FLOPs), with one-line errors."""
  if (measure == "probe") != (probe is not None):
    raise UserError("measure='probe' needs probe=..., and probe=... needs measure='probe': "
                    "pass both or neither")
  static_probe, dynamic_probe, probe_flops = exits.split_probe(probe)
  # A calibrated threshold must have been calibrated under these very settings.
  threshold = exits._check_threshold(threshold, measure, exits.exit_settings(
      model.config.num_layers, exit_layers=exit_layers, measure=measure,
      kv_policy=EMULATED_POLICY[kv_policy]))
  if threshold.ndim:
    raise UserError(f"threshold must be a scalar for decoding, got shape {threshold.shape}")
  return threshold, static_probe, dynamic_probe, probe_flops


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
) -> DecodeResult:
  """Generates tokens with early exit: one jitted call, KV cache, skipped layers.

  The prompt runs at full depth except its last token, which is the first decode step;
  every generated token comes from a step that may exit early. The threshold (and the
  temperature) are traced: new values never recompile.

  Args:
    model: a `DeepSupervisionTransformer`.
    prompt: int [B, P] (or [P]) token ids; every row has the same length P >= 1.
    max_new_tokens: M >= 1 tokens to generate; P + M - 1 <= config.max_len.
    threshold: confidence threshold (as in `predict_with_exit`); `jnp.inf` never exits.
    exit_layers: strictly ascending 1-based layers; `(N,)` is the full-depth baseline
      (no checks, no conds).
    measure: "softmax", "margin", "entropy", "state" or "probe".
    kv_policy: "copy" or "recompute" (module docstring).
    batch_exit: "sync" (the batch exits when every row is confident) or "row".
    temperature: 0 = greedy; > 0 samples from softmax(logits / temperature).
    top_k: sample only among the k most likely tokens (0 = all); needs temperature > 0.
    rng: PRNG key for sampling (default `jax.random.key(0)`).
    max_pending: queue slots of `recompute` (pending exited positions).
    return_logits: also return every step's [B, M, V] logits.
    eos_id: end-of-sequence token id: a row that generates it stops, and its remaining
      positions hold `eos_id` (the batch keeps its static shape; None = no stop).
    probe: the confidence probe of measure "probe" (e.g. `probes.load_probe(dir)`), as
      in `predict_with_exit`; its weights are traced (new weights never recompile).

  Returns:
    A `DecodeResult` with `start = P - 1`; `result.new_tokens` are the M new tokens.
  """
  layers = _check_options(model, exit_layers, measure, kv_policy, batch_exit, max_pending)
  threshold, static_probe, dynamic_probe, _ = _check_probe_and_threshold(
      model, threshold, exit_layers, measure, kv_policy, probe)
  prompt_BP = compiled.check_tokens(prompt, "prompt")
  compiled.check_vocab(prompt_BP, model.config.vocab_size, "prompt")
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
                  top_k=int(top_k), return_logits=bool(return_logits),
                  eos_id=compiled.check_eos(eos_id, model.config.vocab_size),
                  static_probe=static_probe)
  rng = compiled.default_rng() if rng is None else rng
  return compiled.call(decode, model, prompt_BP, threshold,
                       np.float32(max(temperature, 1e-6)), rng, dynamic_probe, opts=opts)


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
                       compiled.default_rng(), dynamic_probe, opts=opts)
