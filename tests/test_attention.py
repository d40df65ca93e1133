"""Attention: the fused path (jax.nn.dot_product_attention) equals ours, and which one runs."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepexit_jax import attention
from deepexit_jax.model import ModelConfig, all_layer_logits, create_model


def _qkvw(t, dtype=jnp.float32):
  keys = jax.random.split(jax.random.PRNGKey(t), 4)
  q, k, v = (3.0 * jax.random.normal(key, (2, t, 2, 8), dtype) for key in keys[:3])
  return q, k, v, jax.random.normal(keys[3], (2, t, 2, 8), dtype)


@pytest.mark.parametrize("t, chunks", [(16, 1), (17, 3)])
def test_xla_dot_product_attention_equals_ours_outputs_and_gradients(t, chunks, monkeypatch):
  q, k, v, w = _qkvw(t)

  def value_and_grads(implementation):
    monkeypatch.setenv(attention.ENV_VAR, implementation)
    loss = lambda q, k, v: jnp.sum(w * jnp.tanh(
        attention.causal_attention(q, k, v, chunks=chunks)))
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)

  ours, fused = value_and_grads("chunked"), value_and_grads("xla")
  chex.assert_trees_all_close(fused, ours, atol=2e-5, rtol=2e-5)
  assert not np.allclose(ours[1][0], 0)  # The gradients compared are not trivially zero.


def test_the_forced_implementation_is_the_one_traced(monkeypatch):
  q, k, v, _ = _qkvw(8)
  # A new function each time: traces are cached by function, not by the environment.
  trace = lambda: str(jax.make_jaxpr(lambda q, k, v: attention.causal_attention(q, k, v))(
      q, k, v))
  monkeypatch.setenv(attention.ENV_VAR, "chunked")
  ours = trace()
  monkeypatch.setenv(attention.ENV_VAR, "xla")
  fused = trace()
  assert "custom_vjp" in ours and "custom_vjp" not in fused
  # An explicit mask (KV caches) always takes ours.
  mask = jnp.tril(jnp.ones((8, 8), bool))[None]
  masked = str(jax.make_jaxpr(functools.partial(attention.causal_attention, mask_BTS=mask))(
      q, k, v))
  assert "custom_vjp" in masked
  monkeypatch.setenv(attention.ENV_VAR, "flash")
  with pytest.raises(ValueError, match="DEEPEXIT_ATTENTION='flash': choose from chunked"):
    attention.causal_attention(q, k, v)


@pytest.mark.parametrize("backend, dtype, head_dim, expected", [
    ("cpu", jnp.float32, 8, "chunked"),
    ("cpu", jnp.bfloat16, 64, "chunked"),
    ("gpu", jnp.bfloat16, 64, "cudnn"),
    ("gpu", jnp.float16, 128, "cudnn"),
    ("gpu", jnp.float32, 64, "xla"),      # cuDNN's fused kernel takes 16-bit floats only.
    ("gpu", jnp.bfloat16, 12, "xla"),     # Head width not a multiple of 8.
    ("gpu", jnp.bfloat16, 256, "xla"),    # Head width above 128.
    ("tpu", jnp.float32, 64, "xla"),
])
def test_implementation_is_chosen_by_backend_dtype_and_head_width(backend, dtype, head_dim,
                                                                   expected, monkeypatch):
  monkeypatch.delenv(attention.ENV_VAR, raising=False)
  assert attention.attention_implementation(dtype, head_dim, backend) == expected


def test_on_this_cpu_the_default_is_ours(monkeypatch):
  monkeypatch.delenv(attention.ENV_VAR, raising=False)
  if jax.default_backend() == "cpu":
    assert attention.attention_implementation(jnp.float32, 8) == "chunked"


def test_model_outputs_agree_on_both_paths(monkeypatch):
  config = ModelConfig(vocab_size=19, num_layers=2, dim=16, num_heads=2, ffn_dim=24,
                       max_len=16)
  model = create_model(config, seed=0)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, 19)
  logits = {}
  for implementation in ("chunked", "xla"):
    monkeypatch.setenv(attention.ENV_VAR, implementation)
    # Unjitted Python-loop path: each call traces attention again under the forced setting.
    logits[implementation] = model(tokens, use_scan=False).per_layer
  chex.assert_trees_all_close(logits["xla"], logits["chunked"], atol=1e-5)
  chex.assert_trees_all_close(logits["chunked"], all_layer_logits(model, tokens), atol=1e-5)
