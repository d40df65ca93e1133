"""The model and the KV-cache decoder against an independent float64 NumPy reference."""

import dataclasses
import functools

import numpy as np
import numpy_reference as ref
import pytest
from conftest import RANDOM_CONFIG_FIELDS, random_model

from deepexit_jax import decoding
from deepexit_jax.model import ModelConfig, all_layer_logits

CONFIG = ModelConfig(**RANDOM_CONFIG_FIELDS)
N = CONFIG.num_layers
# Measured max |float32 - float64| over these models' logits (|logits| up to ~17): 3.4e-6
# (forward, either path, tied or not) and 2.5e-6 (decoder); the tolerance sits 4x above.
ATOL = 1.5e-5


@functools.cache
def _model(tied=False, chunks=2):
  cfg = dataclasses.replace(CONFIG, tie_embeddings=tied, attention_chunks=chunks)
  return random_model(cfg, seed=3)


@functools.cache
def _tokens(b=2, t=CONFIG.max_len):
  return np.random.default_rng(5).integers(0, CONFIG.vocab_size, (b, t)).astype(np.int32)


@pytest.mark.parametrize("tied, chunks, use_scan", [
    (False, 2, True), (False, 1, False), (True, 2, True)])
def test_all_layer_logits_equal_numpy_reference(tied, chunks, use_scan):
  model, tokens = _model(tied, chunks), _tokens()
  expected = ref.all_layer_logits(model, tokens)
  got = np.asarray(all_layer_logits(model, tokens, use_scan=use_scan), np.float64)
  assert got.shape == expected.shape == (N, 2, CONFIG.max_len, CONFIG.vocab_size)
  np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0)
  # The reference is not trivially close: layers differ and logits are large.
  assert np.abs(expected).max() > 5
  assert (expected.argmax(-1)[0] != expected.argmax(-1)[-1]).mean() > 0.3


def test_numpy_reference_decoder_equals_numpy_forward():
  """The reference's KV-cache loop and its whole-sequence pass agree (float64)."""
  model, tokens = _model(), _tokens()
  np.testing.assert_allclose(ref.decode_full_depth(model, tokens),
                             ref.all_layer_logits(model, tokens)[-1], atol=1e-10)


@pytest.mark.parametrize("kv_policy, exit_layers", [
    ("copy", (N,)), ("copy", (1, 3)), ("recompute", (2,))])
def test_teacher_forced_full_depth_decoder_equals_numpy_reference(kv_policy, exit_layers):
  """Never exiting (threshold inf), every decode step's logits are the full-depth ones."""
  model, tokens = _model(), _tokens()
  res = decoding.decode_teacher_forced(model, tokens, np.inf, exit_layers=exit_layers,
                                       kv_policy=kv_policy)
  np.testing.assert_array_equal(np.asarray(res.exit_layer), N)
  np.testing.assert_allclose(np.asarray(res.logits, np.float64),
                             ref.decode_full_depth(model, tokens), atol=ATOL, rtol=0)


def test_generate_full_depth_logits_equal_numpy_reference():
  """`generate` (prefill of the prompt, then one cached step per token) scores the text it
  writes exactly as the reference scores that text."""
  model, prompt = _model(tied=True), _tokens(2, 5)
  res = decoding.generate(model, prompt, CONFIG.max_len - 4, np.inf, exit_layers=(N,),
                          return_logits=True)
  text = np.asarray(res.tokens)[:, :-1]  # the last chosen token is never scored
  expected = ref.decode_full_depth(model, text)[:, prompt.shape[1] - 1:]
  np.testing.assert_allclose(np.asarray(res.logits, np.float64), expected, atol=ATOL, rtol=0)
  np.testing.assert_array_equal(np.asarray(res.new_tokens), expected.argmax(-1))
