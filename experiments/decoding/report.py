"""RESULTS.md, results.csv and speedup.png of the decoding benchmark (run.py); every number
from its rows."""

from __future__ import annotations

import csv
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import compare  # noqa: E402  (experiments/common.py)


def _fmt_thr(r: dict) -> str:
  return r["method"] if r["threshold"] is None else f"{r['threshold']:g}"


def _ppl_cell(r: dict) -> str:
  if r["ppl_mean"] == "":
    return "not measured"
  if r["ppl_seeds"] == 1:
    return f"{r['ppl_mean']:.3f} (1 seed)"
  return f"{r['ppl_mean']:.3f} ± {r['ppl_std']:.3f} ({r['ppl_seeds']})"


def _iqr(r: dict) -> str:
  if "call_speedup_q25" not in r:
    return ""
  return f" ({r['call_speedup_q25']:.2f}-{r['call_speedup_q75']:.2f})"


def table(rows: list[dict]) -> list[str]:
  lines = [
      "| model | batch | KV policy | batch rule | threshold | PPL, timed seed 0 | "
      "PPL mean ± std (seeds) | tokens/s per call (median) | "
      "fixed ms per call | decode tokens/s (per step) | mean exit layer | mean layers run | "
      "call speedup (IQR over rounds) | decode-step speedup | CPU-time step speedup | ideal (layers) | "
      "ideal (FLOPs) | executed FLOPs | call / ideal FLOPs | step / ideal FLOPs |",
      "|" + "---|" * 20]
  for r in rows:
    seed0 = "not measured" if r["ppl_seed0"] == "" else f"{r['ppl_seed0']:.3f}"
    lines.append(
        f"| {r['model']} | {r['batch']} | {r['kv_policy']} | {r['batch_exit']} | "
        f"{_fmt_thr(r)} | {seed0} | {_ppl_cell(r)} | {r['tokens_per_s_median']:,.0f} | "
        f"{r['fixed_ms']:.2f} | {r['decode_tokens_per_s']:,.0f} | "
        f"{r['mean_exit_layer']:.2f} | {r['mean_layers_run']:.2f} | "
        f"{r['measured_speedup']:.2f}x{_iqr(r)} | {r['step_speedup']:.2f}x | "
        f"{r['cpu_step_speedup']:.2f}x | "
        f"{r['ideal_layers_speedup']:.2f}x | {r['ideal_flops_speedup']:.2f}x | "
        f"{r['executed_flops_speedup']:.2f}x | "
        f"{100 * r['measured_speedup'] / r['ideal_flops_speedup']:.0f}% | "
        f"{100 * r['step_speedup'] / r['ideal_flops_speedup']:.0f}% |")
  return lines


def write_csv(rows: list[dict], path: str) -> None:
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)


def quality_lines(rows: list[dict], ppls: dict[str, dict[int, dict[str, float]]]) -> list[str]:
  """Batch 1, `copy`: each threshold's decode-step speedup and PPL against the static
  model's, with the 2-standard-error rule (experiments/common.compare)."""
  out = []
  for name, seeds in ppls.items():
    group = [r for r in rows if r["model"] == name and r["batch"] == 1
             and r["kv_policy"] == "copy"]
    static = next((r for r in rows if r["model"] == name and r["batch"] == 1
                   and r["method"].startswith("static")), None)
    if not seeds or static is None:
      out.append(f"- `{name}`: no finished seed yet.")
      continue
    st = {s: p["static"] for s, p in seeds.items()}
    full = {s: p["full"] for s, p in seeds.items()}
    out.append(
        f"- `{name}` ({len(seeds)} seed{'s' if len(seeds) > 1 else ''}: "
        f"{', '.join(map(str, sorted(seeds)))}): the {static['method']} decodes "
        f"{static['step_speedup']:.2f}x as fast per step as full depth (ideal "
        f"{static['ideal_flops_speedup']:.2f}x) at PPL {_ppl_cell(static)}; full depth "
        f"{_ppl_cell(next(r for r in group if r['method'] == 'full depth'))}. "
        + compare("full depth", full, static["method"], st)[2] + ".")
    for r in group:
      if r["method"] != "early exit":
        continue
      ee = {s: p[r["ppl_key"]] for s, p in seeds.items()}
      verdict = compare(f"threshold {r['threshold']:g}", ee, static["method"], st)[2]
      faster = ("faster" if r["step_speedup"] > static["step_speedup"] else "slower")
      out.append(f"  - threshold {r['threshold']:g}: {r['step_speedup']:.2f}x per step "
                 f"({faster} than the static model, timed seed 0), PPL {_ppl_cell(r)}; "
                 f"{verdict}.")
  return out


def plot(rows: list[dict], path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
  for ax, batch in zip(axes[:2], (1, 8)):
    top = 1.0
    for (model, policy, rule), marker in zip(
        sorted({(r["model"], r["kv_policy"], r["batch_exit"]) for r in rows
                if r["batch"] == batch}), "osD^v<>"):
      pts = [r for r in rows if (r["model"], r["kv_policy"], r["batch_exit"], r["batch"])
             == (model, policy, rule, batch) and r["method"] == "early exit"]
      x = [r["ideal_flops_speedup"] for r in pts]
      y = [r["step_speedup"] for r in pts]
      y_call = [r["measured_speedup"] for r in pts]
      top = max([top, *x, *y, *y_call])
      (line,) = ax.plot(x, y, marker=marker, linestyle="-",
                        label=f"{model} {policy} ({rule}): decode step")
      ax.plot(x, y_call, marker=marker, linestyle=":", color=line.get_color(),
              markerfacecolor="none", label=f"{model} {policy} ({rule}): whole call")
    for r in rows:
      if r["batch"] == batch and r["method"].startswith("static"):
        top = max(top, r["ideal_flops_speedup"], r["step_speedup"])
        ax.plot([r["ideal_flops_speedup"]], [r["step_speedup"]], marker="*", markersize=13,
                linestyle="none", color="k" if r["model"] == "deep" else "0.5",
                label=f"{r['model']}: {r['method']} (decode step)")
    ax.plot([0, top * 1.05], [0, top * 1.05], "k--", lw=0.8, label="measured = ideal")
    ax.plot([0, top * 1.05], [0, 0.8 * top * 1.05], "k:", lw=0.8, label="80% of ideal")
    ax.set_xlim(0.8, top * 1.05)
    ax.set_ylim(0.4, top * 1.05)
    ax.set_xlabel("ideal speedup (full-depth FLOPs / early-exit FLOPs)")
    ax.set_ylabel("measured speedup vs full depth")
    ax.set_title(f"batch {batch}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=5.5, loc="upper left")
  ax = axes[2]
  for model, color in zip(sorted({r["model"] for r in rows}), ("C0", "C3")):
    group = [r for r in rows if r["model"] == model and r["batch"] == 1
             and r["kv_policy"] == "copy" and r["ppl_mean"] != ""]
    full = next((r["ppl_mean"] for r in group if r["method"] == "full depth"), None)
    if full is None:
      continue

    def rel(x, full=full):
      return 100 * (x / full - 1)
    pts = sorted((r for r in group if not r["method"].startswith("static")),
                 key=lambda r: r["step_speedup"])
    n = max((r["ppl_seeds"] for r in pts), default=0)
    ax.errorbar([r["step_speedup"] for r in pts], [rel(r["ppl_mean"]) for r in pts],
                yerr=[100 * (r["ppl_std"] or 0.0) / full for r in pts], marker="o",
                color=color, capsize=3,
                label=f"{model}: full depth + early exit (copy), ±1 std, {n} seeds")
    for r in group:
      if r["method"].startswith("static"):
        ax.errorbar([r["step_speedup"]], [rel(r["ppl_mean"])],
                    yerr=[100 * (r["ppl_std"] or 0.0) / full], marker="*", markersize=13,
                    color=color, capsize=3, linestyle="none",
                    label=f"{model}: {r['method']}, {r['ppl_seeds']} seeds")
  ax.axhline(0, color="k", lw=0.8)
  ax.set_xlabel("measured decode-step speedup vs full depth (batch 1, seed 0)")
  ax.set_ylabel("val PPL vs own full depth (%, seed mean)")
  ax.set_title("speed vs quality, batch 1, copy")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=6)
  fig.suptitle("Early-exit decoding: measured vs ideal speedup (softmax thresholds), and "
               "what it costs in PPL next to a static shallow model")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _breakdown_lines(breakdowns: dict) -> list[str]:
  lines = ["| model | full depth | first k layers alone (truncated model) | "
           "checks, nobody exits | copy, all exit at k | recompute, all exit at k |",
           "|" + "---|" * 6]
  for name, b in breakdowns.items():
    us, k, n = b["cpu_us_per_step"], b["first_exit_layer"], b["num_layers"]
    lines.append(f"| {name} (k={k} of {n}) | {us['full']:.1f} | {us['truncated']:.1f} | "
                 f"{us['checks_never_exit']:.1f} | {us['copy_all_exit']:.1f} | "
                 f"{us['recompute_all_exit']:.1f} |")
  return lines


def _breakdown_text(breakdowns: dict, rows: list[dict]) -> list[str]:
  """The breakdown in words; every figure derived from the measured table above."""
  out = []
  for name, b in breakdowns.items():
    us, k, n = b["cpu_us_per_step"], b["first_exit_layer"], b["num_layers"]
    all_exit = next((r for r in rows if r["model"] == name and r["batch"] == 1
                     and r["kv_policy"] == "copy" and r["threshold"] == 0.0), None)
    text = (f"- `{name}`: a layer costs about {(us['full'] - us['truncated']) / (n - k):.1f} "
            f"µs per step ((full - truncated) / {n - k} layers); everything in a step that "
            f"is not a layer (embedding, final head, sampling, loop, recording) about "
            f"{us['truncated'] - k * (us['full'] - us['truncated']) / (n - k):.1f} µs. "
            f"The exit checks cost {us['checks_never_exit'] - us['full']:+.1f} µs per step "
            f"when nobody exits ({100 * (us['checks_never_exit'] / us['full'] - 1):+.0f}% of "
            f"a full-depth step). Exiting everyone at layer {k} costs "
            f"{us['copy_all_exit'] - us['truncated']:+.1f} µs over the truncated model "
            f"(check + cond + copied keys/values for {n - k} layers + writing {n} cache rows "
            f"instead of {k}).")
    if all_exit is not None:
      text += (f" So at threshold 0 the truncated model itself reaches "
               f"{us['full'] / us['truncated']:.2f}x of the {all_exit['ideal_flops_speedup']:.2f}x "
               f"FLOPs ideal per step, and copy-exit reaches {us['full'] / us['copy_all_exit']:.2f}x "
               f"(CPU time). A call also costs {b['fixed_ms']['full']:.2f} ms besides its "
               f"steps at full depth and {b['fixed_ms']['copy_all_exit']:.2f} ms with exits "
               "(wall-clock; checks, graph split, dispatch, prompt prefill).")
    out.append(text)
  return out


def write_results(here: str, rows: list[dict], breakdowns: dict, meta: dict,
                  ppls: dict[str, dict[int, dict[str, float]]]) -> None:
  plot(rows, os.path.join(here, "speedup.png"))
  write_csv(rows, os.path.join(here, "results.csv"))
  b1 = [r for r in rows if r["batch"] == 1 and r["method"] == "early exit"]

  def met(key: str, policy: str) -> str:
    # A row whose ideal is at most 1.0x has nothing to meet: it does not count.
    group = [r for r in b1 if r["kv_policy"] == policy and r["ideal_flops_speedup"] > 1.0]
    ok = [r for r in group if r[key] >= 0.8 * r["ideal_flops_speedup"]]
    return f"{len(ok)} of {len(group)}"
  skipped = sum(r["ideal_flops_speedup"] <= 1.0 for r in b1)
  models = meta["models"]
  seed_counts = {name: sorted(p) for name, p in ppls.items()}
  lines = [
      "# Real early-exit decoding: measured vs ideal speedup, and what it costs in PPL", "",
      "Regenerate everything here (models if missing, timing, PPLs, table, plot, "
      "results.csv, results.json) with the first command; the second rebuilds the report "
      "from the committed results.json timing and whatever seeds have finished, timing "
      "nothing:", "",
      "```bash", "DEEPEXIT_DATA_DIR=../shared/data python experiments/decoding/run.py",
      "DEEPEXIT_DATA_DIR=../shared/data python experiments/decoding/run.py --report_only",
      "```", "",
      f"Timing run: {meta.get('date', 'date not recorded')}, "
      + (f"{meta['timing_wall_seconds'] / 60:.0f} minutes" if "timing_wall_seconds" in meta
         else "wall time not recorded") + "; every row is in results.csv and results.json.",
      "",
      "## Setup", "",
      *[f"- `{name}`: {m['model']['num_layers']} layers, dim {m['model']['dim']}, "
        f"{m['model']['num_heads']} heads, FFN {m['model']['ffn_dim']}, vocab "
        f"{m['model']['vocab_size']}, exit layers {m['exit_layers']}, checkpoint step "
        f"{m['step']}; static baseline: {m.get('static_layers', '?')} layers trained alone "
        f"with a final-layer loss, same data, budget and recipe (checkpoint step "
        f"{m.get('static_step', '?')}). PPL seeds finished: "
        f"{', '.join(map(str, seed_counts.get(name, []))) or 'none'}."
        for name, m in models.items()],
      "- Recipes: experiments/configs/reference.py (AdamW, peak lr 3e-3, 50 warm-up "
      "steps, cosine to 0.1x, b1 0.9 / b2 0.98, weight decay 0.01 on weight matrices only, "
      "clip 1.0, seq 128, batch 32, char-level WikiText-2, first 500,000 training "
      "characters, 10 epochs, loss weights {2: 0.7, 4: 0.3}), static.py (the same cut to 2 "
      "layers, final-layer loss), deep.py (8 layers, dim 64, uniform loss weights, 3 "
      "epochs), deep_static.py (deep.py cut to 2 layers, final-layer loss). The seed "
      "drives initialisation, data order and dropout.",
      "- PPL: teacher-forced validation PPL over the whole validation text (each "
      "character once), `deepexit_jax.sweep.run_sweep`: `copy` rows are the `copy` "
      "emulation and `recompute` rows the `oracle` one, which the incremental decoder "
      "reproduces position by position (tests/test_decoding.py, row rule). Batch-8 `sync` "
      "rows are `not measured`: their exits depend on which rows share the batch. "
      "`PPL, timed seed 0` is the model timed here; `mean ± std` is over every finished "
      "training seed (the timing is seed 0's; a seed changes exit rates, so speeds of "
      "other seeds would differ somewhat).",
      f"- Decoding: `deepexit_jax.decoding.generate`, greedy, softmax confidence, "
      f"prompts of {meta['prompt_len']} validation characters, then enough steps to fill "
      "the KV cache (max_len); every configuration is one jitted call.",
      "- Batch 1 uses the `sync` rule (identical to `row` for one row). Batch 8: `copy` "
      "under both `sync` (CALM: the batch exits when every row is confident) and `row` "
      "(each row takes its own exit; the batch runs while any row needs deeper layers); "
      "`recompute` under `row`.",
      "- Full depth = the same decoder with no exit layer (same cache, loop, sampling; "
      "no conds). Speedup = median full-depth time / median early-exit time, timed "
      f"interleaved in the same process ({meta['rounds']} rounds). Each configuration "
      "is timed at two lengths, the whole decode and one step: the call speedup compares "
      "whole calls (prompt prefill + M steps); the decode-step speedup compares one "
      "step, (T(M steps) - T(1 step)) / (M - 1), the quantity the FLOPs ideal describes. "
      "`fixed ms per call` is what a call costs besides its steps (argument checks, "
      "graph split, dispatch, full-depth prefill of the prompt), the same work for both "
      "decoders.",
      "- Ideal (layers) = N / mean exit layer (`layers_fraction`); ideal (FLOPs) = "
      "full-depth FLOPs / the emulation's FLOPs for the same exit layers "
      "(`flops_fraction`: copy counts the key/value projections of skipped layers; the "
      "`recompute` ideal is the oracle's count, which leaves out the catch-up); executed "
      "FLOPs = full / what the decoder ran (the batch's depth for every row, catch-up "
      "included).",
      f"- Host: {meta['backend']} ({meta['device']}, {meta['cpu_count']} cores, "
      f"{meta['machine']}), JAX {meta['jax']}. CPU only: no accelerator was available to "
      "this run.", "",
      "## Results", "",
      *table(rows), "",
      "![measured vs ideal speedup](speedup.png)", "",
      "Target (measured >= 80% of the FLOPs ideal at batch 1), wall-clock: per decode "
      f"step, met by {met('step_speedup', 'copy')} `copy` rows and "
      f"{met('step_speedup', 'recompute')} `recompute` rows; per whole call, by "
      f"{met('measured_speedup', 'copy')} `copy` and {met('measured_speedup', 'recompute')} "
      "`recompute` rows. CPU time per decode step: "
      f"{met('cpu_step_speedup', 'copy')} `copy`, {met('cpu_step_speedup', 'recompute')} "
      "`recompute`. Whole calls fall short where the steps are cheap relative to the "
      "fixed cost of a call (the reference model: see `fixed ms per call`); `recompute` "
      "falls short because its ideal leaves out the catch-up it must run (see below). "
      f"Rows whose FLOPs ideal is at most 1.0x ({skipped} at batch 1: nobody exits, or the "
      "exit checks cost more than they save) do not count as meeting it and are left out "
      "of these counts.", "",
      "## Speed vs quality against the static shallow model (batch 1, `copy`)", "",
      "A claim that one model beats another is made only where the PPL gap exceeds twice "
      "its standard error over training seeds (experiments/common.compare); speeds are "
      "seed 0's, timed interleaved in one process.", "",
      *quality_lines(rows, ppls), "",
      "## Where the time goes (batch 1, process CPU microseconds per decode step, median, "
      "per-call costs left out)",
      "",
      *_breakdown_lines(breakdowns), "",
      *_breakdown_text(breakdowns, rows), "",
      "`truncated` is the model cut to its first exit layer k, decoded at full depth by "
      "the same code: the floor an exit at k can reach. `checks, nobody exits` minus "
      "`full depth` is the cost of the exit checks (exit head, softmax confidence, "
      "`lax.cond`). `copy, all exit at k` minus `truncated` is what exiting costs on top "
      "of running k layers: the check, one `lax.cond`, the batched key/value projection "
      "of the copied state for the N - k skipped layers, and writing every layer's "
      "cache row. Under `recompute` every exit leaves a pending position, so a full "
      "queue forces a catch-up to layer N (all exit at k = the worst case).", "",
  ]
  spread = max(
      max(r["tokens_per_s_median"] for r in group) / min(r["tokens_per_s_median"]
                                                         for r in group)
      for group in ([r for r in rows if r["method"] == "full depth" and r["model"] == m
                     and r["batch"] == b] for m in models for b in (1, 8)) if group)
  load = meta.get("load_average")
  load_end = meta.get("load_average_end")
  unresolved = [r for r in rows if r["method"] != "full depth" and "call_speedup_q25" in r
                and r["call_speedup_q25"] <= 1.0 <= r["call_speedup_q75"]]
  lines += [
      "## Reading these numbers", "",
      "- Wall-clock figures depend on what else the host runs"
      + (f" (1-minute load average {load[0]:.1f} at the start of this run"
         + (f", {load_end[0]:.1f} at the end" if load_end else "") + f", on {meta['cpu_count']} "
         "cores)" if load else "")
      + f": the same full-depth decode timed in different groups of this run differs by "
      f"up to {spread:.2f}x, so single rows are noisy even with interleaving; quote them "
      "from a run on a quiet machine. The call speedup's interquartile range over rounds "
      "(full depth and the row timed back to back in each round) is its noise: "
      f"{len(unresolved)} rows have 1.0x inside it, i.e. no speed difference from full "
      "depth was resolved for them in this run.",
      "- `recompute` does not save FLOPs in decoding: its executed-FLOPs column stays "
      "near 1x because almost every pending position is caught up by a later token that "
      "goes deeper. It is also slower per step than `copy` here: a catch-up runs "
      "1 + max_pending query rows (empty slots included) through each layer it needs. "
      "Its FLOPs ideal is the emulation's `oracle` count, reachable only if pending "
      "positions were never needed again.",
      "- Batch 8 under `sync` exits only when all 8 rows are confident, so its mean exit "
      "layer stays near N except at low thresholds; `row` takes each row's own exit "
      "(the quality of `copy` row by row) but the batch still runs to its deepest row, "
      "so its executed-FLOPs speedup sits below its ideal.", "",
  ]
  notes = os.path.join(here, "NOTES.md")
  if os.path.exists(notes):
    lines += [open(notes).read()]
  with open(os.path.join(here, "RESULTS.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
