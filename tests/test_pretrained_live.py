"""The import and the export against live Hugging Face `transformers` (PyTorch).

Runs only where transformers and torch are installed (they are not dependencies; the
committed fixtures of tests/test_pretrained.py cover the same conventions everywhere):
fresh random checkpoints made by transformers are imported and compared layer by layer,
and our export is loaded back by transformers and computes the same logits.
"""

import numpy as np
import pytest

from deepexit_jax.model import all_layer_logits
from deepexit_jax.pretrained import load_hf_checkpoint, save_hf_checkpoint

transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed (live reference test)")
torch = pytest.importorskip("torch", reason="torch is not installed (live reference test)")


def _random(model, seed):
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1:
        p.copy_((1.0 if "norm" in name or "ln_" in name else 0.0)
                + 0.3 * torch.randn(p.shape, generator=g))
      else:
        p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)


def _per_layer(model, tokens):
  with torch.no_grad():
    out = model(torch.as_tensor(tokens, dtype=torch.long), output_hidden_states=True)
    norm = model.model.norm if hasattr(model, "model") else model.transformer.ln_f
    layers = [model.lm_head(norm(h)) for h in out.hidden_states[1:-1]] + [out.logits]
  return np.stack([x.float().numpy() for x in layers])


CONFIGS = {
    "llama_gqa": lambda: transformers.LlamaConfig(
        vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
        num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=48,
        rms_norm_eps=1e-6, rope_theta=1234.0, tie_word_embeddings=False),
    "llama_tied_scaled": lambda: transformers.LlamaConfig(
        vocab_size=80, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=40,
        tie_word_embeddings=True, rope_scaling={
            "rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
            "high_freq_factor": 2.0, "original_max_position_embeddings": 8}),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=90, n_positions=40, n_embd=32,
                                            n_layer=3, n_head=2),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_import_and_export_against_live_transformers(name, tmp_path):
  cfg = CONFIGS[name]()
  hf = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
  _random(hf, seed=len(name))
  if getattr(cfg, "tie_word_embeddings", False):
    hf.tie_weights()
  hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 20)).astype(np.int32)
  want_NBTV = _per_layer(hf, tokens)

  model = load_hf_checkpoint(str(tmp_path / "hf"))
  np.testing.assert_allclose(all_layer_logits(model, tokens), want_NBTV, atol=1e-4)

  save_hf_checkpoint(model, str(tmp_path / "ours"))
  back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").float().eval()
  np.testing.assert_allclose(_per_layer(back, tokens), want_NBTV, atol=1e-4)
