"""Makes the tiny Hugging Face checkpoints in tests/fixtures/hf/ with the reference implementation.

Why: `deepexit_jax.pretrained` reimplements Llama and GPT-2 in JAX. Its tests compare our
per-layer logits with numbers computed by Hugging Face `transformers` (PyTorch) itself,
the implementation every released checkpoint was trained and published with, so a wrong
convention (RoPE's rotate-half pairing, the grouped-query head order, GPT-2's Conv1D
layout, a norm epsilon) fails the tests. transformers and torch are not dependencies of
the package, so the checkpoints and their reference logits are made once and committed;
tests/test_pretrained_live.py repeats the comparison live where both are installed.

How (a separate virtual environment, not the project's .venv):

    python3 -m venv /work/hfvenv
    /work/hfvenv/bin/pip install torch --index-url https://download.pytorch.org/whl/cpu
    /work/hfvenv/bin/pip install transformers safetensors numpy
    /work/hfvenv/bin/python scripts/make_hf_fixtures.py [--out tests/fixtures/hf]

Each fixture directory holds what `save_pretrained(safe_serialization=True)` writes
(config.json, model.safetensors) with random float32 weights (every parameter redrawn,
norm weights and biases included, so a bug that drops a bias or reads the wrong norm
shows), and reference.npz:
  tokens      int32 [B, T] random ids
  logits_NBTV float32: for l < N, lm_head(final_norm(hidden_states[l])) (the output of
              block l through the model's own head: LayerSkip's early exit); for l = N
              the model's own logits (its last hidden_states entry is already normed)
The fixtures:
  llama       LlamaForCausalLM, grouped-query attention (4 heads, 2 key/value heads),
              rope_theta 500000 with Llama-3 rope_scaling (factor 8, original context 16,
              so every frequency band is exercised), untied LM head, 3 layers.
  llama_tied  LlamaForCausalLM, multi-query attention (1 key/value head), tied
              embeddings (as Llama 3.2 1B), attention and MLP biases, 2 layers.
  gpt2        GPT2LMHeadModel (tied, learned positions, gelu_new, LayerNorm eps 1e-5),
              2 layers, with a byte-level tokenizer.json (256 ids, no merges).
Deterministic for a fixed torch version (seeded).
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch


def _randomize(model, seed: int) -> None:
  """Redraws every parameter: weights N(0, 1/fan_in) (embeddings N(0, 1)), norm weights
  1 + N(0, 0.3^2), biases N(0, 0.3^2)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1 and ("norm" in name or "ln_" in name) and name.endswith("weight"):
        p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
      elif p.ndim == 1:
        p.copy_(0.3 * torch.randn(p.shape, generator=g))
      elif "wte" in name or "wpe" in name or "embed_tokens" in name:
        p.copy_(torch.randn(p.shape, generator=g))
      else:
        fan_in = p.shape[0] if "c_" in name else p.shape[1]  # GPT-2 Conv1D is [in, out].
        p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)


def _reference(model, tokens: np.ndarray) -> np.ndarray:
  """[N, B, T, V] float32: every layer's exit through the model's own final norm + head."""
  with torch.no_grad():
    out = model(torch.as_tensor(tokens, dtype=torch.long), output_hidden_states=True)
    hidden = out.hidden_states  # N + 1 entries: the embeddings, then every block's output
    norm = model.model.norm if hasattr(model, "model") else model.transformer.ln_f
    layers = [model.lm_head(norm(h)) for h in hidden[1:-1]] + [out.logits]
  return np.stack([x.float().numpy() for x in layers]).astype(np.float32)


def _byte_tokenizer(path: str) -> None:
  """A byte-level BPE tokenizer.json with the 256-byte alphabet and no merges."""
  import tokenizers as hf

  alphabet = hf.pre_tokenizers.ByteLevel.alphabet()
  vocab = {c: i for i, c in enumerate(sorted(alphabet))}
  tok = hf.Tokenizer(hf.models.BPE(vocab=vocab, merges=[]))
  tok.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = hf.decoders.ByteLevel()
  tok.save(path)


def make(out: str) -> None:
  from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

  fixtures = {
      "llama": (LlamaForCausalLM, LlamaConfig(
          vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
          rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False,
          rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                        "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
          bos_token_id=1, eos_token_id=2, pad_token_id=None)),
      "llama_tied": (LlamaForCausalLM, LlamaConfig(
          vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
          num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=32,
          rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=True,
          attention_bias=True, mlp_bias=True, bos_token_id=1, eos_token_id=2)),
      "gpt2": (GPT2LMHeadModel, GPT2Config(
          vocab_size=256, n_positions=32, n_embd=32, n_layer=2, n_head=4,
          bos_token_id=0, eos_token_id=0)),
  }
  for i, (name, (cls, cfg)) in enumerate(fixtures.items()):
    torch.manual_seed(i)
    model = cls(cfg).float().eval()
    _randomize(model, seed=100 + i)
    if getattr(cfg, "tie_word_embeddings", False):
      model.tie_weights()
    d = os.path.join(out, name)
    model.save_pretrained(d, safe_serialization=True)
    tokens = np.random.default_rng(i).integers(0, cfg.vocab_size, (2, 12)).astype(np.int32)
    np.savez(os.path.join(d, "reference.npz"), tokens=tokens,
             logits_NBTV=_reference(model, tokens))
    if name == "gpt2":
      _byte_tokenizer(os.path.join(d, "tokenizer.json"))
    for extra in ("generation_config.json",):  # Not read by anyone; keeps the fixture small.
      if os.path.exists(os.path.join(d, extra)):
        os.remove(os.path.join(d, extra))
    with open(os.path.join(d, "config.json")) as f:
      arch = json.load(f)["architectures"]
    print(name, arch, sorted(os.listdir(d)))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=os.path.join(
      os.path.dirname(__file__), "..", "tests", "fixtures", "hf"))
  make(os.path.abspath(parser.parse_args().out))


if __name__ == "__main__":
  main()
