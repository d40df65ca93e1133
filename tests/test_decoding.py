"""Tests for real early-exit decoding: equal to the emulation, batch rules, generation, binary."""

import functools
import os
import subprocess
import sys

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_model
from flax import nnx

from deepexit_jax import decoding, exits
from deepexit_jax.checkpoint import save_model
from deepexit_jax.errors import UserError
from deepexit_jax.model import ModelConfig, all_layer_logits, create_model
from deepexit_jax.tokenizers import CharTokenizer

CONFIG = ModelConfig(vocab_size=23, num_layers=4, dim=16, num_heads=2, max_len=16)
N = CONFIG.num_layers
EXITS = (1, 2, 3)
# Thresholds that exit some tokens early and send others deeper for the model below.
THRESHOLDS = {"softmax": 0.6, "margin": 0.3, "state": 0.9}


@functools.cache
def _model():
  return random_model(CONFIG)


@functools.cache
def _tokens(b=3, t=12):
  return np.random.default_rng(1).integers(0, CONFIG.vocab_size, (b, t)).astype(np.int32)


def _assert_equals_emulation(res, emu):
  np.testing.assert_array_equal(np.asarray(res.exit_layer), np.asarray(emu.exit_layer))
  np.testing.assert_allclose(np.asarray(res.logits), np.asarray(emu.logits), atol=1e-4,
                             rtol=1e-4)
  np.testing.assert_allclose(np.asarray(res.confidence), np.asarray(emu.confidence),
                             atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kv_policy, measure", [
    ("copy", "softmax"), ("copy", "state"), ("recompute", "softmax"), ("recompute", "margin"),
])
def test_teacher_forced_decoder_equals_the_emulation(kv_policy, measure):
  """The incremental decoder reproduces `predict_with_exit` exit layers and logits."""
  model, tokens, thr = _model(), _tokens(), THRESHOLDS[measure]
  res = decoding.decode_teacher_forced(model, tokens, thr, exit_layers=EXITS, measure=measure,
                                       kv_policy=kv_policy, batch_exit="row")
  emu = exits.predict_with_exit(model, tokens, thr, exit_layers=EXITS, measure=measure,
                                kv_policy=decoding.EMULATED_POLICY[kv_policy])
  exit_layer = np.asarray(emu.exit_layer)
  # The test means something only if exits are mixed.
  assert (exit_layer < N).any() and (exit_layer > 1).any()
  _assert_equals_emulation(res, emu)
  # Row rule: the batch runs as deep as its deepest row, no deeper, under copy.
  if kv_policy == "copy":
    np.testing.assert_array_equal(np.asarray(res.layers_run), exit_layer.max(0))
    assert (np.asarray(res.recomputed_layers) == 0).all()


def test_recompute_catch_up_and_queue_overflow_stay_exact():
  """Pending positions are caught up before anyone attends to their deeper layers; a full
  queue makes a token run to full depth, which changes no output."""
  model, tokens, max_pending = _model(), _tokens(), 2
  for thr in (0.0, THRESHOLDS["softmax"]):
    res = decoding.decode_teacher_forced(model, tokens, thr, exit_layers=EXITS,
                                         kv_policy="recompute", max_pending=max_pending)
    emu = exits.predict_with_exit(model, tokens, thr, exit_layers=EXITS, kv_policy="oracle")
    _assert_equals_emulation(res, emu)
    recomputed, run = np.asarray(res.recomputed_layers), np.asarray(res.layers_run)
    assert recomputed.sum() > 0
    if thr == 0.0:  # Everyone exits at layer 1: the queue fills, then a flush to layer N.
      assert (run == N).sum() == len(run) // (max_pending + 1)
      assert recomputed.max() == max_pending * (N - 1)


@pytest.mark.parametrize("kv_policy", decoding.KV_POLICIES)
def test_sync_batch_exits_when_every_row_is_confident(kv_policy):
  model, tokens, thr = _model(), _tokens(), THRESHOLDS["softmax"]
  res = decoding.decode_teacher_forced(model, tokens, thr, exit_layers=EXITS,
                                       kv_policy=kv_policy, batch_exit="sync")
  exit_BM = np.asarray(res.exit_layer)
  conf_BME = np.asarray(res.checked_confidence)
  assert (exit_BM == exit_BM[:1]).all()  # One exit layer per step for the whole batch.
  assert len(set(exit_BM[0].tolist())) > 1
  for m, k in enumerate(exit_BM[0]):
    for j, layer in enumerate(EXITS):
      if layer < k:  # Checked, and some row was not confident.
        assert (conf_BME[:, m, j] < thr).any()
      elif layer == k:  # Every row confident.
        assert (conf_BME[:, m, j] >= thr).all()
      else:  # Never checked.
        assert np.isnan(conf_BME[:, m, j]).all()
  # Row rule on the same text: each row exits at its first confident check.
  row = decoding.decode_teacher_forced(model, tokens, thr, exit_layers=EXITS,
                                       kv_policy=kv_policy, batch_exit="row")
  conf_row = np.asarray(row.checked_confidence)
  first = np.where((conf_row >= thr).any(-1), np.asarray(EXITS)[np.argmax(conf_row >= thr, -1)],
                   N)
  np.testing.assert_array_equal(np.asarray(row.exit_layer), first)
  assert not (np.asarray(row.exit_layer) == np.asarray(row.exit_layer)[:1]).all()


def test_single_row_sync_equals_the_emulation():
  model, tokens, thr = _model(), _tokens()[:1], THRESHOLDS["softmax"]
  res = decoding.decode_teacher_forced(model, tokens, thr, exit_layers=EXITS, batch_exit="sync")
  emu = exits.predict_with_exit(model, tokens, thr, exit_layers=EXITS, kv_policy="copy")
  _assert_equals_emulation(res, emu)


def _naive_greedy(model, prompt_BP, steps):
  """Greedy decoding that reruns the full forward pass on the whole text every step."""
  tokens = np.asarray(prompt_BP)
  for _ in range(steps):
    padded = np.zeros((tokens.shape[0], CONFIG.max_len), np.int32)
    padded[:, :tokens.shape[1]] = tokens  # Causal: the padding does not change the logits.
    last = np.asarray(all_layer_logits(model, padded))[-1, :, tokens.shape[1] - 1]
    tokens = np.concatenate([tokens, last.argmax(-1)[:, None].astype(np.int32)], 1)
  return tokens


def test_never_exiting_greedy_equals_full_depth_greedy():
  model, prompt = _model(), _tokens(2, 5)
  steps = CONFIG.max_len - prompt.shape[1] + 1  # Fills the cache exactly.
  full = decoding.generate(model, prompt, steps, jnp.inf, exit_layers=(N,))
  np.testing.assert_array_equal(np.asarray(full.tokens), _naive_greedy(model, prompt, steps))
  assert (np.asarray(full.exit_layer) == N).all() and (np.asarray(full.checks) == 0).all()
  for kv_policy in decoding.KV_POLICIES:
    never = decoding.generate(model, prompt, steps, jnp.inf, exit_layers=EXITS,
                              kv_policy=kv_policy)
    np.testing.assert_array_equal(np.asarray(never.tokens), np.asarray(full.tokens))
    assert (np.asarray(never.checks) == len(EXITS)).all()


# Ragged prompts: row b's prompt is _tokens()[b, :RAGGED[b]]. With threshold 0.6 and
# batch_exit="row", EOS_RAGGED ends rows 1 and 2 early (greedy) while row 0 never meets it
# and fills the cache to max_len (checked below, so a changed model cannot make it vacuous).
RAGGED, EOS_RAGGED = (6, 2, 4), 9


@pytest.mark.parametrize("kv_policy", decoding.KV_POLICIES)
def test_prompts_of_different_lengths_equal_one_row_runs(kv_policy):
  """Each row of a ragged batch decodes at its own positions, exactly as it would alone:
  the same tokens and exit layers (greedy), the same samples with a key per row, the same
  FLOP counts; an EOS row and a row that reaches max_len in the same batch."""
  model, tokens = _model(), _tokens()
  prompts = [tokens[i, :n] for i, n in enumerate(RAGGED)]
  m = CONFIG.max_len - max(RAGGED) + 1
  kwargs = dict(exit_layers=EXITS, kv_policy=kv_policy, batch_exit="row", max_pending=2,
                eos_id=EOS_RAGGED)
  res = decoding.generate(model, prompts, m, 0.6, **kwargs)
  out, new = np.asarray(res.tokens), np.asarray(res.new_tokens)
  assert out.shape == (3, max(RAGGED) + m) and new.shape == (3, m)
  alone_cost = np.zeros(3)
  for row, n in enumerate(RAGGED):
    alone = decoding.generate(model, prompts[row], m, 0.6, **kwargs)
    np.testing.assert_array_equal(new[row], np.asarray(alone.new_tokens)[0])
    np.testing.assert_array_equal(np.asarray(res.exit_layer)[row],
                                  np.asarray(alone.exit_layer)[0])
    np.testing.assert_array_equal(out[row, :n], prompts[row])
    assert (out[row, n + m:] == EOS_RAGGED).all()  # Right padding.
    c = decoding.decode_cost(CONFIG, alone, kv_policy=kv_policy)
    alone_cost += (c.full_depth, c.ideal, c.executed)
  cost = decoding.decode_cost(CONFIG, res, kv_policy=kv_policy)
  np.testing.assert_allclose((cost.full_depth, cost.ideal), alone_cost[:2])
  assert cost.executed >= alone_cost[2]  # Rows wait for the deepest one.
  ended = (new == EOS_RAGGED).any(1)
  assert ended[1:].all() and not ended[0]  # Row 0 runs to position max_len - 1.
  assert len(set(np.asarray(res.exit_layer).ravel().tolist())) > 2  # Mixed exits.
  if kv_policy == "recompute":
    return  # The sampling path does not depend on the policy (4 compilations saved).
  # Sampling: a padded array with prompt_lengths (the padding is ignored) and one key
  # per row give each row exactly its own one-row draws.
  padded = np.where(np.arange(tokens.shape[1]) < np.array(RAGGED)[:, None], tokens, 99)
  keys = jax.random.split(jax.random.key(5), 3)
  sampled = decoding.generate(model, padded, m, 0.6, prompt_lengths=RAGGED, rng=keys,
                              temperature=1.0, **kwargs)
  for row in range(3):
    alone = decoding.generate(model, prompts[row], m, 0.6, rng=keys[row:row + 1],
                              temperature=1.0, **kwargs)
    np.testing.assert_array_equal(np.asarray(sampled.new_tokens)[row],
                                  np.asarray(alone.new_tokens)[0])
  assert (np.asarray(sampled.new_tokens) != new).any()  # Not greedy.


def test_full_depth_baseline_is_the_same_code_without_conds():
  model, prompt = _model(), _tokens(1, 4)

  def conds(exit_layers):
    jaxpr = jax.make_jaxpr(lambda p: decoding.generate(
        model, p, 4, 0.5, exit_layers=exit_layers).tokens)(jnp.asarray(prompt))
    return str(jaxpr).count(" cond[")

  assert conds((N,)) == 0
  assert conds(EXITS) >= len(EXITS)


def test_generated_tokens_follow_the_exit_logits_and_threshold_is_traced():
  model, prompt = _model(), _tokens(2, 3)
  jitted = decoding.compiled.decoder_of(decoding.early_exit.decode, model)
  res = decoding.generate(model, prompt, 8, 0.6, exit_layers=EXITS, return_logits=True)
  size = jitted._cache_size()
  again = decoding.generate(model, prompt, 8, 0.2, exit_layers=EXITS, return_logits=True)
  assert jitted._cache_size() == size  # A new threshold does not recompile.
  assert (np.asarray(again.exit_layer) <= np.asarray(res.exit_layer)).mean() > 0.5
  np.testing.assert_array_equal(np.asarray(res.new_tokens),
                                np.asarray(res.logits).argmax(-1))
  # Sampling with top_k=1 is greedy whatever the temperature and seed.
  top1 = decoding.generate(model, prompt, 8, 0.6, exit_layers=EXITS, temperature=2.0,
                           top_k=1, rng=jax.random.key(3))
  np.testing.assert_array_equal(np.asarray(top1.tokens), np.asarray(res.tokens))


def test_reused_split_sees_updated_values_and_replaced_modules():
  """`generate` reuses the model's split between calls; in-place updates of parameters
  and replaced submodules still reach the decoder."""
  model = random_model(CONFIG)  # A private copy: this test edits it.
  prompt = _tokens()[:, :4]

  def logits():
    return np.asarray(decoding.generate(model, prompt, 3, 0.6, exit_layers=EXITS,
                                        return_logits=True).logits)

  before = logits()
  np.testing.assert_array_equal(logits(), before)
  model.unembed.bias[...] = model.unembed.bias[...] + 1.0  # In place: shifts every logit.
  np.testing.assert_allclose(logits(), before + 1.0, atol=1e-4)
  shifted = logits()
  model.final_norm = nnx.LayerNorm(CONFIG.dim, rngs=nnx.Rngs(0))
  model.final_norm.bias[...] = jnp.full((CONFIG.dim,), 0.5)
  replaced = logits()
  assert not np.allclose(replaced, shifted, atol=1e-3)
  expected = decoding.generate(nnx.clone(model), prompt, 3, 0.6, exit_layers=EXITS,
                               return_logits=True).logits  # A fresh split.
  np.testing.assert_allclose(replaced, np.asarray(expected), atol=1e-5)


def test_decode_cost_of_copy_at_batch_one_is_the_emulations():
  model, tokens = _model(), _tokens()[:1]
  res = decoding.decode_teacher_forced(model, tokens, 0.6, exit_layers=EXITS, batch_exit="sync")
  cost = decoding.decode_cost(CONFIG, res)
  emu = exits.predict_with_exit(model, tokens, 0.6, exit_layers=EXITS, kv_policy="copy")
  counter = exits.FlopCounter.from_config(CONFIG)
  t = np.arange(tokens.shape[1])
  np.testing.assert_allclose(cost.full_depth, counter.full_depth(t).sum())
  np.testing.assert_allclose(cost.ideal / cost.full_depth,
                             np.sum(np.asarray(emu.flops_fraction) * counter.full_depth(t))
                             / counter.full_depth(t).sum(), rtol=1e-5)
  np.testing.assert_allclose(cost.executed, cost.ideal, rtol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompt=np.zeros((1, 0), np.int32)), "at least one token"),
    (dict(max_new_tokens=CONFIG.max_len + 1), "max_len"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(threshold=float("nan")), "NaN"),
    (dict(threshold=-0.5), "negative"),
    (dict(exit_layers=(2, 5)), "layers are numbered"),
    (dict(kv_policy="oracle"), "kv_policy"),
    (dict(batch_exit="any"), "batch_exit"),
    (dict(measure="probe"), "measure"),
    (dict(prompt=np.array([[1, 99]])), "vocabulary"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_k=3), "temperature > 0"),
    (dict(max_pending=0), "max_pending"),
    (dict(prompt_lengths=[0]), "prompt_lengths"),
    (dict(prompt=[[1, 2], [3]], prompt_lengths=[2, 1]), "not both"),
    (dict(prompt=[[1, 2], [3, 99, 4]]), "vocabulary"),
    (dict(rng=jax.random.split(jax.random.key(0), 2)), "one per prompt row"),
])
def test_bad_inputs(kwargs, match):
  args = dict(prompt=_tokens(1, 3), max_new_tokens=4, threshold=0.5)
  args.update(kwargs)
  with pytest.raises(UserError, match=match):
    decoding.generate(_model(), args.pop("prompt"), args.pop("max_new_tokens"),
                      args.pop("threshold"), **args)


def test_exit_layer_lines_align_digits_under_characters():
  lines = decoding.exit_layer_lines("ab\ncd", [1, 2, 12, 4, 3], width=3)
  assert lines == ["ab\u21b5", "12c", "cd", "43"]


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
  """A saved (untrained) model with a character tokenizer, as the binary loads it."""
  from conftest import corpus_text

  text = corpus_text(2000)
  tok = CharTokenizer.fit(text)
  model = create_model(ModelConfig(vocab_size=tok.vocab_size, num_layers=3, dim=16,
                                   num_heads=2, max_len=32))
  return save_model(model, str(tmp_path_factory.mktemp("gen") / "ckpt"), tokenizer=tok)


def _binary(*args):
  return subprocess.run([sys.executable, "-m", "deepexit_jax.main.generate", *args],
                        capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))


def test_binary_prints_text_exit_layers_and_speed(checkpoint_dir):
  ok = _binary(f"--checkpoint={checkpoint_dir}", "--prompt=The ", "--max_new_tokens=20",
               "--threshold=0.0", "--exit_layers=1,2", "--show_exits", "--baseline")
  assert ok.returncode == 0, ok.stderr[-2000:]
  lines = ok.stdout.splitlines()
  # Threshold 0 exits every generated token at layer 1: a row of 1s under the text.
  assert lines[1] == "1" * 20 and len(lines[0]) == 20
  assert "tokens/s" in ok.stdout and "mean exit layer 1.00 of 3" in ok.stdout
  assert "measured speedup" in ok.stdout


@pytest.mark.parametrize("args, words", [
    (("--prompt=",), "prompt is empty"),
    (("--prompt=ab\u00e9\u4e2d",), "never saw"),
    (("--prompt=The", "--max_new_tokens=40", "--threshold=nan"), "NaN"),
])
def test_binary_bad_input_is_one_line(checkpoint_dir, args, words):
  bad = _binary(f"--checkpoint={checkpoint_dir}", *args)
  assert bad.returncode == 2
  assert bad.stderr.strip().splitlines()[-1].startswith("error:")
  assert words in bad.stderr and "Traceback" not in bad.stderr


# Every measure and both policies; not all 8 pairs (each pair is a compilation). The
# check (`>=`) is the same code under both policies, and layer 2's confidences do not
# depend on the policy, so each measure once, the policies alternating, covers it.
@pytest.mark.parametrize("measure, kv_policy", [
    ("softmax", "copy"), ("margin", "recompute"), ("entropy", "copy"),
    ("state", "recompute")])
def test_decoder_threshold_equal_to_a_confidence_exits_there(measure, kv_policy):
  """`>=` in the decoder: a threshold set exactly to a token's computed confidence makes
  it exit there. Layer 2's confidences do not depend on the threshold (exits at 2 only
  change layers 3 and up), so the never-exiting decode gives them all."""
  model, tokens = _model(), _tokens()
  kwargs = dict(exit_layers=(2,), measure=measure, kv_policy=kv_policy, batch_exit="row")
  never = decoding.decode_teacher_forced(model, tokens, np.inf, **kwargs)
  conf_BM = np.asarray(never.checked_confidence)[..., 0]
  assert np.all(np.isfinite(conf_BM)) and np.all(np.asarray(never.exit_layer) == N)
  candidates = conf_BM[conf_BM > 0] if measure == "state" else conf_BM.ravel()
  thr = np.quantile(candidates, 0.5, method="nearest").astype(np.float32)
  res = decoding.decode_teacher_forced(model, tokens, thr, **kwargs)
  assert (conf_BM == thr).any()
  np.testing.assert_array_equal(np.asarray(res.checked_confidence)[..., 0], conf_BM)
  np.testing.assert_array_equal(np.asarray(res.exit_layer), np.where(conf_BM >= thr, 2, N))


def _hand_decode_cost(exit_BM, kv_policy, batch_exit, exit_layers=EXITS):
  """Layers run, checks, catch-up layers per step and the three FLOP totals, counted by
  hand from the rows' exit layers with `exits.FlopCounter`'s pieces (no queue overflow).

  The batch runs to its shared exit layer (sync) or its deepest row's (row). Under
  `recompute` a position left pending at depth d is caught up, one layer at a time, by
  every later step that runs deeper than d, up to that step's depth."""
  c = exits.FlopCounter.from_config(CONFIG)
  b, m = exit_BM.shape
  run_M = exit_BM[0] if batch_exit == "sync" else exit_BM.max(0)
  checks_M = np.array([sum(k <= r for k in exit_layers) for r in run_M])
  rec_M = np.zeros(m, int)
  depth = {}  # pending position -> depth reached so far
  for q in range(m):
    if kv_policy == "recompute":
      for p in depth:
        rec_M[q] += max(0, run_M[q] - depth[p])
        depth[p] = max(depth[p], run_M[q])
      if run_M[q] < N:
        depth[q] = run_M[q]
  full = ideal = executed = 0
  for q in range(m):
    t = q  # teacher forced: step q is position q
    full += b * (N * c.block(t) + c.head)
    for row in range(b):
      k = exit_BM[row, q]
      ideal += (k * c.block(t) + (N - k) * c.kv * (kv_policy == "copy")
                + sum(j <= k for j in exit_layers) * c.head + (k == N) * c.head)
    executed += b * ((run_M[q] + rec_M[q]) * c.block(t) + checks_M[q] * c.head
                     + (run_M[q] == N) * c.head
                     + (N - run_M[q]) * c.kv * (kv_policy == "copy"))
  return run_M, checks_M, rec_M, (full, ideal, executed)


@pytest.mark.parametrize("batch_exit", decoding.BATCH_EXITS)
@pytest.mark.parametrize("kv_policy", decoding.KV_POLICIES)
def test_decode_cost_at_batch_three_is_the_hand_count(kv_policy, batch_exit):
  model, tokens, thr = _model(), _tokens(), THRESHOLDS["softmax"]
  res = decoding.decode_teacher_forced(model, tokens, thr, exit_layers=EXITS,
                                       kv_policy=kv_policy, batch_exit=batch_exit,
                                       max_pending=16)
  exit_BM = np.asarray(res.exit_layer)
  run_M, checks_M, rec_M, (full, ideal, executed) = _hand_decode_cost(
      exit_BM, kv_policy, batch_exit)
  np.testing.assert_array_equal(np.asarray(res.layers_run), run_M)
  np.testing.assert_array_equal(np.asarray(res.checks), checks_M)
  np.testing.assert_array_equal(np.asarray(res.recomputed_layers), rec_M)
  cost = decoding.decode_cost(CONFIG, res, kv_policy=kv_policy)
  assert (cost.full_depth, cost.ideal, cost.executed) == (full, ideal, executed)
  assert cost.mean_exit_layer == exit_BM.mean() and cost.mean_layers_run == run_M.mean()
  # Not vacuous: mixed depths, and under recompute some catch-up work.
  assert len(set(run_M.tolist())) > 1 and cost.ideal < cost.full_depth
  assert (rec_M.sum() > 0) == (kv_policy == "recompute")
  if batch_exit == "row":
    assert cost.executed > cost.ideal  # rows wait for the deepest one


@flax.struct.dataclass
class _DeltaProbe:
  """A learned-probe stand-in: sigmoid(w . (h_out - h_in) + c * layer), traced weights."""

  w: jax.Array
  c: jax.Array
  flops_per_token: int = flax.struct.field(pytree_node=False, default=37)

  def __call__(self, h_in, h_out, layer):
    return jax.nn.sigmoid(jnp.sum((h_out - h_in) * self.w, -1) + self.c * layer)


@pytest.mark.parametrize("kv_policy", decoding.KV_POLICIES)
def test_probe_measure_decodes_as_the_emulation_and_costs_its_flops(kv_policy):
  model, tokens = _model(), _tokens()
  rng = np.random.default_rng(4)
  probe = _DeltaProbe(w=jnp.asarray(rng.normal(0, 1, CONFIG.dim), jnp.float32),
                      c=jnp.float32(0.3))
  emu_policy = decoding.EMULATED_POLICY[kv_policy]
  conf = np.asarray(exits.predict_with_exit(model, tokens, np.inf, exit_layers=EXITS,
                                            measure="probe", probe=probe,
                                            kv_policy=emu_policy).confidence)
  thr = float(np.median(conf))
  res = decoding.decode_teacher_forced(model, tokens, thr, exit_layers=EXITS, measure="probe",
                                       probe=probe, kv_policy=kv_policy)
  emu = exits.predict_with_exit(model, tokens, thr, exit_layers=EXITS, measure="probe",
                                probe=probe, kv_policy=emu_policy)
  exit_layer = np.asarray(emu.exit_layer)
  assert (exit_layer < N).any() and (exit_layer == N).any()
  _assert_equals_emulation(res, emu)
  # The ideal cost is the emulation's own count, probe FLOPs per check included.
  cost = decoding.decode_cost(CONFIG, res, measure="probe", kv_policy=kv_policy,
                              probe_flops=probe.flops_per_token)
  counter = exits.FlopCounter.from_config(CONFIG)
  t = np.arange(tokens.shape[1])
  np.testing.assert_allclose(cost.ideal, float(np.sum(
      np.asarray(emu.flops_fraction) * counter.full_depth(t))), rtol=1e-5)
  # New probe weights are traced: no recompile; a probe needs measure="probe".
  jitted = decoding.compiled.decoder_of(decoding.early_exit.decode, model)
  size = jitted._cache_size()
  decoding.decode_teacher_forced(model, tokens, thr, exit_layers=EXITS, measure="probe",
                                 probe=probe.replace(c=jnp.float32(0.5)), kv_policy=kv_policy)
  assert jitted._cache_size() == size
  with pytest.raises(UserError, match="needs probe"):
    decoding.generate(model, tokens[:, :3], 2, thr, exit_layers=EXITS, probe=probe)
