"""The probe study's reports: probe.md, probe.csv (per-transition rows), probe.json, probe.png."""

from __future__ import annotations

import csv
import math
import os
from typing import Any

from deepexit_jax import checkpoint

# A `deepexit_jax.probes.ProbeStudy`; not imported, so the reports sit below the probes
# (which write them) without an import circle.
ProbeStudy = Any



def _f(x: float, digits: int = 1, pct: bool = True) -> str:
  if x is None or (isinstance(x, float) and math.isnan(x)):
    return "n/a"
  return f"{100 * x:.{digits}f}" if pct else f"{x:.{digits}f}"


def markdown(study: ProbeStudy) -> str:
  """The study as Markdown: analyses, per-transition F1 tables, summaries, FLOPs."""
  meta, an = study.metadata, study.analyses
  lines = [
      f"Probe study of {meta.get('checkpoint')} (step {meta.get('step')}) on "
      f"{meta['num_tokens']:,} tokens of {meta.get('text', 'the validation text')}: the "
      f"first {meta['num_fit']:,} fit the predictors (the last "
      f"{100 * meta['fit']['dev_fraction']:.1f}% of them stop training early), the last "
      f"{meta['num_heldout']:,} are held out for every metric.", "",
      "Positive class of F1/precision/recall: **settled** (label `change`: the top-1 does "
      "NOT change at the next layer; `saturated`: equals every later layer's top-1; "
      "`final`: equals the last layer's top-1). Transition l->l+1 is decided from layer "
      "l's h_in, h_out and delta = h_out - h_in. Learned probes and `delta_norm` decide at "
      "probability 0.5 (`delta_norm`'s threshold and the `state`/`softmax` thresholds are "
      "chosen for F1 on the fitting part); `F1 tuned` uses a threshold chosen on the "
      "fitting part for every predictor.", "",
      "### Change rate and ||delta|| (all tokens)", "",
      "| transition | change rate | r(||delta_l||, change) | r(||delta_l+1||, change) |",
      "|---|---|---|---|"]
  for t in an["transitions"]:
    lines.append(f"| {t['transition']} | {_f(t['change_rate'])}% | "
                 f"{_f(t['r_delta_l'], 3, False)} | {_f(t['r_delta_next'], 3, False)} |")
  lines += ["", "### Per layer", "",
            "| layer | mean ||delta|| | mean ||delta||/||h_in|| | mean ||h_in|| | PPL | "
            "mean max-prob | top-1 = final top-1 |", "|---|---|---|---|---|---|---|"]
  for r in an["layers"]:
    lines.append(f"| {r['layer']} | {r['mean_delta_norm']:.3f} | "
                 f"{r['mean_relative_delta']:.3f} | {r['mean_h_in_norm']:.3f} | "
                 f"{r['ppl']:.3f} | {r['mean_softmax']:.3f} | {_f(r['agrees_with_final'])}% |")
  topk = an["topk"]
  lines += ["", "### Top-k sequential saturation", "",
            "Rank-k token settles at the first layer from which every later layer ranks "
            "the same token k-th.", "",
            "| k | mean settle layer | median | settled at layer 1 | top-1 settles no later |",
            "|---|---|---|---|---|"]
  for r in topk["per_rank"]:
    lines.append(f"| {r['k']} | {r['mean']:.2f} | {r['median']:.0f} | "
                 f"{_f(r['settled_at_1'])}% | {_f(r['top1_no_later'])}% |")
  lines += ["", f"Top-1 settles no later than every rank 2..K: {_f(topk['top1_first'])}%; "
            f"strictly first: {_f(topk['top1_strictly_first'])}%; settle layers ordered "
            f"s_1 <= s_2 <= ... <= s_K: {_f(topk['ordered'])}%.", ""]
  for label in meta["labels"]:
    names = list(dict.fromkeys(r["predictor"] for r in study.rows if r["label"] == label))
    rows = [r for r in study.rows if r["label"] == label]
    lines += [f"### Label `{label}`: held-out F1 (%) per transition", "",
              "| transition | positive rate | majority acc. | all-settled F1 | "
              + " | ".join(names) + " |", "|" + "---|" * (4 + len(names))]
    for tr in dict.fromkeys(r["transition"] for r in rows):
      by = {r["predictor"]: r for r in rows if r["transition"] == tr}
      first = next(iter(by.values()))
      lines.append(f"| {tr} | {_f(first['positive_rate'])} | "
                   f"{_f(first['majority_accuracy'])} | {_f(first['all_positive_f1'])} | "
                   + " | ".join(_f(by[n]["f1"]) for n in names) + " |")
    lines += ["", f"Label `{label}`, means over transitions:", "",
              "| predictor | F1 | F1 tuned | precision | recall | AUROC | accuracy | "
              "F1 (negative class) | FLOPs/token |", "|---|---|---|---|---|---|---|---|---|"]
    for s in (s for s in study.summary if s["label"] == label):
      fl = study.flops["probes"].get(f"{label}/{s['predictor']}")
      fl = {"state": 6 * meta["model"]["dim"], "softmax": study.flops["head"]}.get(
          s["predictor"], fl)
      lines.append(f"| {s['predictor']} | {_f(s['f1'])} | {_f(s['f1_tuned'])} | "
                   f"{_f(s['precision'])} | {_f(s['recall'])} | {_f(s['auroc'], 3, False)} | "
                   f"{_f(s['accuracy'])} | {_f(s['f1_negative_class'])} | {fl} |")
    first = next(s for s in study.summary if s["label"] == label)
    lines += ["", f"Baselines (means): positive rate {_f(first['positive_rate'])}%, "
              f"majority-class accuracy {_f(first['majority_accuracy'])}%, F1 of always "
              f"predicting settled {_f(first['all_positive_f1'])}%.", ""]
  fl = study.flops
  lines += ["### Probe cost", "",
            f"Per token: exit head (2 D V) {fl['head']:,} FLOPs; one block at position "
            f"{fl['mid_position']} {fl['block_mid_position']:,} FLOPs. Softmax confidence "
            "needs the head at every exit check; a probe needs its own FLOPs (table above) "
            "per check and the head once, at the exit layer.", ""]
  if study.best:
    lines += [f"Best exit probe (highest mean AUROC on label `{meta['exit_label']}`): "
              f"`{study.best}`, {fl['probes'][study.best]:,} FLOPs per check "
              f"({_f(fl['probes'][study.best] / max(fl['head'], 1))}% of the head).", ""]
  return "\n".join(lines) + "\n"


def to_json(study: ProbeStudy) -> dict[str, Any]:
  return {"rows": study.rows, "summary": study.summary, "analyses": study.analyses,
          "best": study.best, "flops": study.flops, "metadata": study.metadata}


def plot(study: ProbeStudy, path: str) -> None:
  """Four panels: change rate and r, delta norms, F1 per transition, top-k settling."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  an = study.analyses
  fig, axes = plt.subplots(2, 2, figsize=(12, 8))
  tr = an["transitions"]
  xs = [t["layer"] for t in tr]
  ax = axes[0, 0]
  ax.plot(xs, [100 * t["change_rate"] for t in tr], "o-", label="change rate (%)")
  ax2 = ax.twinx()
  ax2.plot(xs, [t["r_delta_l"] for t in tr], "s--", color="tab:red",
           label="r(||delta_l||, change)")
  ax2.plot(xs, [t["r_delta_next"] for t in tr], "^--", color="tab:purple",
           label="r(||delta_l+1||, change)")
  ax.set_xticks(xs, [t["transition"] for t in tr])
  ax.set_title("top-1 change per transition")
  ax.legend(loc="upper left", fontsize=7)
  ax2.legend(loc="upper right", fontsize=7)
  ax = axes[0, 1]
  layers = an["layers"]
  ax.plot([r["layer"] for r in layers], [r["mean_delta_norm"] for r in layers], "o-",
          label="mean ||delta||")
  ax2 = ax.twinx()
  ax2.plot([r["layer"] for r in layers], [r["mean_relative_delta"] for r in layers], "s--",
           color="tab:green", label="mean ||delta|| / ||h_in||")
  ax.set_xlabel("layer")
  ax.set_title("residual update size")
  ax.legend(loc="upper left", fontsize=7)
  ax2.legend(loc="lower right", fontsize=7)
  ax = axes[1, 0]
  # AUROC, not F1: with most tokens settled, F1 mostly restates the base rate.
  label = study.metadata.get("exit_label", study.metadata["labels"][0])
  if label not in study.metadata["labels"]:
    label = study.metadata["labels"][0]
  names = list(dict.fromkeys(r["predictor"] for r in study.rows if r["label"] == label))
  for name in names:
    rows = [r for r in study.rows if r["label"] == label and r["predictor"] == name]
    ax.plot([r["layer"] for r in rows], [r["auroc"] for r in rows], marker="o", ms=3,
            color=plt.cm.tab10(names.index(name.removesuffix("_balanced")) % 10),
            ls="--" if name.endswith("_balanced") else "-", label=name)
  ax.axhline(0.5, color="black", ls=":", label="chance")
  ax.set_xticks(xs, [f"layer {x}" for x in xs])
  ax.set_title(f"held-out AUROC of 'settled', label `{label}`")
  ax.legend(fontsize=6, ncol=2)
  ax = axes[1, 1]
  per_rank = an["topk"]["per_rank"]
  ax.bar([r["k"] for r in per_rank], [r["mean"] for r in per_rank])
  ax.set_xlabel("rank k")
  ax.set_ylabel("mean settle layer")
  ax.set_title(f"top-k settling; top-1 first for {100 * an['topk']['top1_first']:.1f}%")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write_report(study: ProbeStudy, out_dir: str) -> dict[str, str]:
  """Writes probe.md, probe.csv (per-transition rows), probe.json and probe.png."""
  checkpoint.ensure_writable(out_dir)
  paths = {ext: os.path.join(out_dir, f"probe.{ext}") for ext in ("md", "csv", "json", "png")}
  with open(paths["md"], "w") as f:
    f.write(markdown(study))
  with open(paths["csv"], "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(study.rows[0]))
    writer.writeheader()
    writer.writerows(study.rows)
  checkpoint.write_json(paths["json"], to_json(study))
  plot(study, paths["png"])
  return paths
