"""Tests for the deep-supervision Transformer: shapes, causality, scan == loop, params."""

import dataclasses
import functools
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_model
from flax import nnx

from deepexit_jax.errors import UserError
from deepexit_jax.model import (
  DeepSupervisionTransformer,
  ModelConfig,
  ModelOutput,
  all_layer_logits,
  causal_attention,
  count_params,
  create_model,
)

CONFIG = ModelConfig(vocab_size=19, num_layers=3, dim=16, num_heads=2, ffn_dim=24, max_len=16)
B, T = 4, 16


def _tokens(seed: int = 0, shape=(B, T), vocab: int = CONFIG.vocab_size) -> jax.Array:
  return jax.random.randint(jax.random.key(seed), shape, 0, vocab, jnp.int32)


def _expected_params(cfg: ModelConfig) -> int:
  """Parameter count by hand: embeddings, N pre-LN blocks, final LN, optional unembedding."""
  d, f, v = cfg.dim, cfg.ffn_width, cfg.vocab_size
  block = (2 * d            # ln1 scale + bias
           + d * 3 * d + 3 * d  # qkv
           + d * d + d      # attention output
           + 2 * d          # ln2
           + d * f + f      # fc1
           + f * d + d)     # fc2
  unembed = 0 if cfg.tie_embeddings else d * v + v
  return v * d + cfg.max_len * d + cfg.num_layers * block + 2 * d + unembed


def _params(model: nnx.Module):
  return nnx.state(model, nnx.Param)


@functools.cache
def _model(tie: bool = False, dropout: float = 0.0, seed: int = 0,
           remat: str = "none") -> DeepSupervisionTransformer:
  """Shared tiny models (tests must not modify them): creating one compiles its initialisers."""
  cfg = dataclasses.replace(CONFIG, tie_embeddings=tie, dropout=dropout, remat=remat)
  return create_model(cfg, seed=seed)


@functools.partial(nnx.jit, static_argnames=("use_scan",))
def _forward(model, tokens, rng=None, use_scan=True) -> ModelOutput:
  # Jitted so each variant compiles once instead of running op by op.
  return model(tokens, dropout_rng=rng, use_scan=use_scan)


@pytest.mark.parametrize("tie", [False, True])
def test_output_shapes(tie):
  model = _model(tie=tie)
  tokens = _tokens(shape=(B, 11))  # Shorter than max_len.
  n, d, v = CONFIG.num_layers, CONFIG.dim, CONFIG.vocab_size

  out = _forward(model, tokens)
  assert isinstance(out, ModelOutput)
  chex.assert_shape(out.embed_BTD, (B, 11, d))
  chex.assert_shape(out.hidden_NBTD, (n, B, 11, d))
  chex.assert_shape(out.per_layer, (n, B, 11, v))
  chex.assert_tree_all_finite(out)

  logits = all_layer_logits(model, tokens)
  chex.assert_shape(logits, (n, B, 11, v))
  chex.assert_trees_all_close(logits, out.per_layer, atol=1e-5)
  # Every layer's logits are the one shared head applied to that layer's hidden state.
  chex.assert_trees_all_close(logits[0], model.head(out.hidden_NBTD[0]), atol=1e-5)
  chex.assert_trees_all_close(logits[-1], model.head(out.hidden_NBTD[-1]), atol=1e-5)


@pytest.mark.parametrize("use_scan", [True, False])
def test_causal_gradient(use_scan):
  """d logits[n, t] / d embedding[s] is exactly zero for s > t, and nonzero for s <= t."""
  model = _model()
  n_layers, d = CONFIG.num_layers, CONFIG.dim
  h0_1TD = model.embed_tokens(_tokens(shape=(1, T)))
  w_V = jax.random.normal(jax.random.key(1), (CONFIG.vocab_size,))

  def all_logits(h_BTD):
    def body(i, h_in, h_out, carry):
      del i, h_in
      return h_out, carry, model.head(h_out)

    return model.scan_layers(h_BTD, body, use_scan=use_scan)[2]

  # One copy of the sequence per (layer n, position t), each contributing the single
  # output <logits[n, t], w>: one gradient gives every d output / d embedding at once.
  # (jax.jit(jax.jacrev(...)) would do the same but is miscompiled by XLA:CPU in jaxlib
  # 0.10.2 for LayerNorm on >= 16 x 16 inputs; see the report.)
  copies = n_layers * T
  layer_C, pos_C = np.repeat(np.arange(n_layers), T), np.tile(np.arange(T), n_layers)

  def picked_outputs(h_CTD):
    return jnp.sum(all_logits(h_CTD)[layer_C, np.arange(copies), pos_C] @ w_V)

  grad_CTD = jax.jit(jax.grad(picked_outputs))(jnp.broadcast_to(h0_1TD, (copies, T, d)))
  dep_NTS = np.abs(np.asarray(grad_CTD)).sum(-1).reshape(n_layers, T, T)
  future = np.triu(np.ones((T, T), bool), k=1)
  for n in range(n_layers):
    assert np.all(dep_NTS[n][future] == 0.0), f"layer {n + 1} sees future positions"
    assert np.all(dep_NTS[n][~future] > 0.0), f"layer {n + 1} ignores some past positions"


def test_changing_later_tokens_leaves_earlier_logits_unchanged():
  model = _model()
  tokens = _tokens()
  changed = tokens.at[:, 9:].set((tokens[:, 9:] + 1) % CONFIG.vocab_size)
  a, b = all_layer_logits(model, tokens), all_layer_logits(model, changed)
  chex.assert_trees_all_close(a[:, :, :9], b[:, :, :9], atol=1e-6)
  assert np.abs(np.asarray(a[:, :, 9:] - b[:, :, 9:])).max() > 1e-4


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_scan_matches_python_loop(tie, dropout):
  model = _model(tie=tie, dropout=dropout)
  tokens = _tokens(1)
  rng = jax.random.key(7) if dropout else None

  scan = _forward(model, tokens, rng, use_scan=True)
  loop = _forward(model, tokens, rng, use_scan=False)
  # Same math; XLA fuses the scan body differently, so equal up to float rounding.
  chex.assert_trees_all_close(scan.hidden_NBTD, loop.hidden_NBTD, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(scan.per_layer, loop.per_layer, atol=1e-5, rtol=1e-5)


def test_all_layer_logits_loop_path_matches_scan():
  model, tokens = _model(), _tokens(2)
  chex.assert_trees_all_close(all_layer_logits(model, tokens, use_scan=True),
                              all_layer_logits(model, tokens, use_scan=False),
                              atol=1e-5, rtol=1e-5)


def _mean_logsumexp(model, tokens):
  return jnp.mean(jax.nn.logsumexp(model(tokens).per_layer, axis=-1))


_value_and_grad = nnx.jit(nnx.value_and_grad(_mean_logsumexp))


@pytest.mark.parametrize("remat", ["full", "attention", "dots", "dots_no_batch"])
def test_remat_does_not_change_outputs_or_gradients(remat):
  tokens = _tokens(3)
  v0, g0 = _value_and_grad(_model(), tokens)
  v1, g1 = _value_and_grad(_model(remat=remat), tokens)
  chex.assert_trees_all_close(v0, v1, atol=1e-6)
  chex.assert_trees_all_close(_params(g0), _params(g1), atol=1e-6, rtol=1e-5)


def test_tied_embeddings_share_the_embedding():
  tied, untied = _model(tie=True), _model(tie=False)
  assert tied.unembed is None
  assert "unembed" not in _params(tied)
  assert "unembed" in _params(untied)
  v, d = CONFIG.vocab_size, CONFIG.dim
  assert count_params(untied) - count_params(tied) == d * v + v

  # The head is the transposed input embedding, so editing the embedding moves the logits.
  h_BTD = jax.random.normal(jax.random.key(0), (B, T, d))
  expected = tied.final_norm(h_BTD) @ tied.embed.embedding[...].T
  chex.assert_trees_all_close(tied.head(h_BTD), expected, atol=1e-5)


@pytest.mark.parametrize("tie", [False, True])
def test_unused_token_embedding_gets_gradient_only_when_tied(tie):
  """A token absent from the input reaches the loss only through a tied unembedding."""
  model = _model(tie=tie)
  unused = CONFIG.vocab_size - 1
  tokens = _tokens(vocab=unused)  # Ids 0..V-2 only.

  def loss(m):
    logp = jax.nn.log_softmax(m(tokens).per_layer)
    return -jnp.mean(jnp.take_along_axis(logp, tokens[None, ..., None], axis=-1))

  row = nnx.jit(nnx.grad(loss))(model).embed.embedding[...][unused]
  assert bool(jnp.any(row != 0)) == tie


@pytest.mark.parametrize("cfg", [
    CONFIG,
    dataclasses.replace(CONFIG, tie_embeddings=True),
    ModelConfig(vocab_size=7, num_layers=1, dim=8, num_heads=4, max_len=5),  # FFN 4 * dim.
    ModelConfig(vocab_size=11, num_layers=4, dim=12, num_heads=3, ffn_dim=5, max_len=9),
])
def test_count_params_matches_hand_count(cfg):
  # Shape-only models: counting needs no initialisation.
  assert count_params(nnx.eval_shape(lambda: create_model(cfg))) == _expected_params(cfg)


def test_count_params_of_a_real_model():
  model = _model()
  assert count_params(model) == _expected_params(CONFIG)
  assert count_params(model) == sum(x.size for x in jax.tree.leaves(_params(model)))


@pytest.mark.parametrize("changes, field", [
    (dict(num_heads=3), "num_heads"),
    (dict(num_layers=0), "num_layers"),
    (dict(num_layers=2.0), "num_layers"),
    (dict(dim=0), "dim"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(max_len=-1), "max_len"),
    (dict(ffn_dim=0), "ffn_dim"),
    (dict(dropout=1.0), "dropout"),
    (dict(dropout=-0.1), "dropout"),
    (dict(remat="sometimes"), "remat"),
])
def test_model_config_rejects_bad_fields(changes, field):
  with pytest.raises(UserError, match=rf"model\.{field}"):
    dataclasses.replace(CONFIG, **changes)


def test_dropout_is_active_only_with_a_key_and_deterministic_per_key():
  model = _model(dropout=0.2)
  tokens = _tokens()
  evaluation = _forward(model, tokens).per_layer
  key1 = _forward(model, tokens, jax.random.key(1)).per_layer
  key1_again = _forward(model, tokens, jax.random.key(1)).per_layer
  key2 = _forward(model, tokens, jax.random.key(2)).per_layer

  chex.assert_trees_all_equal(key1, key1_again)
  assert not np.allclose(key1, evaluation, atol=1e-3)
  assert not np.allclose(key1, key2, atol=1e-3)
  # Dropout rate 0: a key changes nothing.
  chex.assert_trees_all_close(_forward(_model(), tokens, jax.random.key(1)).per_layer,
                              _forward(_model(), tokens).per_layer, atol=1e-6)


def test_eval_shape_of_a_large_model_allocates_nothing():
  cfg = ModelConfig(vocab_size=32_000, num_layers=32, dim=512, num_heads=8, max_len=1024)
  abstract = nnx.eval_shape(lambda: create_model(cfg))
  graphdef, state = nnx.split(abstract)
  leaves = jax.tree.leaves(state)
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
  assert count_params(abstract) == _expected_params(cfg)

  tokens = jax.ShapeDtypeStruct((2, 1024), jnp.int32)
  out = jax.eval_shape(lambda s, t: nnx.merge(graphdef, s)(t), state, tokens)
  chex.assert_shape(out.per_layer, (32, 2, 1024, 32_000))
  chex.assert_shape(out.hidden_NBTD, (32, 2, 1024, 512))
  assert out.per_layer.dtype == jnp.float32


def test_no_retrace_for_new_tokens_of_the_same_shape():
  graphdef, state = nnx.split(_model())
  chex.clear_trace_counter()

  @jax.jit
  @chex.assert_max_traces(n=1)
  def forward(state, tokens):
    return nnx.merge(graphdef, state)(tokens).per_layer

  first = forward(state, _tokens(0))
  second = forward(state, _tokens(1))
  assert not np.allclose(first, second)
  with pytest.raises(AssertionError):  # A new shape must retrace: the counter is armed.
    forward(state, _tokens(2, shape=(B, T - 1)))


def test_all_layer_logits_compiles_once_per_shape(monkeypatch):
  """The library's jitted entry point reuses its compilation for new batches and models."""
  chex.clear_trace_counter()
  monkeypatch.setattr(DeepSupervisionTransformer, "__call__", chex.assert_max_traces(
      DeepSupervisionTransformer.__call__, n=1))
  shape = (2, 5)  # A shape no other test uses, so the first call below must trace.
  for seed in range(3):
    all_layer_logits(_model(), _tokens(seed, shape=shape))
  # Same config, other parameters (e.g. a reloaded checkpoint): still no new trace.
  all_layer_logits(_model(seed=5), _tokens(4, shape=shape))


def test_data_parallel_forward_matches_single_device():
  assert jax.device_count() == 4, "conftest must force 4 host devices"
  graphdef, state = nnx.split(_model())
  tokens = _tokens(shape=(8, T))
  # Auto axes: the model has no explicit-sharding annotations (see the report on Explicit).
  mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  sharded = jax.device_put(tokens, jax.NamedSharding(mesh, jax.P("data")))
  forward = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t).per_layer)

  out = forward(state, sharded)
  assert len(out.sharding.device_set) == 4
  chex.assert_trees_all_close(out, forward(state, tokens), atol=1e-5)


@pytest.mark.parametrize("t, chunks", [(16, 2), (17, 3), (32, 4), (3, 4)])
def test_chunked_causal_attention_equals_one_block(t, chunks):
  keys = jax.random.split(jax.random.PRNGKey(t), 3)
  q, k, v = (jax.random.normal(key, (2, t, 2, 8)) for key in keys)
  chex.assert_trees_all_close(causal_attention(q, k, v, chunks=chunks),
                              causal_attention(q, k, v), atol=1e-5)


def _plain_attention(q, k, v, mask):
  """Textbook softmax attention, differentiated by autodiff: the custom VJP's reference."""
  scores = jnp.einsum("bthk,bshk->bhts", q, k) / jnp.sqrt(q.shape[-1])
  scores = jnp.where(mask[:, None], scores, -jnp.inf)
  return jnp.einsum("bhts,bshk->bthk", jax.nn.softmax(scores, axis=-1), v)


@pytest.mark.parametrize("t, chunks", [(16, 1), (17, 3)])
def test_attention_gradient_equals_autodiff_of_plain_softmax(t, chunks):
  """The flash-style backward pass (probabilities rebuilt from the saved log-normaliser,
  rowsum(dO * O)) gives autodiff's gradients, through the query chunks too."""
  keys = jax.random.split(jax.random.PRNGKey(t), 4)
  q, k, v = (3.0 * jax.random.normal(key, (2, t, 2, 8)) for key in keys[:3])
  w = jax.random.normal(keys[3], (2, t, 2, 8))  # A loss that weighs every output.
  mask = jnp.tril(jnp.ones((t, t), bool))[None]

  def loss(attend):
    return lambda q, k, v: jnp.sum(w * jnp.tanh(attend(q, k, v)))

  ours = jax.jit(jax.value_and_grad(loss(functools.partial(causal_attention, chunks=chunks)),
                                    argnums=(0, 1, 2)))(q, k, v)
  plain = jax.jit(jax.value_and_grad(loss(lambda q, k, v: _plain_attention(q, k, v, mask)),
                                     argnums=(0, 1, 2)))(q, k, v)
  chex.assert_trees_all_close(ours, plain, atol=2e-5, rtol=2e-5)
  # And the residuals it keeps are the output and the [B, H, T] log-normaliser, not the
  # [B, H, T, T] probabilities.
  residual_shapes = [x.shape for x in jax.tree.leaves(jax.vjp(
      functools.partial(causal_attention, chunks=1), q, k, v)[1])]
  assert (2, 2, t, t) not in residual_shapes and (2, 2, t) in residual_shapes


def test_xla_options_are_used_only_where_the_backend_accepts_them(monkeypatch):
  from deepexit_jax import xla_options

  bogus = {"xla_no_such_option_for_deepexit_tests": True}
  try:  # What this XLA does with the real option, and with one it cannot know.
    jax.jit(lambda x: x + 1, compiler_options=xla_options.CPU_OPTIONS)(jnp.zeros(()))
    accepted = True
  except Exception:  # noqa: BLE001
    accepted = False
  with pytest.raises(jax.errors.JaxRuntimeError):
    jax.jit(lambda x: x + 1, compiler_options=bogus)(jnp.zeros(()))
  on_cpu = jax.default_backend() == "cpu" and os.environ.get("DEEPEXIT_DEFAULT_XLA") != "1"
  try:
    xla_options.compiler_options.cache_clear()
    assert xla_options.compiler_options() == (xla_options.CPU_OPTIONS if on_cpu and accepted
                                              else {})
    monkeypatch.setenv("DEEPEXIT_DEFAULT_XLA", "1")  # the off switch
    xla_options.compiler_options.cache_clear()
    assert xla_options.compiler_options() == {}
    monkeypatch.delenv("DEEPEXIT_DEFAULT_XLA")
    monkeypatch.setattr(xla_options, "CPU_OPTIONS", bogus)  # refused: fall back, not fail
    xla_options.compiler_options.cache_clear()
    assert xla_options.compiler_options() == {}
    # `jit` really hands the options to XLA: an unknown one makes the compile fail.
    monkeypatch.setattr(xla_options, "compiler_options", lambda: bogus)
    with pytest.raises(jax.errors.JaxRuntimeError):
      xla_options.jit(lambda x: x * 3)(jnp.arange(3))
  finally:
    monkeypatch.undo()
    xla_options.compiler_options.cache_clear()
  np.testing.assert_array_equal(xla_options.jit(lambda x: x * 2)(jnp.arange(3)), [0, 2, 4])


@pytest.mark.parametrize("randomised, atol", [
    # Measured max |bf16 - float32|: 1.8e-3 at initialisation (|logits| < 0.5) and
    # 0.067 with every parameter random (|logits| up to 12); tolerances ~3x above.
    (False, 6e-3), (True, 0.2)])
def test_bfloat16_compute_keeps_float32_params_and_logits(randomised, atol):
  """Mixed precision: bf16 matmuls, float32 parameters/logits, outputs close to float32."""
  cfg = ModelConfig(vocab_size=50, num_layers=3, dim=32, num_heads=4, max_len=16)
  make = random_model if randomised else create_model
  f32 = make(cfg, seed=0)
  bf16 = make(dataclasses.replace(cfg, dtype="bfloat16"), seed=0)
  params = nnx.state(bf16, nnx.Param)
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  chex.assert_trees_all_equal(params, nnx.state(f32, nnx.Param))  # Same initialisation.
  tokens = np.random.default_rng(0).integers(0, 50, (2, 16)).astype(np.int32)
  out16, out32 = all_layer_logits(bf16, tokens), all_layer_logits(f32, tokens)
  assert out16.dtype == jnp.float32
  np.testing.assert_allclose(out16, out32, atol=atol, rtol=0)
  assert not np.allclose(out16, out32, atol=atol / 20)  # The bf16 matmuls really ran.
  jaxpr = str(jax.make_jaxpr(lambda m, x: m(x).per_layer)(bf16, tokens))
  assert "bf16" in jaxpr


@pytest.mark.parametrize("tie", [False, True])
def test_bfloat16_training_steps_update_parameters_as_float32_does(tiny_config, tie):
  """Three bf16 training steps from a model with every parameter random: float32 loss
  and parameters, and parameter updates close to the float32 run's."""
  from deepexit_jax.train import Trainer

  rng = np.random.default_rng(0)
  batches = [rng.integers(0, 40, (8, 32)).astype(np.int32) for _ in range(3)]

  def run(dtype):
    cfg = tiny_config(num_devices=1, warmup_steps=1).with_vocab_size(40)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, dtype=dtype, dropout=0.0, tie_embeddings=tie))
    trainer = Trainer(cfg, total_steps=10)
    start = nnx.state(random_model(cfg.model, seed=1, spread=0.7, head_scale=1.0))
    state = trainer.initial_state.replace(params=jax.tree.map(
        lambda old, new: jax.device_put(new, old.sharding), trainer.initial_state.params, start))
    losses = []
    for x in batches:
      state, metrics = trainer.train_step(state, *trainer.shard(x, np.roll(x, -1, 1)))
      losses.append(float(metrics["loss"]))
    assert metrics["loss"].dtype == jnp.float32
    return start, state.params, np.asarray(losses)

  start, p16, loss16 = run("bfloat16")
  _, p32, loss32 = run("float32")
  assert {x.dtype for x in jax.tree.leaves(p16)} == {jnp.dtype(jnp.float32)}
  d16 = np.concatenate([np.ravel(a - s) for a, s in zip(jax.tree.leaves(p16),
                                                         jax.tree.leaves(start))])
  d32 = np.concatenate([np.ravel(a - s) for a, s in zip(jax.tree.leaves(p32),
                                                         jax.tree.leaves(start))])
  rel = np.linalg.norm(d16 - d32) / np.linalg.norm(d32)
  # Measured: 0.047-0.055 relative error of the updates (Adam's normalised steps flip
  # for entries with tiny gradients), 1.6e-4 of the losses; tolerances ~3x above.
  assert 1e-3 < rel < 0.15  # and bf16 really ran
  np.testing.assert_allclose(loss16, loss32, rtol=5e-4)
  assert np.linalg.norm(d32) > 0.1 and loss32[-1] < loss32[0]  # it trained


def test_bad_dtype():
  with pytest.raises(UserError, match="model.dtype='float16'"):
    ModelConfig(vocab_size=5, num_layers=1, dim=8, num_heads=2, dtype="float16")
