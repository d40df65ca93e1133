"""Self-speculative decoding vs full-depth greedy decoding: wall time, same prompts and tokens.

Greedy. Both decoders are compiled and warmed first; then every round times the
full-depth `generate` (the same decoder the early-exit benchmark uses, no exit layer)
and each speculative setting once, in turn (interleaved, so a drifting host slows all
alike); figures are medians over rounds. `identical` says whether the two decoders'
tokens are equal (they must be: speculation is lossless).

Run from the repository root:
  python experiments/bench/speculative.py --checkpoint=runs/decoding/deep
  python experiments/bench/speculative.py --checkpoint=DIR --draft_layer=2 --draft_len=4
Without --draft_layer/--draft_len it times a small grid and reports the fastest setting
(saying which). Prints one line per setting, then one JSON object as its last line.
"""

from __future__ import annotations

import json
import os
import statistics
import sys

import jax
import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import interleaved  # noqa: E402  (experiments/common.py)

from deepexit_jax import checkpoint, decoding

_CKPT = flags.DEFINE_string("checkpoint", None, "A deepexit-train workdir.", required=True)
_BATCH = flags.DEFINE_integer("batch", 1, "Prompts decoded at once.")
_LAYER = flags.DEFINE_integer("draft_layer", None, "E (default: a grid).")
_LEN = flags.DEFINE_integer("draft_len", None, "k (default: a grid).")
_THR = flags.DEFINE_float("draft_threshold", None, "Adaptive drafting threshold (softmax).")
_NEW = flags.DEFINE_integer("new_tokens", 96, "New tokens per row.")
_PROMPT = flags.DEFINE_integer("prompt_len", 16, "Prompt characters.")
_ROUNDS = flags.DEFINE_integer("rounds", 7, "Interleaved timing rounds.")
_BREAKDOWN = flags.DEFINE_bool("breakdown", True, "Also estimate where the time goes.")


def grid(num_layers: int) -> list[tuple[int, int]]:
  layers = sorted({max(1, num_layers // 4), max(1, num_layers // 2)} - {num_layers})
  return [(e, k) for e in layers for k in (2, 4, 6)]


def breakdown(model, prompt_BP, m: int, e: int, k: int, rounds: int) -> dict:
  """Where a speculative decode's time goes, from interleaved whole-call timings.

  A call costs T = T0 + C c_verify + I c_draft (T0: prefill and per-call cost; C cycles,
  I draft iterations; c_verify includes the cycle's acceptance and bookkeeping). Three
  calls determine the unknowns: the setting itself, the same with drafting off
  (draft_threshold = inf: M cycles of one iteration; its verification kept at k + 1
  rows, `verify_sizes=(k + 1,)`) at M and at 1 new token. The full-depth decoder's
  step is (T(M) - T(1)) / (M - 1).
  """
  n = model.config.num_layers
  spec = decoding.speculative_generate
  runs = {
      "spec": lambda: spec(model, prompt_BP, m, draft_layer=e, draft_len=k),
      "nodraft": lambda: spec(model, prompt_BP, m, draft_layer=e, draft_len=k,
                              draft_threshold=np.inf, verify_sizes=(k + 1,)),
      "nodraft_1": lambda: spec(model, prompt_BP, 1, draft_layer=e, draft_len=k,
                                draft_threshold=np.inf, verify_sizes=(k + 1,)),
      "full": lambda: decoding.generate(model, prompt_BP, m, np.inf, exit_layers=(n,)),
      "full_1": lambda: decoding.generate(model, prompt_BP, 1, np.inf, exit_layers=(n,)),
  }
  sec = {key: statistics.median(t) for key, t in interleaved(runs, rounds)[1].items()}
  res = runs["spec"]()
  cycles, iters = res.num_cycles, int(np.asarray(res.draft_iterations).sum())
  per_cycle = (sec["nodraft"] - sec["nodraft_1"]) / (m - 1)  # c_verify + c_draft
  fixed = sec["nodraft_1"] - per_cycle
  draft = (sec["spec"] - fixed - cycles * per_cycle) / max(iters - cycles, 1)
  verify = per_cycle - draft
  step = (sec["full"] - sec["full_1"]) / (m - 1)
  us = 1e6
  return {"cycles": cycles, "draft_iterations": iters, "fixed_ms": 1e3 * fixed,
          "draft_iteration_us": us * draft, "verify_cycle_us": us * verify,
          "full_depth_step_us": us * step,
          "share_draft": iters * draft / (sec["spec"] - fixed),
          "share_verify": cycles * verify / (sec["spec"] - fixed),
          "draft_vs_full_step_layers_ideal": e / n,
          "draft_vs_full_step": draft / step, "verify_vs_full_step": verify / step}


def main(argv):
  del argv
  ckpt = checkpoint.load_checkpoint(_CKPT.value)
  model = ckpt.model
  n = model.config.num_layers
  prompt_BP = decoding.validation_prompts(ckpt, _BATCH.value, _PROMPT.value)
  m = _NEW.value
  if (_LAYER.value is None) != (_LEN.value is None):
    raise app.UsageError("give both --draft_layer and --draft_len, or neither (a grid)")
  settings = grid(n) if _LAYER.value is None else [(_LAYER.value, _LEN.value)]
  runs = {"full": lambda: decoding.generate(model, prompt_BP, m, np.inf, exit_layers=(n,))}
  for e, k in settings:
    runs[(e, k)] = (lambda e=e, k=k: decoding.speculative_generate(
        model, prompt_BP, m, draft_layer=e, draft_len=k, draft_threshold=_THR.value))
    if _THR.value is not None:  # A/B: the same drafts, verification always k + 1 rows.
      runs[(e, k, "static")] = (lambda e=e, k=k: decoding.speculative_generate(
          model, prompt_BP, m, draft_layer=e, draft_len=k, draft_threshold=_THR.value,
          verify_sizes=(k + 1,)))
  results, times = interleaved(runs, _ROUNDS.value)
  base_s = statistics.median(times["full"])
  full_tokens = np.asarray(results["full"].tokens)
  rows = []
  for e, k in settings:
    res = results[(e, k)]
    sec = statistics.median(times[(e, k)])
    cost = decoding.speculative_cost(model.config, res)
    row = {"draft_layer": e, "draft_len": k, "draft_threshold": _THR.value,
           "speedup": base_s / sec, "tokens_per_s": prompt_BP.shape[0] * m / sec,
           "baseline_tokens_per_s": prompt_BP.shape[0] * m / base_s,
           "acceptance_rate": res.acceptance_rate, "tokens_per_cycle": res.tokens_per_cycle,
           "identical": bool(np.array_equal(np.asarray(res.tokens), full_tokens)),
           "flops_ratio": cost.flops_ratio, "seconds": sec, "baseline_seconds": base_s,
           "min_seconds": min(times[(e, k)]), "baseline_min_seconds": min(times["full"])}
    if _THR.value is not None:  # Sized vs static verification of the same drafts.
      static_s = statistics.median(times[(e, k, "static")])
      row["static_verify_speedup"] = base_s / static_s
      row["mean_verified_rows"] = float(np.asarray(res.verified)[
          np.asarray(res.draft_iterations) > 0].mean())
      print(f"E={e} k={k} threshold {_THR.value}: verification sized to the draft "
            f"(mean {row['mean_verified_rows']:.2f} of {k + 1} rows) {row['speedup']:.2f}x vs "
            f"always {k + 1} rows {row['static_verify_speedup']:.2f}x")
    rows.append(row)
    print(f"E={e} k={k}: {row['speedup']:.2f}x ({row['tokens_per_s']:,.0f} vs "
          f"{row['baseline_tokens_per_s']:,.0f} tokens/s), acceptance "
          f"{row['acceptance_rate']:.2f}, {row['tokens_per_cycle']:.2f} tokens/cycle, FLOPs "
          f"{row['flops_ratio']:.2f}x, identical={row['identical']}")
  best = max(rows, key=lambda r: r["speedup"])
  out = dict(best, checkpoint=_CKPT.value, batch=_BATCH.value, new_tokens=m,
             prompt_len=_PROMPT.value, rounds=_ROUNDS.value, backend=jax.default_backend(),
             chosen_from_grid=len(settings) > 1, grid=rows if len(settings) > 1 else None)
  if len(settings) > 1:
    print(f"best of the grid: draft_layer={best['draft_layer']} draft_len={best['draft_len']}")
  if _BREAKDOWN.value:
    out["breakdown"] = bd = breakdown(model, prompt_BP, m, best["draft_layer"],
                                      best["draft_len"], _ROUNDS.value)
    print(f"where the time goes (E={best['draft_layer']} k={best['draft_len']}): per call "
          f"{bd['fixed_ms']:.2f} ms fixed; {bd['draft_iterations']} draft iterations x "
          f"{bd['draft_iteration_us']:.0f} us ({100 * bd['share_draft']:.0f}%), "
          f"{bd['cycles']} verifications x {bd['verify_cycle_us']:.0f} us "
          f"({100 * bd['share_verify']:.0f}%); a full-depth step {bd['full_depth_step_us']:.0f} "
          f"us (a draft iteration = {bd['draft_vs_full_step']:.2f} of it, layers alone "
          f"{bd['draft_vs_full_step_layers_ideal']:.2f}; a verification "
          f"{bd['verify_vs_full_step']:.2f})")
  print(json.dumps(out))


if __name__ == "__main__":
  app.run(main)
