"""Reproduces the reference saturation-probe study and writes RESULTS.md beside this file.

Trains (or resumes) the probe-study model (experiments/configs/probe.py: 8 layers,
dim 64, 4 heads, FFN 256, char-level WikiText-2, a loss at every layer), runs the
probe study on 65,536 validation tokens (`deepexit_jax.probes.run_probes`: probe.md,
probe.csv, probe.json, probe.png here; the collection and the fitted probes under
--workdir), then closes the loop: sweeps the model with `softmax` and with the best
probe as the exit measure at several exit-layer sets and plots both PPL-vs-FLOPs curves.

Static baselines (issue 13): the same model cut to 1, 2 and 4 layers and trained alone
with a final-layer loss at the same budget (experiments/configs/probe_static.py) are put
on every sweep, chart and table, beside the softmax- and probe-driven exits.

Run from the repository root (about 25-40 minutes on a 2-core CPU, most of it training):
  DEEPEXIT_DATA_DIR=../shared/data python experiments/saturation_probe/run.py
Flags: --workdir (default runs/saturation_probe), --tokens (default 65536),
--kv_policies (default oracle,copy).
"""

from __future__ import annotations

import csv
import math
import os
import statistics
import sys
import time

from absl import app, flags, logging

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # experiments/common.py

import common  # noqa: E402

from deepexit_jax import cli, probes, report, sweep  # noqa: E402
from deepexit_jax.checkpoint import read_json  # noqa: E402
from deepexit_jax.config import ExperimentConfig, load_config_file  # noqa: E402
from deepexit_jax.train import read_eval_records  # noqa: E402

CONFIG = os.path.join(HERE, "..", "configs", "probe.py")
STATIC_CONFIG = os.path.join(HERE, "..", "configs", "probe_static.py")
STATIC_DEPTHS = (1, 2, 4)
_WORKDIR = flags.DEFINE_string("workdir", "runs/saturation_probe", "Where the runs go.")
_TOKENS = flags.DEFINE_integer("tokens", probes.DEFAULT_TOKENS, "Probe token budget.")
_KV = flags.DEFINE_list("kv_policies", ["oracle", "copy"], "KV policies of the sweeps.")
_THRESHOLDS = "0,0.05,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,0.95,0.99"
# Exit-layer sets of the closing sweeps: every layer (the config's), and every other one.
EXIT_SETS = {"every layer": (1, 2, 3, 4, 5, 6, 7), "layers 2,4,6": (2, 4, 6)}


def _pct(x: float | None, digits: int = 1) -> str:
  return "n/a" if x is None else f"{100 * x:.{digits}f}"


def main(argv):
  del argv
  t0 = time.perf_counter()
  wd = _WORKDIR.value
  model_dir = os.path.join(wd, "model")
  logging.info("training the probe-study model into %s", model_dir)
  common.ensure_trained(ExperimentConfig.from_dict(load_config_file(CONFIG)), model_dir)
  static_dirs = [os.path.join(wd, f"static{d}") for d in STATIC_DEPTHS]
  for d, sd in zip(STATIC_DEPTHS, static_dirs):
    logging.info("training the static %d-layer baseline into %s", d, sd)
    common.ensure_trained(ExperimentConfig.from_dict(load_config_file(STATIC_CONFIG, str(d))),
                          sd)
  probe_dir = os.path.join(wd, "probes")
  study = probes.run_probes(model_dir, HERE, tokens=_TOKENS.value, probe_dir=probe_dir,
                            collection_path=os.path.join(wd, "collection.npz"))
  best = probes.load_probe(os.path.join(probe_dir, "best"), study_model_config(study))
  thresholds = sweep.parse_thresholds(_THRESHOLDS)
  sweeps: dict[str, dict[str, sweep.SweepReport]] = {}
  for set_name, layers in EXIT_SETS.items():
    sweeps[set_name] = {
        "softmax": sweep.run_sweep(model_dir, thresholds, exit_layers=layers,
                                   measure="softmax", kv_policies=_KV.value,
                                   static_dirs=static_dirs),
        f"probe {study.best}": sweep.run_sweep(model_dir, thresholds, exit_layers=layers,
                                               measure="probe", probe=best,
                                               kv_policies=_KV.value,
                                               static_dirs=static_dirs),
    }
    slug = set_name.replace(" ", "_").replace(",", "")
    for name, rep in sweeps[set_name].items():
      rep.metadata["probe"] = None if name == "softmax" else os.path.abspath(
          os.path.join(probe_dir, "best"))
      out = os.path.join(HERE, f"sweep_{slug}_{'softmax' if name == 'softmax' else 'probe'}")
      report.write_report(rep, out)
    report.plot_measures(sweeps[set_name], os.path.join(HERE, f"sweep_{slug}.png"),
                         title=f"softmax vs probe `{study.best}`, exits at {set_name}")
  walls = {"model": common.wall_seconds(model_dir),
           **{f"static {d}": common.wall_seconds(sd) for d, sd in zip(STATIC_DEPTHS, static_dirs)},
           "whole run": time.perf_counter() - t0}
  write_results(study, sweeps, model_dir, walls)
  print(open(os.path.join(HERE, "RESULTS.md")).read())


def study_model_config(study: probes.ProbeStudy):
  from deepexit_jax.model import ModelConfig

  return ModelConfig(**study.metadata["model"])


def _reference_tables(study: probes.ProbeStudy, ref: dict) -> list[str]:
  an = study.analyses
  rows = {(r["label"], r["predictor"], r["transition"]): r for r in study.rows}
  lines = ["### Change rate and correlation with ||delta||", "",
           "Ours on all collected tokens. The reference does not say which layer's delta "
           "it correlates, so both are shown: layer l's own delta (what an exit decision "
           "at l can use) and layer l+1's (the update that makes the change).", "",
           "| transition | ref change rate | ours | ref r | ours r(||delta_l||) | "
           "ours r(||delta_l+1||) |", "|---|---|---|---|---|---|"]
  for p, t in zip(ref["transitions"], an["transitions"]):
    lines.append(f"| {p['transition']} | {_pct(p['change_rate'])}% | "
                 f"{_pct(t['change_rate'])}% | {p['r']:.3f} | {t['r_delta_l']:.3f} | "
                 f"{t['r_delta_next']:.3f} |")
  lines += ["", "### F1 per transition, label `change` (held-out tokens)", "",
            "Ours: positive class = settled (top-1 unchanged at the next layer), learned "
            "probes decide at probability 0.5, the `delta_norm` threshold is chosen for F1 on "
            "the fitting part. `always settled` is the F1 of predicting the positive class "
            "everywhere; `neg.` columns give our F1 with the other class (changed) as "
            "positive, in case the reference used that one.", "",
            "| transition | ref delta norm / linear / MLP | ours delta norm / linear / MLP | "
            "ours always settled | ours neg. delta norm / linear / MLP | ours AUROC delta "
            "norm / linear / MLP |", "|---|---|---|---|---|---|"]
  names = ("delta_norm", "linear", "mlp")
  for p in ref["transitions"]:
    ours = [rows[("change", n, p["transition"])] for n in names]
    lines.append(
        f"| {p['transition']} | " + " / ".join(_pct(p[f"f1_{n}"]) for n in names) + " | "
        + " / ".join(_pct(o["f1"]) for o in ours) + f" | {_pct(ours[0]['all_positive_f1'])} | "
        + " / ".join(_pct(o["f1_negative_class"]) for o in ours) + " | "
        + " / ".join(f"{o['auroc']:.3f}" for o in ours) + " |")
  summ = {(s["label"], s["predictor"]): s for s in study.summary}
  means = [summ[("change", n)] for n in names]
  lines.append("| mean | " + " / ".join(_pct(ref["f1_mean"][n]) for n in names) + " | "
               + " / ".join(_pct(m["f1"]) for m in means) + f" | "
               f"{_pct(means[0]['all_positive_f1'])} | "
               + " / ".join(_pct(m["f1_negative_class"]) for m in means) + " | "
               + " / ".join(f"{m['auroc']:.3f}" for m in means) + " |")
  d = ref["delta"]
  layers = an["layers"]
  n = len(layers)
  mid = layers[:-1]
  lines += ["", "### Residual delta per layer", "",
            "| | ref | ours |", "|---|---|---|",
            f"| mean ||delta||, layers 1-{n - 1} | ~{d['mean_norm_layers_1_7']} | "
            f"{sum(r['mean_delta_norm'] for r in mid) / len(mid):.3f} (range "
            f"{min(r['mean_delta_norm'] for r in mid):.3f}-"
            f"{max(r['mean_delta_norm'] for r in mid):.3f}) |",
            f"| mean ||delta||, layer {n} | {d['mean_norm_layer_8']} | "
            f"{layers[-1]['mean_delta_norm']:.3f} |",
            f"| mean ||delta||/||h_in||, layers 1-{n - 1} | ~{d['relative_layers_1_7']} | "
            f"{sum(r['mean_relative_delta'] for r in mid) / len(mid):.3f} |",
            f"| mean ||delta||/||h_in||, layer {n} | {d['relative_layer_8']} | "
            f"{layers[-1]['mean_relative_delta']:.3f} |"]
  return lines


def _sweep_tables(sweeps: dict[str, dict[str, sweep.SweepReport]]) -> list[str]:
  lines = []
  for set_name, reps in sweeps.items():
    lines += [f"### Exits at {set_name}", "",
              "| measure | KV | full-depth PPL | lowest FLOPs within +0.5% PPL | "
              "its PPL | lowest FLOPs overall | its PPL | oracle bound FLOPs / PPL |",
              "|---|---|---|---|---|---|---|---|"]
    for name, rep in reps.items():
      full = next(r for r in rep.rows if r.kind == "full")
      bound = next(r for r in rep.rows if r.kind == "oracle")
      for policy in rep.metadata["kv_policies"]:
        thr = [r for r in rep.rows if r.kind == "threshold" and r.kv_policy == policy]
        within = [r for r in thr if r.ppl_change <= sweep.PPL_TOLERANCE]
        good = min(within, key=lambda r: r.flops_fraction) if within else None
        cheap = min(thr, key=lambda r: r.flops_fraction)
        good_text = (f"{_pct(good.flops_fraction)}% (thr {good.threshold:g}) | {good.ppl:.3f}"
                     if good else "none | ")
        lines.append(
            f"| {name} | {policy} | {full.ppl:.3f} | {good_text} | "
            f"{_pct(cheap.flops_fraction)}% (thr {cheap.threshold:g}) | {cheap.ppl:.3f} | "
            f"{_pct(bound.flops_fraction)}% / {bound.ppl:.3f} |")
    lines.append("")
  return lines


def _within_text(rows: list[sweep.SweepRow]) -> str:
  """FLOPs and layers of the lowest-FLOPs threshold row within the PPL tolerance."""
  within = [r for r in rows if r.ppl_change <= sweep.PPL_TOLERANCE]
  if not within:
    return "no setting"
  r = min(within, key=lambda r: r.flops_fraction)
  return f"{_pct(r.flops_fraction)}% of full-depth FLOPs ({_pct(r.layers_fraction)}% of the layers)"


def _depth_regime_spread() -> dict[str, float]:
  """Seed std of each model's PPL in experiments/depth_regime/seeds.csv (8 layers, dim 64:
  the nearest models with several seeds), or {} if absent."""
  path = os.path.join(HERE, "..", "depth_regime", "seeds.csv")
  if not os.path.exists(path):
    return {}
  by_model: dict[str, list[float]] = {}
  with open(path) as f:
    for row in csv.DictReader(f):
      by_model.setdefault(row["model"], []).append(float(row["ppl"]))
  return {m: statistics.stdev(v) for m, v in by_model.items() if len(v) > 1}


def _static_lines(sweeps: dict[str, dict[str, sweep.SweepReport]]) -> list[str]:
  """Each static model against the exit fronts at no more FLOPs (single seed)."""
  spread = _depth_regime_spread()
  lines = [
      "## Static baselines at the probe model's budget", "",
      f"The probe model cut to {', '.join(map(str, STATIC_DEPTHS))} layers, each trained "
      "alone with a final-layer loss on the same data for the same epochs and seed "
      "(experiments/configs/probe_static.py), costed in the 8-layer model's FLOPs. For "
      "each, the lowest PPL an exit setting reaches at no more FLOPs (full depth and every "
      "threshold of that measure and KV policy), and its gap to the static model "
      "(negative: early exit is better).", ""]
  for set_name, reps in sweeps.items():
    statics = [r for r in next(iter(reps.values())).rows if r.kind == "static"]
    cols = [(name, policy) for name, rep in reps.items()
            for policy in rep.metadata["kv_policies"]]
    lines += [f"### Exits at {set_name}", "",
              "| static model | its PPL | its FLOPs | " + " | ".join(
                  f"best {name}, {policy} at <= these FLOPs (gap)" for name, policy in cols)
              + " |", "|---|---|---|" + "---|" * len(cols)]
    for st in statics:
      cells = []
      for name, policy in cols:
        rep = reps[name]
        ok = [r for r in rep.rows if (r.kind == "full" or (
            r.kind == "threshold" and r.kv_policy == policy))
              and r.flops_fraction <= st.flops_fraction * (1 + 1e-3)]
        if not ok:
          cells.append("none (every setting costs more)")
          continue
        b = min(ok, key=lambda r: r.ppl)
        where = "full depth" if b.kind == "full" else f"thr {b.threshold:g}"
        cells.append(f"{b.ppl:.3f} ({where}, {_pct(b.flops_fraction)}%) ({b.ppl - st.ppl:+.3f})")
      lines.append(f"| {st.label} | {st.ppl:.3f} | {_pct(st.flops_fraction)}% | "
                   + " | ".join(cells) + " |")
    lines.append("")
  if spread:
    lo, hi = min(spread.values()), max(spread.values())
    pooled = math.sqrt(statistics.mean(v * v for v in spread.values()))
    lines += [
        "**One training seed per model here**, so no gap above is claimed as a "
        "difference. As a yardstick: 8-layer dim-64 models of experiments/depth_regime "
        f"(other training text, 3 seeds) have a seed std of {lo:.3f}-{hi:.3f} PPL per "
        f"model (pooled {pooled:.3f}). Two single-seed models differ by noise alone with a "
        f"std of about sqrt(2) x {pooled:.3f} = {math.sqrt(2) * pooled:.3f}, so a gap here "
        f"would need to exceed about {2 * math.sqrt(2) * pooled:.2f} PPL (2 standard "
        "errors, the rule of experiments/common.compare) before it said anything.", ""]
  else:
    lines += ["**One training seed per model here**, so no gap above is claimed as a "
              "difference.", ""]
  return lines


def write_results(study: probes.ProbeStudy, sweeps: dict[str, dict[str, sweep.SweepReport]],
                  model_dir: str, walls: dict[str, float | None]) -> None:
  """RESULTS.md: every number in it comes from this run's files."""
  ref = read_json(os.path.join(HERE, "reference_table.json"))
  exp = read_json(os.path.join(model_dir, "config.json"))
  meta, an = study.metadata, study.analyses
  evals = read_eval_records(model_dir)
  summ = {(s["label"], s["predictor"]): s for s in study.summary}
  change = [t["change_rate"] for t in an["transitions"]]
  ref_change = [t["change_rate"] for t in ref["transitions"]]
  best_label, best_pred = study.best.split("/")
  best_s = summ[(best_label, best_pred)]
  fl = study.flops
  every = sweeps["every layer"]
  soft, prb = (every[k] for k in every)
  soft_oracle = [r for r in soft.rows if r.kind == "threshold" and r.kv_policy == "oracle"]
  prb_oracle = [r for r in prb.rows if r.kind == "threshold" and r.kv_policy == "oracle"]
  m = exp["model"]
  lines = [
      "# Saturation probes: reproduction of the reference probe study", "",
      "Regenerate everything here (model, collection, probes, tables, plots) with:", "",
      "```bash", "DEEPEXIT_DATA_DIR=../shared/data python experiments/saturation_probe/run.py",
      "```", "",
      "## Setup", "",
      f"- Model: {m['num_layers']} layers, dim {m['dim']}, {m['num_heads']} heads, FFN "
      f"{m['ffn_dim']}, vocabulary {m['vocab_size']} characters; loss weights "
      f"`{exp['loss_weights']}` (a loss at every layer, so every layer's top-1 means "
      f"something), {exp['train']['epochs']} epochs of batch {exp['data']['batch_size']} x "
      f"seq {exp['data']['seq_len']} on {evals[-1]['step']:,} steps; checkpoint step "
      f"{meta['step']}, params {meta['params_sha256']}.",
      "- Validation PPL per layer after each epoch (first 50,000 validation characters): "
      + "; ".join(f"epoch {r['epoch']:.0f}: L1 {r['layer_ppl'][0]:.2f} ... "
                  f"L{len(r['layer_ppl'])} {r['layer_ppl'][-1]:.2f}" for r in evals) + ".",
      f"- Probe text: {meta['text']}; the first {meta['num_tokens']:,} tokens. The first "
      f"{meta['num_fit']:,} fit the predictors (their last "
      f"{100 * meta['fit']['dev_fraction']:.1f}% is the early-stopping split), the last "
      f"{meta['num_heldout']:,} are held out for every F1/AUROC. The text starts after the "
      "validation characters that chose the checkpoint and that the sweeps below evaluate, "
      "so the sweeps score the probe on text it was not fitted on.",
      f"- Learned probes: optax Adam (lr {meta['fit']['learning_rate']}, batch "
      f"{meta['fit']['batch_size']}, at most {meta['fit']['max_epochs']} epochs, patience "
      f"{meta['fit']['patience']}, seed {meta['fit']['seed']}), MLP hidden width "
      f"{meta['fit']['hidden']}, inputs standardised on the training part.",
      "- Training wall time (seconds, this shared 2-core CPU): " + ", ".join(
          f"{k} {v:.0f}" if v is not None else f"{k} not recorded (trained before it was "
          "recorded)" for k, v in walls.items()) + ". One training seed. The whole recipe "
      "(experiments/configs/probe.py):",
      *["  " + line for line in common.recipe_lines(
          ExperimentConfig.from_dict(load_config_file(CONFIG)),
          round(evals[-1]["step"] / evals[-1]["epoch"]))],
      "- **Positive class** of F1/precision/recall everywhere: *settled* (for the `change` "
      "label: the top-1 does not change at the next layer). This is the class the "
      "reference's \"saturation detection\" names; the reference does not state it, so "
      "the F1 of the other class is shown too.", "",
      "## Ours next to the reference", "",
      *_reference_tables(study, ref), "",
      "## What differs, and why", "",
      f"- **Our layers agree {'more' if sum(change) < sum(ref_change) else 'less'} often.** "
      f"Mean change rate {_pct(sum(change) / len(change))}% vs the reference's "
      f"{_pct(sum(ref_change) / len(ref_change))}%. Our model is trained with loss weights "
      f"`{exp['loss_weights']}` for {exp['train']['epochs']} epochs (validation PPL L1 "
      f"{evals[-1]['layer_ppl'][0]:.2f} vs L{m['num_layers']} "
      f"{evals[-1]['layer_ppl'][-1]:.2f}), and "
      f"{_pct(an['layers'][0]['agrees_with_final'])}% of tokens already have the final "
      "top-1 at layer 1. The reference's training recipe (loss weights, length, data "
      "preparation) is not given in enough detail to match; change rates of 40-66% mean its "
      "intermediate exits disagreed with each other far more than ours, which changes every "
      "base rate below.",
      "- **The F1 scale depends on the base rate.** With positive = settled, always "
      "predicting settled already scores "
      f"{_pct(summ[('change', 'delta_norm')]['all_positive_f1'])}% F1 on average here (the "
      "reference's base rates would give "
      f"{_pct(sum(2 * (1 - c) / (2 - c) for c in ref_change) / len(ref_change))}%). Compare "
      "predictors by AUROC, which does not depend on the base rate: "
      + ", ".join(f"`{p}` {summ[('change', p)]['auroc']:.3f}"
                  for p in ("delta_norm", "linear", "mlp", "mlp_h_delta", "shared_mlp",
                            "state", "softmax") if ("change", p) in summ) + " (label `change`).",
      f"- **Residual deltas.** Our largest mean ||delta|| is at layer "
      f"{max(an['layers'], key=lambda r: r['mean_delta_norm'])['layer']} "
      f"({max(r['mean_delta_norm'] for r in an['layers']):.3f}) and our layer "
      f"{m['num_layers']} has {an['layers'][-1]['mean_delta_norm']:.3f}; the reference has "
      "a roughly constant ~3.3 with a jump at its last layer. Layer 1's relative delta is "
      f"{an['layers'][0]['mean_relative_delta']:.2f} because the embedding it adds to is "
      f"small (mean ||h_in|| {an['layers'][0]['mean_h_in_norm']:.2f}). Absolute norms "
      "depend on initialisation, LayerNorm placement and training, which the reference "
      "does not specify.",
      f"- **||delta|| barely predicts a change here**: r(||delta_l||, change) is between "
      f"{min(t['r_delta_l'] for t in an['transitions']):.3f} and "
      f"{max(t['r_delta_l'] for t in an['transitions']):.3f} (reference 0.13-0.22), and "
      "the `delta_norm` AUROC is close to 0.5; the learned probes that see the direction of "
      "delta (and h) do better.", "",
      "## Beyond the reference", "",
      "Held-out means over the transitions for every label and predictor (full "
      "per-transition tables in [probe.md](probe.md), plot in [probe.png](probe.png)):", "",
      "| label | predictor | F1 | F1 tuned | precision | recall | AUROC | always-settled F1 | "
      "FLOPs/check |", "|---|---|---|---|---|---|---|---|---|"]
  for s in study.summary:
    key = f"{s['label']}/{s['predictor']}"
    flops = fl["probes"].get(key, {"state": 6 * m["dim"], "softmax": fl["head"]}.get(
        s["predictor"]))
    lines.append(f"| {s['label']} | {s['predictor']} | {_pct(s['f1'])} | "
                 f"{_pct(s['f1_tuned'])} | {_pct(s['precision'])} | {_pct(s['recall'])} | "
                 f"{s['auroc']:.3f} | {_pct(s['all_positive_f1'])} | {flops:,} |")
  topk = an["topk"]
  lines += [
      "", "Top-k sequential saturation (rank-k token settles at the first layer from which "
      "every later layer ranks the same token k-th):", "",
      "| k | mean settle layer | settled at layer 1 | top-1 settles no later |",
      "|---|---|---|---|"]
  for r in topk["per_rank"]:
    lines.append(f"| {r['k']} | {r['mean']:.2f} | {_pct(r['settled_at_1'])}% | "
                 f"{_pct(r['top1_no_later'])}% |")
  lines += [
      "", f"The top-1 settles no later than every rank 2-5 for {_pct(topk['top1_first'])}% "
      f"of tokens (strictly first: {_pct(topk['top1_strictly_first'])}%); the settle "
      f"layers are fully ordered s_1 <= ... <= s_5 for {_pct(topk['ordered'])}%.", "",
      "## Closing the loop: softmax vs the best probe as the exit measure", "",
      f"Best probe (highest mean held-out AUROC on label `{meta['exit_label']}`, the "
      f"exit-relevant one): `{study.best}` (AUROC {best_s['auroc']:.3f}, F1 "
      f"{_pct(best_s['f1'])}%). Its cost per exit check is {fl['probes'][study.best]:,} "
      f"FLOPs per token, against {fl['head']:,} for the exit head that softmax confidence "
      f"needs at every check ({_pct(fl['probes'][study.best] / fl['head'])}% of it) and "
      f"{fl['block_mid_position']:,} for one block at position {fl['mid_position']}. Both are "
      "counted in the sweeps' FLOPs: a probe exit pays the probe at every check and the "
      "head once; a softmax exit pays the head at every check.", "",
      "Sweeps over the first 50,000 validation characters (thresholds "
      f"{_THRESHOLDS}; the probe's confidence is its P(settled)):", "",
      *_sweep_tables(sweeps),
      f"With exits at every layer (oracle KV), the cheapest setting within +0.5% PPL of "
      f"full depth costs {_within_text(soft_oracle)} with softmax and "
      f"{_within_text(prb_oracle)} with the probe. Softmax "
      f"pays the {fl['head']:,}-FLOP head at each of up to {len(soft.exit_layers)} checks "
      f"per token ({len(soft.exit_layers) * fl['head']:,} FLOPs for a token that never "
      f"exits, {_pct(len(soft.exit_layers) * fl['head'] / fl['block_mid_position'])}% of "
      "a block), which is why its curve passes 100%; the probe pays "
      f"{fl['probes'][study.best]:,} per check. Sending every token out at layer 1 "
      f"(threshold 0) costs {_pct(min(r.flops_fraction for r in soft_oracle))}% (softmax) "
      f"/ {_pct(min(r.flops_fraction for r in prb_oracle))}% (probe) of the FLOPs for PPL "
      f"{min(soft_oracle, key=lambda r: r.flops_fraction).ppl:.3f} vs "
      f"{next(r for r in soft.rows if r.kind == 'full').ppl:.3f} at full depth: in this "
      "model the layers above the first change few predictions (see the change rates), "
      "so most of the achievable saving is already at the shallowest exit."
      + (" The probe was fitted with the class-balanced loss, so its P(settled) is not "
         "calibrated to the true base rate; only its ranking matters for a threshold sweep."
         if study.best.endswith("_balanced") else ""),
      "",
  ]
  lines += _static_lines(sweeps)
  for set_name in sweeps:
    slug = set_name.replace(" ", "_").replace(",", "")
    lines += [f"![softmax vs probe (curves) and the static models (squares), exits at "
              f"{set_name}](sweep_{slug}.png)", "",
              f"Full sweep tables: [softmax](sweep_{slug}_softmax/sweep.md), "
              f"[probe](sweep_{slug}_probe/sweep.md).", ""]
  with open(os.path.join(HERE, "RESULTS.md"), "w") as f:
    f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
  cli.quiet_library_logs()
  app.run(main)
