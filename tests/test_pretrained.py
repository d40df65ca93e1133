"""Hugging Face checkpoints in the one-scan model: exact against transformers' own numbers.

The fixtures (tests/fixtures/hf/, made by scripts/make_hf_fixtures.py with transformers)
are tiny random-weight checkpoints with their reference per-layer logits, computed by
the reference implementation: a Llama with grouped-query attention, RoPE theta 500000 and
Llama-3 scaling (untied), a tied multi-query Llama with biases, and GPT-2.
"""

import json
import os
import shutil

import chex
import jax
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from deepexit_jax import checkpoint, decoding, exits
from deepexit_jax.errors import UserError
from deepexit_jax.model import ModelConfig, all_layer_logits
from deepexit_jax.pretrained import load_hf_checkpoint, load_hf_tokenizer, save_hf_checkpoint

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "hf")
NAMES = ("llama", "llama_tied", "gpt2")


def fixture(name: str) -> str:
  return os.path.join(FIXTURES, name)


def reference(name: str) -> tuple[np.ndarray, np.ndarray]:
  ref = np.load(os.path.join(fixture(name), "reference.npz"))
  return ref["tokens"], ref["logits_NBTV"]


def tensors(directory: str) -> dict[str, np.ndarray]:
  with safe_open(os.path.join(directory, "model.safetensors"), framework="np") as f:
    return {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture(scope="module")
def models():
  return {name: load_hf_checkpoint(fixture(name)) for name in NAMES}


@pytest.mark.parametrize("name", NAMES)
def test_every_layer_equals_transformers(models, name):
  """all_layer_logits[l-1] = lm_head(final_norm(block l's output)) for l < N and the
  model's own logits for l = N, as transformers computed them (float32, 1e-4)."""
  tokens, want_NBTV = reference(name)
  got_NBTV = np.asarray(all_layer_logits(models[name], tokens))
  assert got_NBTV.shape == want_NBTV.shape
  for layer in range(want_NBTV.shape[0]):
    np.testing.assert_allclose(got_NBTV[layer], want_NBTV[layer], atol=1e-4, rtol=0,
                               err_msg=f"{name} layer {layer + 1}")
  # The layers differ from each other, so a model that ignored a layer would fail.
  assert np.abs(want_NBTV[0] - want_NBTV[-1]).max() > 1.0


def test_imported_config_and_loop_path(models):
  cfg = models["llama"].config
  assert (cfg.norm, cfg.positions, cfg.mlp, cfg.num_heads, cfg.kv_heads) == (
      "rmsnorm", "rope", "swiglu", 4, 2)
  assert (cfg.rope_theta, cfg.rope_scaling, cfg.rope_original_max_len) == (500000.0, 8.0, 16)
  assert not cfg.tie_embeddings and models["llama_tied"].config.tie_embeddings
  assert models["gpt2"].config.norm_eps == 1e-5
  tokens, _ = reference("llama")
  chex.assert_trees_all_close(all_layer_logits(models["llama"], tokens, use_scan=False),
                              all_layer_logits(models["llama"], tokens), atol=1e-5)


@pytest.mark.parametrize("name", ("llama",))  # Learned positions: tests/test_decoding.py.
def test_kv_cache_decoders_equal_full_depth_greedy(models, name):
  """generate (full depth) and speculative_generate: the tokens of full-depth greedy
  argmax, and the decoder's logits equal one full forward pass over its own output (KV
  cache with rotary positions and G < H key/value heads)."""
  model = models[name]
  tokens, _ = reference(name)
  prompt = tokens[:, :5]
  full = decoding.generate(model, prompt, 10, exit_layers=(model.config.num_layers,),
                           return_logits=True)
  forward_BTV = np.asarray(all_layer_logits(model, full.tokens))[-1]
  np.testing.assert_allclose(full.logits, forward_BTV[:, 4:14], atol=1e-4)
  np.testing.assert_array_equal(full.new_tokens, forward_BTV[:, 4:14].argmax(-1))
  spec = decoding.speculative_generate(model, prompt, 10, draft_layer=1, draft_len=3)
  np.testing.assert_array_equal(spec.tokens, full.tokens)


@pytest.mark.parametrize("kv_policy", ("copy", "recompute"))
def test_early_exit_decoder_equals_emulation_on_llama(models, kv_policy):
  """The lossy decoder on the GQA + RoPE model: exit layers and logits of the emulation
  (copy: the copied state's keys/values at its rotary position, via Block.copied_kv)."""
  model = models["llama"]
  tokens, ref_NBTV = reference("llama")
  tokens = tokens[:1]
  threshold = float(np.median(np.asarray(
      exits.logit_confidence("softmax", ref_NBTV[0, :1]))))
  emu = exits.predict_with_exit(model, tokens, threshold, exit_layers=(1, 2),
                                kv_policy=decoding.EMULATED_POLICY[kv_policy])
  dec = decoding.decode_teacher_forced(model, tokens, threshold, exit_layers=(1, 2),
                                       kv_policy=kv_policy, return_logits=True)
  np.testing.assert_array_equal(dec.exit_layer, emu.exit_layer)
  assert 0 < np.mean(np.asarray(emu.exit_layer) < 3) < 1  # Some exit, some do not.
  np.testing.assert_allclose(dec.logits, emu.logits, atol=1e-4)


def test_predict_with_exit_uses_the_checkpoints_head(models):
  tokens, ref_NBTV = reference("llama_tied")
  model = models["llama_tied"]
  first = exits.predict_with_exit(model, tokens, 0.0, exit_layers=(1,))
  never = exits.predict_with_exit(model, tokens, np.inf, exit_layers=(1,))
  np.testing.assert_allclose(first.logits, ref_NBTV[0], atol=1e-4)
  np.testing.assert_allclose(never.logits, ref_NBTV[-1], atol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_export_round_trips_exactly(models, name, tmp_path):
  model = models[name]
  out = save_hf_checkpoint(model, str(tmp_path / name))
  original, exported = tensors(fixture(name)), tensors(out)
  # Every tensor the original stores comes back bit for bit (transformers' tied lm_head
  # is not stored in either).
  assert set(exported) == set(original)
  for key, value in original.items():
    np.testing.assert_array_equal(exported[key], value, err_msg=key)
  again = load_hf_checkpoint(out)
  assert again.config == model.config
  chex.assert_trees_all_equal(checkpoint.pure_params(again), checkpoint.pure_params(model))


def test_orbax_round_trip_keeps_the_new_fields(models, tmp_path):
  model = models["llama"]
  checkpoint.save_model(model, str(tmp_path / "m"), tokenizer=load_hf_tokenizer(fixture("gpt2")))
  stored = json.loads((tmp_path / "m" / "model.json").read_text())
  assert stored["positions"] == "rope" and stored["num_kv_heads"] == 2
  loaded = checkpoint.load_model(str(tmp_path / "m"))
  assert loaded.config == model.config
  chex.assert_trees_all_equal(checkpoint.pure_params(loaded), checkpoint.pure_params(model))


def test_load_checkpoint_reads_a_hf_directory_with_its_tokenizer():
  ckpt = checkpoint.load_checkpoint(fixture("gpt2"))
  assert ckpt.step == 0 and ckpt.experiment is None
  text = "Early exit, déjà vu."
  ids = ckpt.tokenizer.encode(text)
  assert len(ids) == len(text.encode()) and ckpt.tokenizer.decode(ids) == text
  assert checkpoint.read_model_config(fixture("gpt2")) == ckpt.model.config
  assert load_hf_tokenizer(fixture("llama")) is None


def test_sharded_index_loads_like_one_file(tmp_path, models):
  """model.safetensors.index.json with two shards (as large checkpoints are published)."""
  d = tmp_path / "sharded"
  shutil.copytree(fixture("llama"), d)
  os.remove(d / "model.safetensors")
  all_tensors = tensors(fixture("llama"))
  names = sorted(all_tensors)
  shards = {"model-00001-of-00002.safetensors": names[::2],
            "model-00002-of-00002.safetensors": names[1::2]}
  for file, keys in shards.items():
    save_file({k: all_tensors[k] for k in keys}, str(d / file))
  (d / "model.safetensors.index.json").write_text(json.dumps(
      {"weight_map": {k: f for f, keys in shards.items() for k in keys}}))
  chex.assert_trees_all_equal(checkpoint.pure_params(load_hf_checkpoint(str(d))),
                              checkpoint.pure_params(models["llama"]))
  os.remove(d / "model-00002-of-00002.safetensors")
  with pytest.raises(UserError, match="model-00002-of-00002.safetensors is missing"):
    load_hf_checkpoint(str(d))


def test_import_onto_a_model_axis_mesh(models):
  """Parameters placed directly on 4 devices, split along the model axis, compute the same
  logits."""
  assert jax.device_count() >= 4
  mesh = jax.make_mesh((4,), ("model",), axis_types=(jax.sharding.AxisType.Auto,))
  model = load_hf_checkpoint(fixture("llama"), mesh=mesh)
  qkv = model.blocks.qkv.kernel[...]
  assert qkv.sharding.spec == jax.sharding.PartitionSpec(None, None, "model")
  assert {s.data.shape for s in qkv.addressable_shards} == {(3, 32, 64 // 4)}
  assert len(model.embed.embedding[...].sharding.device_set) == 4
  chex.assert_trees_all_equal(jax.device_get(checkpoint.pure_params(model)),
                              jax.device_get(checkpoint.pure_params(models["llama"])))
  tokens, want_NBTV = reference("llama")
  np.testing.assert_allclose(all_layer_logits(model, tokens), want_NBTV, atol=1e-4)


def _edit_config(tmp_path, name, **changes):
  d = tmp_path / name
  shutil.copytree(fixture(name), d)
  cfg = json.loads((d / "config.json").read_text())
  for key, value in changes.items():
    if value is None:
      cfg.pop(key, None)
    else:
      cfg[key] = value
  (d / "config.json").write_text(json.dumps(cfg))
  return str(d)


@pytest.mark.parametrize("name, changes, message", [
    ("gpt2", dict(architectures=["MistralForCausalLM"]), "'MistralForCausalLM' is not supported"),
    ("gpt2", dict(activation_function="relu"), "activation_function 'relu'"),
    ("llama", dict(rope_parameters={"rope_type": "yarn", "factor": 2.0}), "rope_type 'yarn'"),
    ("llama", dict(num_hidden_layers=4), "no tensor 'model.layers.3"),
    ("llama", dict(intermediate_size=65), "does not match|do not match"),
    ("llama", dict(hidden_size=None), "no 'hidden_size'"),
])
def test_bad_checkpoints_are_one_line_errors(tmp_path, name, changes, message):
  with pytest.raises(UserError, match=message) as e:
    load_hf_checkpoint(_edit_config(tmp_path, name, **changes))
  assert "\n" not in str(e.value)


def test_missing_files_are_one_line_errors(tmp_path):
  with pytest.raises(UserError, match="is not a directory"):
    load_hf_checkpoint(str(tmp_path / "nowhere"))
  with pytest.raises(UserError, match="has no config.json"):
    load_hf_checkpoint(str(tmp_path))
  d = tmp_path / "noweights"
  d.mkdir()
  shutil.copy(os.path.join(fixture("gpt2"), "config.json"), d)
  with pytest.raises(UserError, match="has no model.safetensors"):
    load_hf_checkpoint(str(d))


def test_export_refuses_what_hf_cannot_hold(tmp_path):
  # The config alone decides (nothing is read before): shape-only models suffice.
  native = checkpoint.abstract_model(ModelConfig(vocab_size=11, num_layers=2, dim=8,
                                                 num_heads=2))
  with pytest.raises(UserError, match="unembed_bias=True"):
    save_hf_checkpoint(native, str(tmp_path / "x"))
  mixed = checkpoint.abstract_model(ModelConfig(vocab_size=11, num_layers=2, dim=8,
                                                num_heads=2, norm="rmsnorm",
                                                tie_embeddings=True))
  with pytest.raises(UserError, match="norm='rmsnorm', positions='learned'"):
    save_hf_checkpoint(mixed, str(tmp_path / "y"))


@pytest.mark.parametrize("changes, field", [
    (dict(norm="batchnorm"), "model.norm="),
    (dict(norm_eps=0.0), "model.norm_eps"),
    (dict(positions="alibi"), "model.positions="),
    (dict(mlp="relu"), "model.mlp="),
    (dict(num_kv_heads=3), "model.num_kv_heads=3"),
    (dict(num_kv_heads=0), "model.num_kv_heads=0"),
    (dict(positions="rope", dim=12, num_heads=4), "even head width"),
    (dict(positions="rope", rope_scaling=0.5), "model.rope_scaling"),
    (dict(positions="rope", rope_scaling=8.0, rope_low_freq_factor=4.0), "rope_low_freq_factor"),
    (dict(attention_bias="no"), "model.attention_bias"),
    (dict(param_dtype="float16"), "model.param_dtype='float16'"),
])
def test_bad_architecture_options_name_the_field(changes, field):
  base = dict(vocab_size=11, num_layers=2, dim=16, num_heads=4)
  with pytest.raises(UserError, match=field.replace("(", r"\(")) as e:
    ModelConfig(**{**base, **changes})
  assert "\n" not in str(e.value)


def test_configs_saved_before_the_options_load_as_the_original_block():
  old = dict(vocab_size=11, num_layers=2, dim=16, num_heads=4, ffn_dim=None, max_len=16,
             dropout=0.0, tie_embeddings=False, remat="none", attention_chunks=2,
             dtype="float32")
  cfg = ModelConfig(**old)
  assert (cfg.norm, cfg.norm_eps, cfg.positions, cfg.mlp, cfg.kv_heads) == (
      "layernorm", 1e-6, "learned", "gelu", 4)
  params = checkpoint.pure_params(checkpoint.abstract_model(cfg))
  assert set(params) == {"embed", "pos_embed", "blocks", "final_norm", "unembed"}
  assert set(params["blocks"]) == {"ln1", "qkv", "attn_out", "ln2", "fc1", "fc2"}
  assert params["blocks"]["qkv"]["kernel"].shape == (2, 16, 48)


def test_generate_binaries_library_functions_take_a_hf_directory():
  """deepexit-generate's functions on a Hugging Face directory: its tokenizer.json encodes
  the prompt, speculation gives exactly the full-depth text."""
  gen = decoding.generate_text(fixture("gpt2"), "Hello", 6, np.inf, exit_layers=(1,))
  spec = decoding.speculative_text(fixture("gpt2"), "Hello", 6, draft_layer=1, draft_len=2)
  assert spec.identical and spec.texts == gen.texts and gen.texts[0]


def test_probe_collection_on_an_imported_model(models):
  """Saturation-probe collection reads every layer through the checkpoint's own head."""
  from deepexit_jax import data, probes

  tokens, ref_NBTV = reference("llama")
  batches = data.eval_batches(tokens[0], 11, 1)
  col = probes.collect(models["llama"], batches, 11, top_k=2)
  logp_NTV = np.asarray(jax.nn.log_softmax(ref_NBTV[:, 0, :11], -1))
  np.testing.assert_array_equal(col.topk_NMK[:, :, 0], logp_NTV.argmax(-1))
  want_NM = -np.take_along_axis(logp_NTV, tokens[0, 1:][None, :, None], -1)[..., 0]
  np.testing.assert_allclose(col.nll_NM, want_NM, atol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_flop_counter_counts_the_blocks_real_matrices(models, name):
  """block(t) = 2 x (multiply-adds of every projection: the kernels' sizes, so SwiGLU's
  three matrices and GQA's narrower keys/values count as they are) + attention 4 (t+1) D;
  kv = the key/value columns of qkv."""
  model = models[name]
  cfg = model.config
  params = checkpoint.pure_params(model)["blocks"]
  weights = sum(params[m]["kernel"][0].size for m in ("qkv", "attn_out", "fc1", "fc2"))
  counter = exits.FlopCounter.from_config(cfg)
  for t in (0, 7):
    assert counter.block(t) == 2 * weights + 4 * (t + 1) * cfg.dim
  q_cols = cfg.num_heads * cfg.head_dim
  assert counter.kv == 2 * params["qkv"]["kernel"][0][:, q_cols:].size


def test_bfloat16_compute_stays_close_to_the_reference():
  """dtype="bfloat16": bf16 matmuls (so not float32-exact), logits within 5% of their range
  (measured: 1.5% on the llama fixture)."""
  tokens, want_NBTV = reference("llama")
  model = load_hf_checkpoint(fixture("llama"), dtype="bfloat16")
  assert model.config.dtype == "bfloat16"
  err = np.abs(np.asarray(all_layer_logits(model, tokens)) - want_NBTV).max()
  assert 1e-4 < err < 0.05 * np.abs(want_NBTV).max()
  with pytest.raises(UserError, match="dtype='float16'"):
    load_hf_checkpoint(fixture("llama"), dtype="float16")


def test_bfloat16_parameters_halve_the_memory(models):
  """param_dtype="bfloat16": every parameter stored in bf16 (half the bytes), logits within
  5% of their range (measured 1%), and the KV-cache decoder still equals the forward pass."""
  tokens, want_NBTV = reference("llama")
  model = load_hf_checkpoint(fixture("llama"), param_dtype="bfloat16")
  leaves = jax.tree.leaves(checkpoint.pure_params(model))
  f32_leaves = jax.tree.leaves(checkpoint.pure_params(models["llama"]))
  assert {x.dtype for x in leaves} == {np.dtype(jax.numpy.bfloat16)}
  assert 2 * sum(x.nbytes for x in leaves) == sum(x.nbytes for x in f32_leaves)
  err = np.abs(np.asarray(all_layer_logits(model, tokens)) - want_NBTV).max()
  assert 1e-4 < err < 0.05 * np.abs(want_NBTV).max()
  res = decoding.generate(model, tokens[:, :4], 6, exit_layers=(3,), return_logits=True)
  forward_BTV = np.asarray(all_layer_logits(model, res.tokens))[-1]
  np.testing.assert_allclose(res.logits, forward_BTV[:, 3:9], atol=1e-4)
