"""Evaluation metrics of the fine-tuning tasks, in float64 numpy (task_data re-exports them).

Classification (gold and pred are integer class ids): confusion, accuracy, macro_f1, class_f1,
mcc, per_class_report, class_table. Regression: pearson, spearman (average_ranks). final_split
reads a summary record's test (or validation) numbers.
"""

from typing import Any, Sequence

import numpy as np


def confusion(gold, pred, n: int) -> np.ndarray:
  """Returns the (n, n) int64 confusion matrix: rows are gold classes, columns predictions."""
  gold = np.asarray(gold, np.int64).reshape(-1)
  pred = np.asarray(pred, np.int64).reshape(-1)
  if gold.shape != pred.shape:
    raise ValueError(f'confusion: {gold.size} gold labels but {pred.size} predictions')
  return np.bincount(gold * n + pred, minlength=n * n).reshape(n, n)


def accuracy(gold, pred) -> float:
  """Returns the fraction of predictions equal to gold (0.0 when there are none)."""
  gold, pred = np.asarray(gold).reshape(-1), np.asarray(pred).reshape(-1)
  return float(np.mean(gold == pred)) if gold.size else 0.0


def _prf(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Returns per-class precision, recall, F1, support and 'present' (in gold or predictions)."""
  tp = np.diag(cm).astype(np.float64)
  support, predicted = cm.sum(1), cm.sum(0)
  precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
  recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
  denom = precision + recall
  f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
  return precision, recall, f1, support, (support + predicted) > 0


def macro_f1(gold, pred, n: int) -> float:
  """Returns the mean F1 over the classes that occur in gold or in the predictions."""
  *_, f1, _, present = _prf(confusion(gold, pred, n))
  return float(f1[present].mean()) if present.any() else 0.0


def class_f1(gold, pred, n: int, k: int) -> float:
  """Returns the F1 of class k alone (binary F1 with k the positive class, as GLUE's MRPC/QQP)."""
  return float(_prf(confusion(gold, pred, n))[2][k])


def mcc(gold, pred, n: int) -> float:
  """Returns the Matthews correlation coefficient (Gorodkin's R_K for n > 2); 0.0 when undefined.

  With C the confusion matrix, s its total, c its trace, t its row sums and p its column sums:
  (c s - p.t) / sqrt((s^2 - p.p) (s^2 - t.t)); constant gold or predictions give 0.0.
  """
  cm = confusion(gold, pred, n).astype(np.float64)
  s, c = cm.sum(), np.trace(cm)
  t, p = cm.sum(1), cm.sum(0)
  denom = (s * s - p @ p) * (s * s - t @ t)
  return float((c * s - p @ t) / np.sqrt(denom)) if denom > 0 else 0.0


def average_ranks(x) -> np.ndarray:
  """Returns the float64 ranks 1..N of x, tied values sharing the mean of their ranks."""
  x = np.asarray(x, np.float64).reshape(-1)
  order = np.argsort(x, kind='stable')
  sorted_x = x[order]
  starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
  ends = np.r_[starts[1:], x.size]
  ranks = np.empty(x.size, np.float64)
  ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
  return ranks


def pearson(x, y) -> float:
  """Returns Pearson's r of x and y in float64; 0.0 when either is constant or has < 2 values."""
  x = np.asarray(x, np.float64).reshape(-1)
  y = np.asarray(y, np.float64).reshape(-1)
  if x.shape != y.shape:
    raise ValueError(f'pearson: {x.size} values against {y.size}')
  if x.size < 2:
    return 0.0
  dx, dy = x - x.mean(), y - y.mean()
  denom = np.sqrt((dx @ dx) * (dy @ dy))
  return float(np.clip((dx @ dy) / denom, -1.0, 1.0)) if denom > 0 else 0.0


def spearman(x, y) -> float:
  """Returns Spearman's rho: Pearson's r of the average ranks (0.0 when either is constant)."""
  return pearson(average_ranks(x), average_ranks(y))


def per_class_report(gold, pred, names: Sequence[str]) -> dict[str, dict[str, float]]:
  """Returns {name: precision, recall, f1, support} for the classes in gold or predictions."""
  precision, recall, f1, support, present = _prf(confusion(gold, pred, len(names)))
  return {names[k]: {'precision': float(precision[k]), 'recall': float(recall[k]),
                     'f1': float(f1[k]), 'support': int(support[k])}
          for k in np.flatnonzero(present)}


def class_table(per_class: dict[str, dict[str, float]], indent: str = '  ') -> list[str]:
  """Returns the lines of a precision / recall / F1 / support table."""
  width = max([len('class')] + [len(k) for k in per_class])
  lines = [f'{indent}{"class":<{width}}  precision  recall      f1  support']
  for name, m in per_class.items():
    lines.append(f'{indent}{name:<{width}}  {m["precision"]:9.3f}  {m["recall"]:6.3f}  '
                 f'{m["f1"]:6.3f}  {int(m["support"]):7d}')
  return lines


def final_split(record: dict[str, Any], key: str = 'accuracy'
                ) -> tuple[str, dict[str, Any]] | None:
  """Returns ('test' or 'val', its metrics without prefix) of the first split with `key`, or None."""
  for split, prefix in (('test', 'test/'), ('val', 'eval/')):
    found = {k[len(prefix):]: v for k, v in record.items() if k.startswith(prefix)}
    if key in found:
      return split, found
  return None
