"""Llama and GPT-2 as `ModelConfig`s: config.json fields and tensor names, both directions.

A Hugging Face architecture is described here by two pure functions: `model_config`
(config.json dict -> our `ModelConfig`) and `tensor_specs` (which Hugging Face tensors
make each of our parameters, and how). `hf_config` and the specs' `split` run the other
way for the export. Conventions (checked against `transformers` by the fixture tests):
  Llama   nn.Linear weights are [out, in]: transposed into our [in, out] kernels. q, k, v
          are stacked into one qkv kernel [D, (H + 2G) K] in that order, gate and up
          into fc1 [D, 2F]. RoPE is rotate-half over each head's two halves (our
          `model.apply_rope`). RMSNorm with `rms_norm_eps`; SiLU SwiGLU; tied or untied.
  GPT-2   Conv1D weights are already [in, out]; c_attn packs q, k, v as our qkv does.
          gelu_new is the tanh GELU (ours); LayerNorm eps `layer_norm_epsilon` (1e-5);
          learned positions; tied embeddings unless tie_word_embeddings is false.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from deepexit_jax.errors import UserError
from deepexit_jax.model import ModelConfig

LLAMA, GPT2 = "LlamaForCausalLM", "GPT2LMHeadModel"
ARCHITECTURES = (LLAMA, GPT2)
# A rotary model's KV caches are [B, max_len, G, K] per layer: a 128k-context checkpoint
# would allocate them whole, so imports cap max_len here unless asked for more.
DEFAULT_MAX_LEN = 4096
_MODEL_TYPES = {"llama": LLAMA, "gpt2": GPT2}


@dataclasses.dataclass(frozen=True)
class TensorSpec:
  """How one of our parameters is made from Hugging Face tensors (and back).

  Attributes:
    names: Hugging Face tensor names; "{i}" stands for the 0-based layer of a stacked
      block parameter.
    combine: the tensors (in `names` order) -> our array for one layer (or the whole
      parameter when `layered` is False).
    split: the inverse, our array -> the tensors.
    layered: a block parameter, stacked over layers on axis 0.
  """

  names: tuple[str, ...]
  combine: Callable[[list[np.ndarray]], np.ndarray]
  split: Callable[[np.ndarray], list[np.ndarray]]
  layered: bool = True


def _copy(*names: str, layered: bool = True) -> TensorSpec:
  return TensorSpec(names, lambda xs: xs[0], lambda a: [a], layered)


def _transposed(name: str, *, layered: bool = True) -> TensorSpec:
  return TensorSpec((name,), lambda xs: xs[0].T, lambda a: [a.T], layered)


def _stacked(names: tuple[str, ...], widths: list[int], *, transpose: bool) -> TensorSpec:
  """Tensors concatenated along our output axis (kernels: [in, out], from [out, in] if
  `transpose`; biases: [out])."""
  cuts = list(np.cumsum(widths)[:-1])
  if transpose:
    return TensorSpec(names, lambda xs: np.concatenate([x.T for x in xs], axis=1),
                      lambda a: [x.T for x in np.split(a, cuts, axis=1)])
  return TensorSpec(names, lambda xs: np.concatenate(xs, axis=-1),
                    lambda a: np.split(a, cuts, axis=-1))


def architecture_of(hf: dict[str, Any], where: str) -> str:
  """The supported architecture a config.json describes, or a one-line UserError."""
  archs = hf.get("architectures") or []
  arch = archs[0] if archs else _MODEL_TYPES.get(hf.get("model_type"))
  if arch not in ARCHITECTURES:
    raise UserError(
        f"{where}: architecture {arch or hf.get('model_type')!r} is not supported: "
        f"deepexit_jax imports {' and '.join(ARCHITECTURES)} checkpoints")
  return arch


def _need(hf: dict[str, Any], key: str, where: str) -> Any:
  if key not in hf:
    raise UserError(f"{where} has no {key!r}: not a complete Hugging Face config.json")
  return hf[key]


def _rope(hf: dict[str, Any], where: str) -> dict[str, Any]:
  """RoPE fields of a Llama config (transformers 4's rope_theta + rope_scaling, or 5's
  rope_parameters)."""
  params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
  theta = float(hf.get("rope_theta", params.get("rope_theta", 10000.0)))
  kind = params.get("rope_type", params.get("type", "default"))
  if kind == "default":
    return {"rope_theta": theta}
  if kind != "llama3":
    raise UserError(f"{where}: rope_type {kind!r} is not supported: deepexit_jax implements "
                    "the default RoPE and Llama-3 scaling ('llama3')")
  return {"rope_theta": theta, "rope_scaling": float(params["factor"]),
          "rope_low_freq_factor": float(params["low_freq_factor"]),
          "rope_high_freq_factor": float(params["high_freq_factor"]),
          "rope_original_max_len": int(params["original_max_position_embeddings"])}


def model_config(hf: dict[str, Any], where: str, *, dtype: str = "float32",
                 max_len: int | None = None) -> ModelConfig:
  """Our `ModelConfig` of a Hugging Face config.json dict.

  Args:
    hf: the parsed config.json.
    where: the file, for error messages.
    dtype: compute dtype ("float32" or "bfloat16").
    max_len: longest sequence (and KV cache); None: the checkpoint's, capped at
      `DEFAULT_MAX_LEN` for rotary models (GPT-2's learned table may only be cut).
  """
  arch = architecture_of(hf, where)
  if arch == LLAMA:
    d, h = _need(hf, "hidden_size", where), _need(hf, "num_attention_heads", where)
    if hf.get("hidden_act", "silu") != "silu":
      raise UserError(f"{where}: hidden_act {hf['hidden_act']!r} is not supported: "
                      "Llama checkpoints use 'silu'")
    if hf.get("head_dim") not in (None, d // h):
      raise UserError(f"{where}: head_dim {hf['head_dim']} != hidden_size / "
                      f"num_attention_heads = {d // h}: not supported")
    limit = int(hf.get("max_position_embeddings", DEFAULT_MAX_LEN))
    return ModelConfig(
        vocab_size=_need(hf, "vocab_size", where), num_layers=_need(hf, "num_hidden_layers", where),
        dim=d, num_heads=h, ffn_dim=_need(hf, "intermediate_size", where),
        max_len=max_len or min(limit, DEFAULT_MAX_LEN), dropout=0.0,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), dtype=dtype,
        norm="rmsnorm", norm_eps=float(hf.get("rms_norm_eps", 1e-6)), positions="rope",
        mlp="swiglu", num_kv_heads=int(hf.get("num_key_value_heads") or h),
        attention_bias=bool(hf.get("attention_bias", False)),
        mlp_bias=bool(hf.get("mlp_bias", False)), unembed_bias=False, **_rope(hf, where))
  d = _need(hf, "n_embd", where)
  act = hf.get("activation_function", "gelu_new")
  if act not in ("gelu_new", "gelu_pytorch_tanh"):
    raise UserError(f"{where}: activation_function {act!r} is not supported: deepexit_jax's "
                    "GELU is the tanh approximation ('gelu_new')")
  for key, ok in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                  ("add_cross_attention", False)):
    if hf.get(key, ok) != ok:
      raise UserError(f"{where}: {key}={hf[key]} is not supported (only {ok})")
  positions = int(_need(hf, "n_positions", where))
  if max_len is not None and max_len > positions:
    raise UserError(f"max_len={max_len} exceeds the checkpoint's n_positions={positions} "
                    "(learned positions): ask for at most that")
  return ModelConfig(
      vocab_size=_need(hf, "vocab_size", where), num_layers=_need(hf, "n_layer", where), dim=d,
      num_heads=_need(hf, "n_head", where), ffn_dim=hf.get("n_inner") or 4 * d,
      max_len=max_len or positions, dropout=0.0,
      tie_embeddings=bool(hf.get("tie_word_embeddings", True)), dtype=dtype,
      norm="layernorm", norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
      positions="learned", mlp="gelu", unembed_bias=False)


def export_architecture(config: ModelConfig) -> str:
  """The Hugging Face architecture a model of `config` exports to, or a UserError naming
  the first field that neither Llama nor GPT-2 can hold."""
  untied_bias = not config.tie_embeddings and config.unembed_bias
  if (config.norm, config.positions, config.mlp) == ("rmsnorm", "rope", "swiglu"):
    problem = "model.unembed_bias=True (Llama's LM head has no bias)" if untied_bias else None
    arch = LLAMA
  elif (config.norm, config.positions, config.mlp) == ("layernorm", "learned", "gelu"):
    arch = GPT2
    problem = ("model.unembed_bias=True (GPT-2's LM head has no bias)" if untied_bias else
               "model.num_kv_heads (GPT-2 has no grouped-query attention)"
               if config.kv_heads != config.num_heads else
               "model.attention_bias/mlp_bias=False (GPT-2 has every bias)"
               if not (config.attention_bias and config.mlp_bias) else None)
  else:
    arch, problem = None, (f"model.norm={config.norm!r}, positions={config.positions!r}, "
                           f"mlp={config.mlp!r} (Llama is rmsnorm/rope/swiglu, GPT-2 "
                           "layernorm/learned/gelu)")
  if problem:
    raise UserError(f"cannot export to a Hugging Face checkpoint: {problem}; export a model "
                    "of a Llama- or GPT-2-shaped config")
  return arch


def hf_config(config: ModelConfig) -> dict[str, Any]:
  """The config.json of our model (`export_architecture` decides which family)."""
  arch = export_architecture(config)
  common = {"architectures": [arch], "vocab_size": config.vocab_size,
            "tie_word_embeddings": config.tie_embeddings, "torch_dtype": "float32"}
  if arch == GPT2:
    return {**common, "model_type": "gpt2", "n_embd": config.dim, "n_layer": config.num_layers,
            "n_head": config.num_heads, "n_inner": config.ffn_width,
            "n_positions": config.max_len, "activation_function": "gelu_new",
            "layer_norm_epsilon": config.norm_eps}
  out = {**common, "model_type": "llama", "hidden_size": config.dim,
         "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
         "num_key_value_heads": config.kv_heads, "head_dim": config.head_dim,
         "intermediate_size": config.ffn_width, "max_position_embeddings": config.max_len,
         "hidden_act": "silu", "rms_norm_eps": config.norm_eps, "rope_theta": config.rope_theta,
         "attention_bias": config.attention_bias, "mlp_bias": config.mlp_bias}
  if config.rope_scaling > 1:
    out["rope_scaling"] = {
        "rope_type": "llama3", "factor": config.rope_scaling,
        "low_freq_factor": config.rope_low_freq_factor,
        "high_freq_factor": config.rope_high_freq_factor,
        "original_max_position_embeddings": config.rope_original_max_len}
  return out


def tensor_specs(arch: str, config: ModelConfig, prefix: str = "transformer."
                 ) -> dict[tuple[str, ...], TensorSpec]:
  """Our parameter paths (as in `nnx.state(model, nnx.Param).to_pure_dict()`) -> specs.

  Args:
    arch: `LLAMA` or `GPT2`.
    config: the model's config (widths of the stacked projections).
    prefix: GPT-2's tensor name prefix ("transformer." as `save_pretrained` writes;
      the original OpenAI conversion has none).
  """
  specs: dict[tuple[str, ...], TensorSpec] = {}
  k, h, g, f = config.head_dim, config.num_heads, config.kv_heads, config.ffn_width
  if arch == LLAMA:
    p = "model.layers.{i}."
    a, m = p + "self_attn.", p + "mlp."
    qkv = (a + "q_proj.", a + "k_proj.", a + "v_proj.")
    specs[("blocks", "ln1", "scale")] = _copy(p + "input_layernorm.weight")
    specs[("blocks", "qkv", "kernel")] = _stacked(
        tuple(n + "weight" for n in qkv), [h * k, g * k, g * k], transpose=True)
    specs[("blocks", "attn_out", "kernel")] = _transposed(a + "o_proj.weight")
    specs[("blocks", "ln2", "scale")] = _copy(p + "post_attention_layernorm.weight")
    specs[("blocks", "fc1", "kernel")] = _stacked(
        (m + "gate_proj.weight", m + "up_proj.weight"), [f, f], transpose=True)
    specs[("blocks", "fc2", "kernel")] = _transposed(m + "down_proj.weight")
    if config.attention_bias:
      specs[("blocks", "qkv", "bias")] = _stacked(
          tuple(n + "bias" for n in qkv), [h * k, g * k, g * k], transpose=False)
      specs[("blocks", "attn_out", "bias")] = _copy(a + "o_proj.bias")
    if config.mlp_bias:
      specs[("blocks", "fc1", "bias")] = _stacked(
          (m + "gate_proj.bias", m + "up_proj.bias"), [f, f], transpose=False)
      specs[("blocks", "fc2", "bias")] = _copy(m + "down_proj.bias")
    specs[("embed", "embedding")] = _copy("model.embed_tokens.weight", layered=False)
    specs[("final_norm", "scale")] = _copy("model.norm.weight", layered=False)
  else:
    p = prefix + "h.{i}."
    for ours, theirs in (("ln1", "ln_1"), ("ln2", "ln_2")):
      specs[("blocks", ours, "scale")] = _copy(p + theirs + ".weight")
      specs[("blocks", ours, "bias")] = _copy(p + theirs + ".bias")
    for ours, theirs in (("qkv", "attn.c_attn"), ("attn_out", "attn.c_proj"),
                         ("fc1", "mlp.c_fc"), ("fc2", "mlp.c_proj")):
      specs[("blocks", ours, "kernel")] = _copy(p + theirs + ".weight")  # Conv1D: [in, out]
      specs[("blocks", ours, "bias")] = _copy(p + theirs + ".bias")
    specs[("embed", "embedding")] = _copy(prefix + "wte.weight", layered=False)
    n = config.max_len
    specs[("pos_embed",)] = TensorSpec((prefix + "wpe.weight",), lambda xs: xs[0][:n],
                                       lambda a: [a], layered=False)
    specs[("final_norm", "scale")] = _copy(prefix + "ln_f.weight", layered=False)
    specs[("final_norm", "bias")] = _copy(prefix + "ln_f.bias", layered=False)
  if not config.tie_embeddings:
    specs[("unembed", "kernel")] = _transposed("lm_head.weight", layered=False)
  return specs
