"""Saturation probes, part 4: the study (every label x predictor, per transition, on
held-out tokens), its analyses, and the `deepexit-probe` pipeline (`run_probes`).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from deepexit_jax import checkpoint, exits
from deepexit_jax.errors import UserError
from deepexit_jax.model import ModelConfig
from deepexit_jax.probes.collection import (
  LABELS,
  Collection,
  change_labels,
  collect,
  settled_labels,
  text_batches,
)
from deepexit_jax.probes.metrics import auroc, best_f1_threshold, binary_metrics, pearson_r
from deepexit_jax.probes.predictors import (
  LEARNED,
  PREDICTORS,
  FitConfig,
  SaturationProbe,
  fit_probe,
  probe_scores,
  save_probe,
)
from deepexit_jax.report import probes as probe_report

DEFAULT_TOKENS = 65_536


# ----------------------------------------------------------------------------------------
# Analyses.


def topk_settling(topk_NMK: np.ndarray) -> dict[str, Any]:
  """When does the rank-k token settle ("Looking Beyond the Top-1")?

  The rank-k token settles at layer s_k, the first layer from which every later layer
  (the last included) ranks the same token k-th; s_k in 1..N.

  Returns:
    {"settle_layer_KM": [K, M] int, "per_rank": [{"k", "mean", "median",
    "settled_at_1", "top1_no_later"}], "top1_first": share where s_1 <= s_k for every
    k, "top1_strictly_first": s_1 < s_k for every k > 1, "ordered": share with
    s_1 <= s_2 <= ... <= s_K}.
  """
  topk_NMK = np.asarray(topk_NMK)
  n = topk_NMK.shape[0]
  same_NMK = topk_NMK == topk_NMK[-1]
  settled_NMK = np.flip(np.logical_and.accumulate(np.flip(same_NMK, 0), axis=0), 0)
  settle_KM = (n - settled_NMK.sum(0) + 1).T
  per_rank = [{"k": k + 1, "mean": float(settle_KM[k].mean()),
               "median": float(np.median(settle_KM[k])),
               "settled_at_1": float(np.mean(settle_KM[k] == 1)),
               "top1_no_later": float(np.mean(settle_KM[0] <= settle_KM[k]))}
              for k in range(settle_KM.shape[0])]
  rest = settle_KM[1:]
  return {
      "settle_layer_KM": settle_KM, "per_rank": per_rank,
      "top1_first": float(np.mean(np.all(settle_KM[0] <= rest, 0))) if len(rest) else 1.0,
      "top1_strictly_first": float(np.mean(np.all(settle_KM[0] < rest, 0)))
      if len(rest) else 1.0,
      "ordered": float(np.mean(np.all(np.diff(settle_KM, axis=0) >= 0, 0))),
  }


def analyses(collection: Collection) -> dict[str, Any]:
  """Change rate and its correlation with ||delta||, delta statistics, top-k settling."""
  col = collection
  n = col.num_layers
  change_LM = change_labels(col.top1_NM)
  delta_NM = np.linalg.norm(col.delta_NMD, axis=-1)
  h_in_NM = np.linalg.norm(col.h_in_NMD, axis=-1)
  transitions = [{
      "transition": f"{i + 1}->{i + 2}", "layer": i + 1,
      "change_rate": float(change_LM[i].mean()),
      # ||delta|| of layer l (known when layer l decides to exit) and of layer l + 1
      # (the update that makes the change).
      "r_delta_l": pearson_r(delta_NM[i], change_LM[i]),
      "r_delta_next": pearson_r(delta_NM[i + 1], change_LM[i]),
  } for i in range(n - 1)]
  layers = [{
      "layer": i + 1, "mean_delta_norm": float(delta_NM[i].mean()),
      "mean_relative_delta": float(np.mean(delta_NM[i] / np.maximum(h_in_NM[i], 1e-30))),
      "mean_h_in_norm": float(h_in_NM[i].mean()),
      "ppl": float(np.exp(col.nll_NM[i].mean())),
      "mean_softmax": float(col.softmax_NM[i].mean()),
      "agrees_with_final": float(np.mean(col.top1_NM[i] == col.top1_NM[-1])),
  } for i in range(n)]
  topk = topk_settling(col.topk_NMK)
  topk.pop("settle_layer_KM")
  return {"transitions": transitions, "layers": layers, "topk": topk}


# ----------------------------------------------------------------------------------------
# The study: every label x predictor, per transition, on held-out tokens.


@dataclasses.dataclass
class ProbeStudy:
  """A finished probe study.

  Attributes:
    rows: one dict per (label, predictor, transition) with held-out metrics (F1,
      precision, recall, AUROC, accuracy; `f1_tuned` at a threshold chosen on the
      fitting part; `f1_negative_class` with "not settled" as the positive class)
      and the baselines (positive rate, majority-class accuracy, F1 of always
      predicting "settled").
    summary: the rows averaged over transitions, per (label, predictor).
    analyses: `analyses(collection)`.
    probes: fitted probes by "label/predictor" name.
    best: name of the best exit probe (highest mean AUROC on `exit_label`).
    flops: per-token FLOPs of the exit head, a block and every probe.
    metadata: text, budget, split and fitting settings.
  """

  rows: list[dict[str, Any]]
  summary: list[dict[str, Any]]
  analyses: dict[str, Any]
  probes: dict[str, SaturationProbe]
  best: str | None
  flops: dict[str, Any]
  metadata: dict[str, Any]


_METRICS = ("f1", "precision", "recall", "auroc", "accuracy", "f1_tuned", "f1_negative_class",
            "positive_rate", "majority_accuracy", "all_positive_f1")


def _score_rows(label: str, name: str, y_LM: np.ndarray, score_LM: np.ndarray,
                thr_L: np.ndarray, num_fit: int) -> list[dict[str, Any]]:
  rows = []
  for i in range(y_LM.shape[0]):
    y, s = y_LM[i, num_fit:], score_LM[i, num_fit:]
    pred = s >= thr_L[i]
    p = float(y.mean())
    tuned = best_f1_threshold(y_LM[i, :num_fit], score_LM[i, :num_fit])
    rows.append({
        "label": label, "predictor": name, "transition": f"{i + 1}->{i + 2}", "layer": i + 1,
        **binary_metrics(y, pred), "auroc": auroc(y, s),
        "f1_tuned": binary_metrics(y, s >= tuned)["f1"],
        "f1_negative_class": binary_metrics(~y, ~pred)["f1"],
        "positive_rate": p, "majority_accuracy": max(p, 1 - p),
        "all_positive_f1": 2 * p / (1 + p) if p > 0 else 0.0,
        "threshold": float(thr_L[i]), "num_heldout": int(y.size)})
  return rows


def _nan_mean(values: Sequence[float]) -> float:
  """Mean over the defined values (AUROC is undefined where one class is absent)."""
  finite = [v for v in values if not math.isnan(v)]
  return float(np.mean(finite)) if finite else float("nan")


def _model_config(collection: Collection) -> ModelConfig:
  """The collected model's config (stored in the metadata), completed from the arrays'
  shapes where a hand-built collection's metadata lacks fields."""
  known = {f.name for f in dataclasses.fields(ModelConfig)}
  stored = {k: v for k, v in collection.metadata.get("model", {}).items() if k in known}
  return ModelConfig(**{"vocab_size": 1, "num_heads": 1, **stored,
                        "num_layers": collection.num_layers,
                        "dim": collection.hidden_NMD.shape[-1]})


def run_study(collection: Collection, *, labels: Sequence[str] = LABELS,
              predictors: Sequence[str] = PREDICTORS, balance: Sequence[bool] = (False, True),
              fit_fraction: float = 0.75, fit: FitConfig = FitConfig(),  # noqa: B008 (frozen)
              exit_label: str = "final") -> ProbeStudy:
  """Fits and scores every predictor for every label (module docstring).

  Args:
    collection: the collected layers (M tokens in text order).
    labels: labels to study (`LABELS`).
    predictors: predictors to fit (`PREDICTORS`).
    balance: for learned predictors, fit without (False) and/or with (True) the
      class-balanced loss; balanced ones are named "<predictor>_balanced".
    fit_fraction: the first share of the tokens is the fitting part, the rest is
      held out for every metric.
    fit: training hyper-parameters of the learned probes.
    exit_label: the label whose best learned probe is recommended for exit.

  Returns:
    A `ProbeStudy`.
  """
  for name in labels:
    if name not in LABELS:
      raise UserError(f"unknown label {name!r}: choose from {', '.join(LABELS)}")
  for name in predictors:
    if name not in PREDICTORS:
      raise UserError(f"unknown predictor {name!r}: choose from {', '.join(PREDICTORS)}")
  if exit_label not in LABELS:
    raise UserError(f"unknown exit label {exit_label!r}: choose from {', '.join(LABELS)}")
  if not 0.0 < fit_fraction < 1.0:
    raise UserError(f"fit_fraction={fit_fraction} must be in (0, 1)")
  if collection.num_layers < 2:
    raise UserError("a probe study needs a model with at least 2 layers")
  m = collection.num_tokens
  num_fit = int(m * fit_fraction)
  if num_fit < 16 or m - num_fit < 16:
    raise UserError(f"{m} tokens give too small a fitting or held-out part: raise the "
                    "token budget")
  el = collection.num_layers - 1
  rows: list[dict[str, Any]] = []
  probes: dict[str, SaturationProbe] = {}
  for label in labels:
    y_LM = settled_labels(label, collection.top1_NM)
    for predictor in predictors:
      if predictor in ("state", "softmax"):
        score_LM = getattr(collection, predictor + "_NM")[:el]
        thr_L = np.asarray([best_f1_threshold(y_LM[i, :num_fit], score_LM[i, :num_fit])
                            for i in range(el)])
        rows += _score_rows(label, predictor, y_LM, score_LM, thr_L, num_fit)
        continue
      for balanced in (balance if predictor in LEARNED else (False,)):
        name = predictor + ("_balanced" if balanced else "")
        probe, _ = fit_probe(collection, label, predictor, num_fit=num_fit,
                             balanced=balanced, fit=fit)
        probes[f"{label}/{name}"] = probe
        rows += _score_rows(label, name, y_LM, probe_scores(probe, collection),
                            np.zeros(el), num_fit)
  summary = []
  for key in dict.fromkeys((r["label"], r["predictor"]) for r in rows):
    sel = [r for r in rows if (r["label"], r["predictor"]) == key]
    summary.append({"label": key[0], "predictor": key[1],
                    **{k: _nan_mean([r[k] for r in sel]) for k in _METRICS}})
  candidates = [s for s in summary if s["label"] == exit_label
                and f"{s['label']}/{s['predictor']}" in probes
                and s["predictor"] != "delta_norm"]
  best = None
  if candidates:
    top = max(candidates, key=lambda s: s["auroc"])
    best = f"{top['label']}/{top['predictor']}"
  counter = exits.FlopCounter.from_config(_model_config(collection))
  t_mid = int(collection.positions_M.max()) // 2
  flops = {"head": counter.head, "block_mid_position": int(counter.block(t_mid)),
           "mid_position": t_mid,
           "probes": {k: p.flops_per_token for k, p in probes.items()}}
  metadata = {**collection.metadata, "num_tokens": m, "num_fit": num_fit,
              "num_heldout": m - num_fit, "fit_fraction": fit_fraction,
              "fit": dataclasses.asdict(fit), "labels": list(labels),
              "predictors": list(predictors), "balance": list(balance),
              "exit_label": exit_label, "positive_class": "settled (label change: unchanged "
              "at the next layer; saturated/final: as defined)"}
  return ProbeStudy(rows=rows, summary=summary, analyses=analyses(collection), probes=probes,
                    best=best, flops=flops, metadata=metadata)


# ----------------------------------------------------------------------------------------
# The `deepexit-probe` pipeline (its binary is `deepexit_jax.main.probe`).


def run_probes(checkpoint_dir: str, out_dir: str, *, tokens: int = DEFAULT_TOKENS,
               probe_dir: str | None = None, collection_path: str | None = None,
               labels: Sequence[str] = LABELS, predictors: Sequence[str] = PREDICTORS,
               balance: Sequence[bool] = (False, True), fit_fraction: float = 0.75,
               fit: FitConfig = FitConfig(),  # noqa: B008 (frozen)
               exit_label: str = "final", top_k: int = 5,
               skip_chars: int | None = None, data_dir: str | None = None,
               text_file: str | None = None, seq_len: int | None = None,
               batch_size: int | None = None) -> ProbeStudy:
  """Collects (or reloads), fits, scores, writes the reports and saves the probes.

  Args:
    checkpoint_dir: a `deepexit-train` workdir or a Hugging Face directory (with
      `text_file`).
    out_dir: receives probe.md/csv/json/png.
    tokens: token budget M of validation text.
    probe_dir: where the fitted probes go (`<label>/<predictor>/` and `best/`);
      default OUT/probes.
    collection_path: .npz of the collected layers; reused when it holds the same
      checkpoint, text and budget, else (re)written. None: OUT/collection.npz.
    labels, predictors, balance, fit_fraction, fit, exit_label: see `run_study`.
    top_k: ranks kept per layer.
    skip_chars, data_dir, text_file, seq_len, batch_size: see `text_batches`.

  Returns:
    The `ProbeStudy` (its probes are saved under `probe_dir`).
  """
  checkpoint.ensure_writable(out_dir)
  probe_dir = probe_dir or os.path.join(out_dir, "probes")
  collection_path = collection_path or os.path.join(out_dir, "collection.npz")
  ckpt, batches, meta = text_batches(checkpoint_dir, skip_chars=skip_chars, data_dir=data_dir,
                                     text_file=text_file, seq_len=seq_len,
                                     batch_size=batch_size)
  meta.update(tokens=int(tokens), top_k=int(top_k),
              params_sha256=checkpoint.params_digest(ckpt.model))
  col = None
  if os.path.exists(collection_path):
    old = Collection.load(collection_path)
    same = ("params_sha256", "tokens", "top_k", "text")
    if all(old.metadata.get(k) == meta[k] for k in same):
      col = old
  if col is None:
    col = collect(ckpt.model, batches, tokens, top_k=top_k, metadata=meta)
    col.save(collection_path)
  study = run_study(col, labels=labels, predictors=predictors, balance=balance,
                    fit_fraction=fit_fraction, fit=fit, exit_label=exit_label)
  study.metadata["collection"] = os.path.abspath(collection_path)
  study.metadata["probe_dir"] = os.path.abspath(probe_dir)
  summary = {(s["label"], s["predictor"]): s for s in study.summary}
  for name, probe in study.probes.items():
    label, predictor = name.split("/")
    save_probe(probe, os.path.join(probe_dir, label, predictor),
               extra={"heldout_mean": summary[(label, predictor)],
                      "checkpoint": meta["checkpoint_abspath"]})
  if study.best:
    label, predictor = study.best.split("/")
    save_probe(study.probes[study.best], os.path.join(probe_dir, "best"),
               extra={"name": study.best, "heldout_mean": summary[(label, predictor)],
                      "checkpoint": meta["checkpoint_abspath"]})
  probe_report.write_report(study, out_dir)
  return study
