"""Saturation probes, part 2: binary-classification metrics (positive class = True)."""

from __future__ import annotations

import numpy as np


def binary_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
  """Precision, recall, F1 and accuracy of predicting the True class (0 where undefined)."""
  y, p = np.asarray(y_true, bool), np.asarray(y_pred, bool)
  tp = float(np.sum(y & p))
  precision = tp / max(float(p.sum()), 1.0)
  recall = tp / max(float(y.sum()), 1.0)
  f1 = 2 * tp / max(float(y.sum() + p.sum()), 1.0)
  return {"precision": precision, "recall": recall, "f1": f1,
          "accuracy": float(np.mean(y == p))}


def auroc(y_true: np.ndarray, score: np.ndarray) -> float:
  """Area under the ROC curve: P(score of a positive > score of a negative), ties 1/2."""
  y = np.asarray(y_true, bool)
  s = np.asarray(score, np.float64)
  pos, neg = int(y.sum()), int((~y).sum())
  if pos == 0 or neg == 0:
    return float("nan")
  order = np.argsort(s, kind="mergesort")
  ranks = np.empty(len(s), np.float64)
  sorted_s = s[order]
  # Average ranks over ties (1-based), the Mann-Whitney statistic.
  starts = np.r_[0, np.flatnonzero(np.diff(sorted_s)) + 1]
  ends = np.r_[starts[1:], len(s)]
  avg = (starts + ends + 1) / 2.0
  ranks[order] = np.repeat(avg, ends - starts)
  return float((ranks[y].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


def best_f1_threshold(y_true: np.ndarray, score: np.ndarray) -> float:
  """The threshold t maximising F1 of `score >= t` (chosen on fitting data)."""
  y = np.asarray(y_true, bool)
  s = np.asarray(score, np.float64)
  order = np.argsort(-s, kind="mergesort")
  s_sorted, tp = s[order], np.cumsum(y[order])
  last = np.r_[np.flatnonzero(np.diff(s_sorted)), len(s) - 1]  # end of each tie group
  f1 = 2 * tp[last] / (y.sum() + last + 1)
  return float(s_sorted[last[int(np.argmax(f1))]])


def pearson_r(x: np.ndarray, y: np.ndarray) -> float:
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if x.std() == 0 or y.std() == 0:
    return float("nan")
  return float(np.corrcoef(x, y)[0, 1])
