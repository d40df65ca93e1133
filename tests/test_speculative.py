"""Self-speculative decoding: exactly the full model's greedy tokens / sampling distribution."""

import itertools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_model

from deepexit_jax import decoding, exits
from deepexit_jax.errors import UserError
from deepexit_jax.model import ModelConfig, all_layer_logits

CONFIG = ModelConfig(vocab_size=23, num_layers=4, dim=32, num_heads=2, ffn_dim=64, max_len=40)
N = CONFIG.num_layers


@pytest.fixture(scope="module")
def model():
  # Layers disagree often enough that drafts are both accepted and rejected.
  return random_model(CONFIG, seed=1)


def _prompt(b=3, p=5, seed=0, vocab=CONFIG.vocab_size):
  return np.random.RandomState(seed).randint(0, vocab, (b, p)).astype(np.int32)


def _greedy(model, prompt, m):
  return np.asarray(decoding.generate(model, prompt, m, np.inf, exit_layers=(
      model.config.num_layers,)).tokens)


@pytest.mark.parametrize("draft_layer, draft_len", [(1, 1), (2, 3), (3, 5)])
def test_greedy_equals_full_depth_greedy(model, draft_layer, draft_len):
  prompt = _prompt()
  m = CONFIG.max_len - prompt.shape[1] + 1  # The decode reaches max_len.
  res = decoding.speculative_generate(model, prompt, m, draft_layer=draft_layer,
                                      draft_len=draft_len)
  np.testing.assert_array_equal(np.asarray(res.tokens), _greedy(model, prompt, m))
  # Drafts were both accepted and rejected, and rows differ in acceptance.
  assert 0 < res.acceptance_rate < 1
  accepted_B = np.asarray(res.accepted).sum(0)
  assert len(set(accepted_B.tolist())) > 1
  assert np.asarray(res.tokens).shape == (3, prompt.shape[1] + m)
  cycles_B = res.cycles
  assert (cycles_B >= m / (draft_len + 1)).all() and (cycles_B <= m).all()
  # Every row commits exactly its accepted drafts plus one token per cycle.
  np.testing.assert_array_equal(accepted_B + cycles_B, m)
  assert res.tokens_per_cycle == pytest.approx(3 * m / cycles_B.sum())


def test_eos_stops_each_row_and_pads_in_both_decoders(model):
  prompt = _prompt(b=3, seed=7)
  m = 24
  full = _greedy(model, prompt, m)
  new = full[:, prompt.shape[1]:]
  # The id that first appears latest among the rows' first occurrences, so rows end at
  # different steps (some may never generate it).
  ids, counts = np.unique(new[:, 2:-2], return_counts=True)
  eos = int(ids[np.argmax(counts)])
  expected = full.copy()
  for row, toks in enumerate(new):
    hits = np.flatnonzero(toks == eos)
    if hits.size:
      expected[row, prompt.shape[1] + hits[0] + 1:] = eos
  assert (expected != full).any()  # Some row ends early.
  gen = decoding.generate(model, prompt, m, np.inf, exit_layers=(N,), eos_id=eos)
  np.testing.assert_array_equal(np.asarray(gen.tokens), expected)
  res = decoding.speculative_generate(model, prompt, m, draft_layer=3, draft_len=5,
                                      eos_id=eos)
  np.testing.assert_array_equal(np.asarray(res.tokens), expected)
  # Some row met its EOS inside a cycle's accepted run (tokens after it are dropped).
  assert (np.asarray(res.committed) < np.asarray(res.accepted) + 1).any()
  ended = (expected[:, prompt.shape[1]:] == eos).sum(1) > 0
  plain = decoding.speculative_generate(model, prompt, m, draft_layer=3, draft_len=5)
  # A row that ended takes fewer cycles and commits only up to its EOS.
  assert (res.cycles[ended] <= plain.cycles[ended]).all()
  first = [int(np.flatnonzero(r == eos)[0]) + 1 if (r == eos).any() else m
           for r in new]
  np.testing.assert_array_equal(np.asarray(res.committed).sum(0), first)
  with pytest.raises(UserError, match="eos_id"):
    decoding.speculative_generate(model, prompt, m, draft_layer=2, eos_id=CONFIG.vocab_size)


def test_rollback_next_cycles_logits_equal_a_fresh_full_depth_run(model):
  """After every rejection the caches are cut back: each committed token's verification
  logits equal the full-depth logits of a fresh pass over the accepted text."""
  prompt = _prompt(b=2, p=4, seed=3)
  res = decoding.speculative_generate(model, prompt, 24, draft_layer=2, draft_len=4,
                                      return_logits=True)
  assert np.asarray(res.drafted).sum() > np.asarray(res.accepted).sum()  # Rejections.
  tokens = np.asarray(res.tokens)
  fresh = np.asarray(all_layer_logits(model, tokens[:, :-1]))[-1]  # [B, T - 1, V]
  np.testing.assert_allclose(np.asarray(res.logits), fresh[:, 3:], atol=2e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def trained_workdir(tiny_config, tmp_path_factory):
  """One short training run, shared by the trained-model and binary tests."""
  from deepexit_jax import train_model

  workdir = str(tmp_path_factory.mktemp("spec") / "run")
  train_model(tiny_config(max_steps=30, eval_every=0), workdir)
  return workdir


def test_trained_model_greedy_and_acceptance(trained_workdir):
  from deepexit_jax import load_model

  trained = load_model(trained_workdir)
  prompt = _prompt(b=2, p=6, seed=1, vocab=trained.config.vocab_size)
  res = decoding.speculative_generate(trained, prompt, 20, draft_layer=1, draft_len=3)
  np.testing.assert_array_equal(np.asarray(res.tokens), _greedy(trained, prompt, 20))
  assert res.acceptance_rate > 0.3  # A trained exit drafts what the full model says.


def _verified_rows(res):
  """The verification sizes each cycle should have run: the smallest compiled size that
  holds the batch's longest draft + 1."""
  ran = np.asarray(res.draft_iterations) > 0
  need = np.asarray(res.drafted)[ran].max(1) + 1
  sizes = np.array(res.verify_sizes)
  return np.asarray(res.verified)[ran], sizes[np.searchsorted(sizes, need)]


def test_adaptive_drafting_stays_exact_and_drafts_less(model):
  prompt = _prompt()
  full = _greedy(model, prompt, 20)
  plain = decoding.speculative_generate(model, prompt, 20, draft_layer=2, draft_len=4)
  assert (_verified_rows(plain)[0] == 5).all()  # Static drafting: always k + 1 rows.
  for thr in (0.3, 0.6):
    res = decoding.speculative_generate(model, prompt, 20, draft_layer=2, draft_len=4,
                                        draft_threshold=thr)
    np.testing.assert_array_equal(np.asarray(res.tokens), full)
    assert np.asarray(res.drafted).sum() < np.asarray(plain.drafted).sum()
    # Verification is sized to the draft: exact output from fewer rows, fewer FLOPs.
    verified, expected = _verified_rows(res)
    np.testing.assert_array_equal(verified, expected)
    assert len(set(verified.tolist())) > 1 and verified.min() < 5
  assert res.verify_sizes == (1, 2, 4, 5)
  never = decoding.speculative_generate(model, prompt, 20, draft_layer=2, draft_len=4,
                                        draft_threshold=np.inf)
  np.testing.assert_array_equal(np.asarray(never.tokens), full)
  assert np.asarray(never.drafted).sum() == 0 and never.tokens_per_cycle == 1.0
  assert (_verified_rows(never)[0] == 1).all()
  # One verification row per token: full depth's FLOPs plus the unused draft heads.
  ncost = decoding.speculative_cost(CONFIG, never)
  c = exits.FlopCounter.from_config(CONFIG)
  assert ncost.executed == pytest.approx(ncost.full_depth + 3 * 20 * c.head)
  # A threshold every draft clears drafts exactly as much as no threshold.
  always = decoding.speculative_generate(model, prompt, 20, draft_layer=2, draft_len=4,
                                         draft_threshold=0.0)
  np.testing.assert_array_equal(np.asarray(always.drafted), np.asarray(plain.drafted))


def test_adaptive_threshold_tie_keeps_the_draft(model):
  """A draft whose confidence equals the threshold is drafted (>=, as every exit rule)."""
  prompt = _prompt(b=1, p=5, seed=4)
  logits = np.asarray(all_layer_logits(model, prompt))[1, 0, -1]  # Layer 2, newest token.
  conf = float(exits.softmax_confidence(jnp.asarray(logits)))
  at = decoding.speculative_generate(model, prompt, 2, draft_layer=2, draft_len=1,
                                     draft_threshold=conf)
  above = decoding.speculative_generate(model, prompt, 2, draft_layer=2, draft_len=1,
                                        draft_threshold=np.nextafter(np.float32(conf),
                                                                     np.float32(2)))
  assert int(np.asarray(at.drafted)[0, 0]) == 1
  assert int(np.asarray(above.drafted)[0, 0]) == 0


def _exact_marginals(model, prompt, steps, temperature, top_k, layer):
  """Marginal distributions of new tokens 1..steps when sampling from `layer`'s exit,
  by enumerating every continuation (tiny vocabulary)."""
  v = model.config.vocab_size
  seqs = np.array(list(itertools.product(range(v), repeat=steps - 1)), np.int32)
  tokens = np.concatenate([np.repeat(prompt, len(seqs), 0), seqs], 1)
  logits = np.asarray(all_layer_logits(model, tokens))[layer - 1, :, prompt.shape[1] - 1:]
  logits = logits.astype(np.float64) / temperature
  if top_k:
    kth = np.sort(logits, -1)[..., -top_k][..., None]
    logits = np.where(logits < kth, -np.inf, logits)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)  # [V^(steps-1), steps, V]
  marginals = []
  for i in range(steps):
    # P(prefix seqs[:, :i]) * P(token i | prefix): joint over the enumerated prefixes.
    prefix_p = np.ones(len(seqs))
    for j in range(i):
      prefix_p *= probs[np.arange(len(seqs)), j, seqs[:, j]]
    # Each prefix of length i appears V^(steps-1-i) times among the rows.
    marginals.append((prefix_p[:, None] * probs[:, i]).sum(0) / v ** (steps - 1 - i))
  return np.stack(marginals)


@pytest.mark.parametrize("temperature, top_k", [(1.0, 0), (0.7, 3)])
def test_sampling_has_exactly_the_full_models_distribution(temperature, top_k):
  cfg = ModelConfig(vocab_size=5, num_layers=3, dim=16, num_heads=2, ffn_dim=32, max_len=8)
  small = random_model(cfg, seed=2, spread=1.5)
  prompt = _prompt(b=1, p=3, seed=5, vocab=5)
  rows, steps = 6000, 3
  res = decoding.speculative_generate(small, np.repeat(prompt, rows, 0), steps, draft_layer=1,
                                      draft_len=2, temperature=temperature, top_k=top_k,
                                      rng=jax.random.key(11))
  new = np.asarray(res.new_tokens)
  empirical = np.stack([np.bincount(new[:, i], minlength=5) / rows for i in range(steps)])
  exact = _exact_marginals(small, prompt, steps, temperature, top_k, layer=cfg.num_layers)
  draft = _exact_marginals(small, prompt, steps, temperature, top_k, layer=1)
  tol = 5 * np.sqrt(exact * (1 - exact) / rows) + 1e-3  # 5 standard errors per cell.
  assert (np.abs(empirical - exact) <= tol).all(), (empirical, exact)
  # The draft layer's own distribution is far from it: a sampler returning drafts fails.
  assert (np.abs(draft - exact) > 3 * tol).any()
  assert 0.05 < res.acceptance_rate < 0.95
  if top_k:
    assert ((exact == 0) <= (empirical == 0)).all()  # Filtered tokens never appear.


def test_cost_counts_draft_and_verification_flops(model):
  prompt = _prompt(b=2, p=6)
  e, k = 2, 3
  one = decoding.speculative_generate(model, prompt, 1, draft_layer=e, draft_len=k)
  cost = decoding.speculative_cost(CONFIG, one)
  c = exits.FlopCounter.from_config(CONFIG)
  t = 5  # One cycle, no draft (one token needed): the newest token through 1..E + head,
  # then layers E+1..N and the head on all k + 1 verification rows.
  per_row = e * c.block(t) + c.head + sum((N - e) * c.block(t + r) + c.head
                                          for r in range(k + 1))
  assert cost.executed == pytest.approx(2 * per_row)
  assert cost.full_depth == pytest.approx(2 * (N * c.block(t) + c.head))
  assert cost.verifications == 2
  # Full acceptance costs about full depth: each token crosses every layer once.
  long = decoding.speculative_generate(model, prompt, 20, draft_layer=e, draft_len=k)
  lcost = decoding.speculative_cost(CONFIG, long)
  assert lcost.flops_ratio > 1.0  # Rejected drafts and the draft heads are extra work.


def test_traced_arguments_do_not_recompile(model):
  prompt = _prompt()
  decoding.speculative_generate(model, prompt, 6, draft_layer=2, draft_len=2,
                                draft_threshold=0.5)
  jitted = decoding.compiled.decoder_of(decoding.speculative.speculative_decode, model)
  size = jitted._cache_size()
  decoding.speculative_generate(model, prompt, 6, draft_layer=2, draft_len=2,
                                draft_threshold=0.7)
  assert jitted._cache_size() == size


def test_bfloat16_model_is_exact_against_bfloat16_greedy():
  import dataclasses

  cfg = dataclasses.replace(CONFIG, dtype="bfloat16")
  bf16 = random_model(cfg, seed=1)
  prompt = _prompt(b=2)
  res = decoding.speculative_generate(bf16, prompt, 16, draft_layer=2, draft_len=3)
  np.testing.assert_array_equal(np.asarray(res.tokens), _greedy(bf16, prompt, 16))


@pytest.mark.parametrize("args, words", [
    (dict(draft_layer=4), "below the model's 4 layers"),
    (dict(draft_layer=0), "draft_layer=0"),
    (dict(draft_layer=2, draft_len=0), "draft_len=0"),
    (dict(draft_layer=2, max_new_tokens=40), "exceeds model.max_len"),
    (dict(draft_layer=2, temperature=-1.0), "temperature"),
    (dict(draft_layer=2, top_k=3), "top_k needs temperature"),
    (dict(draft_layer=2, draft_threshold=float("nan")), "NaN"),
    (dict(draft_layer=2, draft_measure="probe"), "draft_measure"),
    (dict(draft_layer=2, draft_len=3, verify_sizes=(1, 3)), "verify_sizes"),
])
def test_bad_arguments_are_one_line_errors(model, args, words):
  args = {"max_new_tokens": 4, **args}
  with pytest.raises(UserError, match=words):
    decoding.speculative_generate(model, _prompt(), args.pop("max_new_tokens"), **args)


def test_binary_speculative_prints_acceptance_and_speedup(trained_workdir):
  workdir = trained_workdir
  out = subprocess.run(
      [sys.executable, "-m", "deepexit_jax.main.generate", f"--checkpoint={workdir}",
       "--prompt=The ", "--max_new_tokens=12", "--speculative", "--draft_layer=1",
       "--draft_len=3"], capture_output=True, text=True, timeout=300,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.startswith("The ")
  for words in ("acceptance", "tokens/cycle", "tokens/s", "speedup over full depth",
                "identical to full depth: True"):
    assert words in out.stdout, out.stdout
  bad = subprocess.run(
      [sys.executable, "-m", "deepexit_jax.main.generate", f"--checkpoint={workdir}",
       "--prompt=The ", "--speculative", "--draft_layer=2"], capture_output=True, text=True,
      timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert bad.returncode == 2 and "Traceback" not in bad.stderr
  assert bad.stderr.strip().splitlines()[-1].startswith("error:")


def test_probe_as_the_draft_measure(model):
  import flax.struct

  @flax.struct.dataclass
  class Probe:
    w: jax.Array
    flops_per_token: int = flax.struct.field(pytree_node=False, default=5)

    def __call__(self, h_in, h_out, layer):
      return jax.nn.sigmoid(jnp.sum((h_out - h_in) * self.w, -1))

  prompt = _prompt()
  probe = Probe(w=jnp.asarray(np.random.default_rng(0).normal(0, 1, CONFIG.dim), jnp.float32))
  res = decoding.speculative_generate(model, prompt, 16, draft_layer=2, draft_len=4,
                                      draft_threshold=0.5, draft_measure="probe", probe=probe)
  np.testing.assert_array_equal(np.asarray(res.tokens), _greedy(model, prompt, 16))
  plain = decoding.speculative_generate(model, prompt, 16, draft_layer=2, draft_len=4)
  assert 0 < np.asarray(res.drafted).sum() < np.asarray(plain.drafted).sum()
  with pytest.raises(UserError, match="draft_measure='probe'"):
    decoding.speculative_generate(model, prompt, 4, draft_layer=2, probe=probe)


# Greedy: no EOS, the longest row fills the cache to max_len. Sampled (keys below): EOS 6
# ends rows 1 and 2 early while row 0 runs to max_len (checked, so not vacuous).
@pytest.mark.parametrize("temperature, eos", [(0.0, None), (1.0, 6)])
def test_prompts_of_different_lengths_equal_one_row_runs(model, temperature, eos):
  prompt = _prompt(b=3, p=7, seed=9)
  lengths = np.array([7, 3, 5])
  m = CONFIG.max_len - 7 + 1
  keys = jax.random.split(jax.random.key(2), 3)  # One key per row.
  kwargs = dict(draft_layer=2, draft_len=3, temperature=temperature, eos_id=eos,
                return_logits=True)
  res = decoding.speculative_generate(model, prompt, m, prompt_lengths=lengths, rng=keys,
                                      **kwargs)
  cost = decoding.speculative_cost(CONFIG, res)
  counter = exits.FlopCounter.from_config(CONFIG)
  full_depth = 0.0
  for row, length in enumerate(lengths):
    alone = decoding.speculative_generate(model, [prompt[row, :length]], m,
                                          rng=keys[row:row + 1], **kwargs)
    np.testing.assert_array_equal(np.asarray(res.new_tokens)[row],
                                  np.asarray(alone.new_tokens)[0])
    np.testing.assert_array_equal(np.asarray(res.tokens)[row, :length], prompt[row, :length])
    committed = int(np.asarray(alone.committed).sum())
    np.testing.assert_allclose(np.asarray(res.logits)[row, :committed],
                               np.asarray(alone.logits)[0, :committed], atol=2e-4, rtol=1e-4)
    np.testing.assert_array_equal(res.cycles[row], alone.cycles[0])
    full_depth += counter.full_depth(length - 1 + np.arange(m)).sum()
  assert cost.full_depth == pytest.approx(full_depth)
  committed_B = np.asarray(res.committed).sum(0)
  assert committed_B[0] == m  # Row 0 reaches max_len.
  if eos is not None:
    assert (committed_B[1:] < m).all()
  else:
    assert 0 < res.acceptance_rate < 1
  with pytest.raises(UserError, match="prompt_lengths"):
    decoding.speculative_generate(model, prompt, m, draft_layer=2, prompt_lengths=[7, 0, 5])
