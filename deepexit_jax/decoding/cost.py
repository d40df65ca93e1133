"""Compute accounting of decodes, in the formulas of `exits.FlopCounter` (the emulation's)."""

from __future__ import annotations

import dataclasses

import numpy as np

from deepexit_jax import exits
from deepexit_jax.decoding.early_exit import EMULATED_POLICY, DecodeResult
from deepexit_jax.model import ModelConfig


@dataclasses.dataclass(frozen=True)
class DecodeCost:
  """FLOPs of a decode's steps (formulas of `exits`, per batch row, summed over steps).

  Attributes:
    full_depth: what full-depth decoding of the same positions costs.
    ideal: the emulation's count for the rows' exit layers (`FlopCounter.token` under
      the policy's emulated name): what a per-token engine with free skipping would pay.
    executed: what this decoder ran: the batch's depth (`layers_run`) for every row,
      `copy` key/value projections above it, the checks it ran, one final head when it
      reached layer N, and the `recompute` catch-up layers.
    mean_exit_layer: mean 1-based exit layer over rows and steps.
    mean_layers_run: mean layers the batch ran per step for its own token.
  """

  full_depth: float
  ideal: float
  executed: float
  mean_exit_layer: float
  mean_layers_run: float

  @property
  def ideal_flops_speedup(self) -> float:
    return self.full_depth / self.ideal

  @property
  def executed_flops_speedup(self) -> float:
    return self.full_depth / self.executed


def decode_cost(config: ModelConfig, result: DecodeResult, *, measure: str = "softmax",
                kv_policy: str = "copy", probe_flops: int = 0) -> DecodeCost:
  """FLOP accounting of `result` (module docstring of `exits` for the formulas);
  `probe_flops`: the probe's `flops_per_token` (measure "probe")."""
  counter = exits.FlopCounter.from_config(config)
  n = config.num_layers
  exit_BM = np.asarray(result.exit_layer, np.float64)
  t_BM = result.positions.astype(np.float64)  # Each row's own positions.
  layers = np.asarray(result.exit_layers, np.float64)
  checks_BM = (exit_BM[..., None] >= layers).sum(-1) if len(layers) else np.zeros_like(exit_BM)
  emulated = EMULATED_POLICY[kv_policy]
  ideal = counter.token(t_BM, exit_BM, checks_BM, measure=measure, kv_policy=emulated,
                        probe_flops=probe_flops).sum()
  run_M = np.asarray(result.layers_run, np.float64)
  checks_M = np.asarray(result.checks, np.float64)
  block_BM = counter.block(t_BM)
  executed_BM = (run_M + np.asarray(result.recomputed_layers)) * block_BM
  if kv_policy == "copy":
    executed_BM = executed_BM + (n - run_M) * counter.kv
  if measure in exits.LOGIT_MEASURES:
    executed_BM = executed_BM + checks_M * counter.head + (run_M == n) * counter.head
  else:
    per_check = counter.cosine if measure == "state" else probe_flops
    executed_BM = executed_BM + counter.head + checks_M * per_check
  return DecodeCost(
      full_depth=float(counter.full_depth(t_BM).sum()), ideal=float(ideal),
      executed=float(executed_BM.sum()), mean_exit_layer=float(exit_BM.mean()),
      mean_layers_run=float(run_M.mean()))


@dataclasses.dataclass(frozen=True)
class SpeculativeCost:
  """FLOPs of a self-speculative decode (`exits.FlopCounter`'s formulas), summed over rows.

  Attributes:
    full_depth: full-depth decoding of the same positions (the new tokens' P - 1 ..
      P + M - 2), one head each, as `decode_cost` counts it.
    executed: what the decoder ran for every row of the batch: each draft iteration's
      layers 1..E (with its head, except the last iteration of a full-length draft, which
      only feeds the verification), and each verification's layers E+1..N and head on
      the rows it ran (draft_len + 1, or under adaptive drafting the compiled size that
      held the cycle's longest draft). Finished rows still ride along in their batch's cycles.
    verifications: full-depth passes (the batch's cycles, times rows).
  """

  full_depth: float
  executed: float
  verifications: int

  @property
  def flops_ratio(self) -> float:
    """executed / full depth (< 1: speculation ran fewer FLOPs)."""
    return self.executed / self.full_depth


def speculative_cost(config: ModelConfig, result) -> SpeculativeCost:
  """FLOP accounting of a `SpeculativeResult` (module docstring of `exits` for formulas)."""
  counter = exits.FlopCounter.from_config(config)
  n, e, k = config.num_layers, result.draft_layer, result.draft_len
  iters_C = np.asarray(result.draft_iterations, np.int64)
  ran_C = iters_C > 0
  rows_C = np.asarray(result.verified, np.int64)[ran_C]
  b = np.asarray(result.tokens).shape[0]
  m = np.asarray(result.tokens).shape[1] - result.prompt_len
  prompt_B = np.asarray(result.prompt_lengths, np.float64)
  # Every row of the batch runs every cycle, at its own positions (a finished row at its
  # final length).
  length_CB = np.asarray(result.cycle_length, np.float64)[ran_C]
  final_B = prompt_B + m
  length_CB = np.where(length_CB > 0, length_CB, final_B[None])
  executed = 0.0
  for iters, rows, length_B in zip(iters_C[ran_C], rows_C, length_CB):
    j_J = np.arange(iters)
    draft_t = length_B[:, None] - 1 + j_J[None]
    executed += e * counter.block(draft_t).sum() + b * min(iters, k) * counter.head
    verify_t = length_B[:, None] - 1 + np.arange(rows)[None]
    executed += (n - e) * counter.block(verify_t).sum() + b * rows * counter.head
  t_BM = prompt_B[:, None] - 1 + np.arange(m, dtype=np.float64)[None]
  return SpeculativeCost(full_depth=float(counter.full_depth(t_BM).sum()),
                         executed=float(executed), verifications=int(ran_C.sum()) * b)
