"""The same training step in plain PyTorch eager: the foundation issue's throughput yardstick.

The foundation issue sets the training-throughput target as "what a plain PyTorch
eager version of the same model reaches on this machine". This script is that
version, so the yardstick is measured on the same machine and in the same
session as `train_throughput.py`, not quoted: pre-LayerNorm blocks (causal
multi-head attention + tanh-GELU MLP), learned positions, one shared exit head
(final LayerNorm + unembedding) applied to the supervised layers, loss
sum_l w_l CE_l, AdamW with global-norm clipping, batch 32 x seq 128 of random
tokens (vocabulary 171), float32, all CPU threads.

Run (needs `torch`, which deepexit_jax itself does not depend on; a CPU wheel is enough):
  python experiments/bench/torch_reference.py [--steps=100] [--attention=sdpa|manual]

Prints ONE JSON object as its last line: {"tokens_per_s": ..., "step_ms": ..., ...}.
`--attention=sdpa` uses `F.scaled_dot_product_attention(is_causal=True)` (PyTorch's
fused kernel); `manual` writes out scores, mask, softmax and the weighted sum.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


class Block(nn.Module):
  def __init__(self, dim: int, heads: int, ffn: int, attention: str):
    super().__init__()
    self.heads, self.attention = heads, attention
    self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
    self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
    self.fc1, self.fc2 = nn.Linear(dim, ffn), nn.Linear(ffn, dim)

  def forward(self, h: torch.Tensor) -> torch.Tensor:
    b, t, d = h.shape
    q, k, v = self.qkv(self.ln1(h)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # [B, H, T, K]
    if self.attention == "sdpa":
      att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
      scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
      mask = torch.ones(t, t, dtype=torch.bool, device=h.device).tril()
      att = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v
    h = h + self.out(att.transpose(1, 2).reshape(b, t, d))
    return h + self.fc2(F.gelu(self.fc1(self.ln2(h)), approximate="tanh"))


class Model(nn.Module):
  def __init__(self, vocab: int, layers: int, dim: int, heads: int, ffn: int, max_len: int,
               attention: str):
    super().__init__()
    self.embed, self.pos = nn.Embedding(vocab, dim), nn.Parameter(torch.zeros(max_len, dim))
    nn.init.normal_(self.pos, std=0.02)
    self.blocks = nn.ModuleList(Block(dim, heads, ffn, attention) for _ in range(layers))
    self.norm, self.unembed = nn.LayerNorm(dim), nn.Linear(dim, vocab)

  def loss(self, tokens: torch.Tensor, targets: torch.Tensor,
           weights: dict[int, float]) -> torch.Tensor:
    h = self.embed(tokens) + self.pos[: tokens.shape[1]]
    total = h.new_zeros(())
    for i, block in enumerate(self.blocks, start=1):
      h = block(h)
      if i in weights:
        logits = self.unembed(self.norm(h))
        total = total + weights[i] * F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    return total


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=100)
  parser.add_argument("--attention", choices=("sdpa", "manual"), default="sdpa")
  parser.add_argument("--vocab", type=int, default=171)
  args = parser.parse_args()
  torch.manual_seed(0)
  weights = {2: 0.7, 4: 0.3}  # The reference config.
  model = Model(args.vocab, layers=4, dim=32, heads=2, ffn=128, max_len=128,
                attention=args.attention)
  opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.98), weight_decay=0.01)
  rng = np.random.default_rng(0)
  b, s = 32, 128

  def step() -> float:
    x = torch.from_numpy(rng.integers(0, args.vocab, (b, s + 1)).astype(np.int64))
    loss = model.loss(x[:, :-1], x[:, 1:], weights)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return float(loss.detach())

  for _ in range(10):  # Warm-up (allocator, kernels).
    step()
  t0 = time.perf_counter()
  for _ in range(args.steps):
    last = step()
  step_s = (time.perf_counter() - t0) / args.steps
  result = {"tokens_per_s": round(b * s / step_s), "step_ms": round(1e3 * step_s, 2),
            "attention": args.attention, "threads": torch.get_num_threads(),
            "torch": torch.__version__, "final_loss": round(last, 4)}
  print(f"PyTorch eager ({args.attention}): {result['tokens_per_s']:,} training tokens/s, "
        f"{result['step_ms']} ms/step (batch {b} x seq {s})")
  print(json.dumps(result))


if __name__ == "__main__":
  main()
