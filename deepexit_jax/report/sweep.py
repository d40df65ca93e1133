"""The threshold sweep's reports: Markdown, CSV, JSON and PNG writers (`report.write_report`)."""

from __future__ import annotations

import csv
import dataclasses
import math
import os
from collections.abc import Sequence
from typing import Any

from deepexit_jax import checkpoint
from deepexit_jax.sweep import SweepReport, SweepRow, pareto_front

_RECOMMENDATION_NAMES = {
    "best_quality_at_lowest_compute": "Best quality at lowest compute",
    "max_efficiency": "Maximum efficiency",
    "full_depth": "Full depth",
}


def _pct(x: float, signed: bool = False) -> str:
  return f"{100 * x:+.2f}%" if signed else f"{100 * x:.1f}%"


def _threshold_text(r: SweepRow) -> str:
  if r.threshold is None:
    return r.label
  return "never (inf)" if math.isinf(r.threshold) else f"{r.threshold:g}"


def markdown(report: SweepReport, calibrated: Any = None) -> str:
  """The sweep as Markdown tables: one per KV policy, then baselines and recommendations.

  Args:
    report: the sweep.
    calibrated: an optional `calibration.CalibrationReport`, added as a "Calibrated
      setting" section.
  """
  exits = [k for k in report.exit_layers if k < report.num_layers]
  several = len(exits) > 1
  head = ["Threshold", "PPL", "Shallow Exit %", "Compute % (layers)", "FLOPs %",
          "PPL change"] + ([f"exit@{k}" for k in exits] if several else [])
  lines = [
      f"Sweep of {report.metadata['checkpoint']} (step {report.metadata['step']}, "
      f"params {report.metadata['params_sha256']}) on {report.num_tokens:,} validation "
      f"tokens; measure `{report.measure}`, exit layers {list(exits)} of "
      f"{report.num_layers}, routing `{report.metadata.get('routing', 'token')}`"
      + (f" (quantile {report.metadata['seq_quantile']})"
         if report.metadata.get("routing") == "sequence" else "")
      + (f", threshold decay {report.metadata['threshold_decay']}"
         if report.metadata.get("threshold_decay") else "")
      + ". Compute % = mean layers run / N; FLOPs % = total FLOPs / "
      "full-depth FLOPs, exit-head checks included; PPL change vs full depth.", ""]

  def table(rows: Sequence[SweepRow]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
      cells = [_threshold_text(r), f"{r.ppl:.3f}", _pct(r.shallow_exit),
               _pct(r.layers_fraction), _pct(r.flops_fraction), _pct(r.ppl_change, True)]
      if several:
        cells += [_pct(f) for f in r.exit_fractions] if r.exit_fractions else [""] * len(exits)
      out.append("| " + " | ".join(cells) + " |")
    return out

  for policy in report.metadata["kv_policies"]:
    rows = [r for r in report.rows if r.kind == "threshold" and r.kv_policy == policy]
    note = ("deeper layers see full-depth states of exited tokens; FLOPs are saved only if "
            "those states are never needed" if policy == "oracle" else
            "exited states are copied upward; skipped layers still project their keys/values")
    lines += [f"### KV policy `{policy}` ({note})", ""] + table(rows) + [""]
  others = [r for r in report.rows if r.kind != "threshold"]
  lines += ["### Baselines", ""] + table(others) + [""]
  lines += ["### Recommended settings (FLOPs; best quality = lowest FLOPs within "
            f"+{100 * report.metadata['tolerance']:.1f}% PPL)", "",
            "Fitted to the reported text: the same validation text chooses these settings "
            "and scores them, so they carry no promise for new text (a calibrated threshold "
            "does: `--calibrate`).", ""]
  for key, name in _RECOMMENDATION_NAMES.items():
    r = report.recommendations.get(key)
    if r is None:
      lines.append(f"- {name}: none within tolerance")
      continue
    policy = f", {r.kv_policy}" if r.kv_policy else ""
    lines.append(f"- {name}: threshold {_threshold_text(r)}{policy}: PPL {r.ppl:.3f} "
                 f"({_pct(r.ppl_change, True)}), {_pct(r.layers_fraction)} layers, "
                 f"{_pct(r.flops_fraction)} FLOPs")
  if calibrated is not None:
    lines += [""] + calibration_markdown(calibrated)
  return "\n".join(lines) + "\n"


def _thr(x: Any) -> str:
  return "never (inf)" if x == "inf" else f"{x:g}"


def calibration_markdown(calibrated: Any) -> list[str]:
  """The "Calibrated setting" section from a `calibration.CalibrationReport`."""
  f = calibrated.fields
  cons = ("share of tokens whose top-1 differs from full depth" if f["consistency"] ==
          "textual" else f"NLL increase over full depth / {f['risk_scale_nats']:.3g} nats, "
          "clipped to [0, 1]")
  unit = "window" if f["unit"] == "sequence" else "token"
  cover, raw, unc = f["coverage_detail"], f["empirical_rule_coverage"], f["uncalibrated"]
  p = "" if f["p_value"] is None else f", p = {f['p_value']:.3g}"
  return [
      f"### Calibrated setting (Learn-then-Test, {f['bound']}, delta {f['delta']:g}, "
      f"epsilon {f['epsilon']:g})", "",
      f"Risk: {cons}, one example per {unit}; KV policy `{f['settings']['kv_policy']}`. "
      f"Calibrated on {f['calibration_windows']} windows ({f['calibration_tokens']:,} "
      f"tokens), reported on the other {f['test_windows']} ({f['test_tokens']:,} tokens), "
      f"split seed {cover['seed']}.", "",
      f"- Calibrated threshold {_thr(f['threshold'])}{p}, calibration risk "
      f"{f['calibration_risk']:.4f}. On the test part: risk {f['test_risk']:.4f} "
      f"(delta {f['delta']:g}), PPL {f['ppl']:.3f} ({_pct(f['ppl_change'], True)}), "
      f"{_pct(f['layers_fraction'])} layers, {_pct(f['flops_fraction'])} FLOPs.",
      f"- Coverage: test risk <= delta in {_pct(f['coverage'])} of {cover['splits']} random "
      f"calibration/test splits (promised: >= {_pct(1 - f['epsilon'])} for the expected "
      f"risk); mean test risk {cover['mean_test_risk']:.4f}, mean FLOPs "
      f"{_pct(cover['mean_flops_fraction'])}. Splits: {cover['how']}.",
      f"- Without the bound (lowest threshold whose calibration risk <= delta): coverage "
      f"{_pct(raw['coverage'])}, mean test risk {raw['mean_test_risk']:.4f}.",
      f"- Uncalibrated recommendation ({unc['rule']}): threshold {_thr(unc['threshold'])}, "
      f"test risk {unc['test_risk']:.4f}, {_pct(unc['flops_fraction'])} FLOPs, coverage "
      f"{_pct(unc['coverage'])}.",
  ]


def write_csv(report: SweepReport, path: str) -> None:
  fields = [f.name for f in dataclasses.fields(SweepRow)]
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=fields)
    writer.writeheader()
    for r in report.rows:
      row = dataclasses.asdict(r)
      row["exit_fractions"] = ";".join(f"{x:.6f}" for x in r.exit_fractions)
      writer.writerow(row)


def to_json(report: SweepReport) -> dict:
  def clean(r: SweepRow) -> dict:
    d = dataclasses.asdict(r)
    if d["threshold"] is not None and math.isinf(d["threshold"]):
      d["threshold"] = "inf"
    return d

  return {
      "rows": [clean(r) for r in report.rows],
      "recommendations": {k: clean(r) for k, r in report.recommendations.items()},
      "exit_layers": list(report.exit_layers), "measure": report.measure,
      "num_layers": report.num_layers, "num_tokens": report.num_tokens,
      "metadata": report.metadata,
  }


def plot(report: SweepReport, path: str,
         overlay: Sequence[tuple[str, float, float]] = ()) -> None:
  """PPL versus compute (layers and FLOPs), Pareto fronts marked, baselines shown.

  Args:
    report: the sweep.
    path: PNG file to write.
    overlay: optional extra points (label, layers fraction, PPL), e.g. a
      published reference table, drawn on the layers panel.
  """
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
  for ax, key, name in ((axes[0], "layers_fraction", "layers run / N"),
                        (axes[1], "flops_fraction", "FLOPs / full-depth FLOPs")):
    for policy, color in (("oracle", "tab:blue"), ("copy", "tab:orange")):
      rows = sorted((r for r in report.rows if r.kind == "threshold" and r.kv_policy == policy
                     and math.isfinite(r.threshold)), key=lambda r: getattr(r, key))
      if not rows:
        continue
      xs = [100 * getattr(r, key) for r in rows]
      ax.plot(xs, [r.ppl for r in rows], "o-", color=color, alpha=0.6,
              label=f"early exit, KV {policy}")
      front = pareto_front(rows, key)
      ax.plot([100 * getattr(r, key) for r in front], [r.ppl for r in front], "o",
              mfc="none", mec="black", ms=11, label=f"Pareto front ({policy})")
    for r in report.rows:
      if r.kind == "threshold":
        continue
      marker = {"full": "*", "oracle": "D", "static": "s"}[r.kind]
      ax.plot(100 * getattr(r, key), r.ppl, marker, ms=10, label=r.label)
    if key == "layers_fraction" and overlay:
      # Its own axis: another run's PPL level would flatten this run's curve.
      twin = ax.twinx()
      twin.plot([100 * x for _, x, _ in overlay], [p for _, _, p in overlay], "x--",
                color="gray", label="overlay (right axis)")
      twin.set_ylabel("overlay PPL (right axis)", color="gray")
      twin.tick_params(axis="y", colors="gray")
      ax.plot([], [], "x--", color="gray", label="overlay (right axis)")
    ax.set_xlabel(f"compute: {name} (%)")
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("validation PPL")
  handles, labels = axes[0].get_legend_handles_labels()
  axes[1].legend(handles, labels, fontsize=7, loc="upper right")
  fig.suptitle(f"Early exit ({report.measure} confidence) vs static depth")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_measures(reports: dict[str, SweepReport], path: str, title: str = "") -> None:
  """PPL versus FLOPs of several sweeps of one model (e.g. softmax vs a probe), one chart.

  Args:
    reports: sweeps by curve name; each KV policy gets its own curve, and the first
      report's full-depth and oracle-bound rows are marked.
    path: PNG file to write.
    title: figure title.
  """
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(8, 5))
  for name, rep in reports.items():
    for policy, style in (("oracle", "o-"), ("copy", "s--")):
      rows = sorted((r for r in rep.rows if r.kind == "threshold" and r.kv_policy == policy
                     and math.isfinite(r.threshold)), key=lambda r: r.flops_fraction)
      if rows:
        ax.plot([100 * r.flops_fraction for r in rows], [r.ppl for r in rows], style, ms=4,
                alpha=0.8, label=f"{name}, KV {policy}")
  first = next(iter(reports.values()))
  for r in first.rows:
    if r.kind in ("full", "oracle", "static"):
      marker = {"full": "*", "oracle": "D", "static": "s"}[r.kind]
      ax.plot(100 * r.flops_fraction, r.ppl, marker, color="black", ms=10, mfc="none",
              label=r.label)
  ax.set_xlabel("compute: FLOPs / full-depth FLOPs (%), exit checks included")
  ax.set_ylabel("validation PPL")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  ax.set_title(title or "Early exit: PPL vs FLOPs by confidence measure")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write_results(out_dir: str, lines: Sequence[str]) -> str:
  """Writes out_dir/RESULTS.md from generated `lines`, then the hand-written NOTES.md there.

  The reproduction scripts in experiments/ all end this way, so their numbers are
  regenerated while their interpretation stays in one reviewed file.
  """
  notes = os.path.join(out_dir, "NOTES.md")
  text = "\n".join(lines) + "\n"
  if os.path.exists(notes):
    with open(notes) as f:
      text = "\n".join([*lines, "", f.read()]) + "\n"
  path = os.path.join(out_dir, "RESULTS.md")
  with open(path, "w") as f:
    f.write(text)
  return path


def write_report(report: SweepReport, out_dir: str,
                 overlay: Sequence[tuple[str, float, float]] = (),
                 calibrated: Any = None) -> dict[str, str]:
  """Writes sweep.md, sweep.csv, sweep.json and sweep.png (and calibration.json) to `out_dir`."""
  checkpoint.ensure_writable(out_dir)
  paths = {ext: os.path.join(out_dir, f"sweep.{ext}") for ext in ("md", "csv", "json", "png")}
  if calibrated is not None:
    paths["calibration"] = os.path.join(out_dir, "calibration.json")
    checkpoint.write_json(paths["calibration"], calibrated.to_json())
  with open(paths["md"], "w") as f:
    f.write(markdown(report, calibrated))
  write_csv(report, paths["csv"])
  checkpoint.write_json(paths["json"], to_json(report))
  plot(report, paths["png"], overlay)
  return paths
