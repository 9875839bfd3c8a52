"""Test metrics, multi-task aware: a missing label (NaN) is ignored, and the metric is the mean over
tasks (for ROC-AUC, over the tasks whose labels in the set hold both classes)."""
from __future__ import annotations

import math

import numpy as np

HIGHER_IS_BETTER = {"roc_auc": True, "rmse": False, "mae": False}


def roc_auc(y: np.ndarray, score: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    y, score = np.atleast_2d(y.T).T, np.atleast_2d(score.T).T
    values = []
    for t in range(y.shape[1]):
        m = ~np.isnan(y[:, t])
        if m.any() and len(np.unique(y[m, t])) == 2:
            values.append(roc_auc_score(y[m, t], score[m, t]))
    return float(np.mean(values)) if values else math.nan


def _per_task(y, pred, fn) -> float:
    y, pred = np.atleast_2d(y.T).T, np.atleast_2d(pred.T).T
    values = [fn(y[m, t] - pred[m, t]) for t in range(y.shape[1]) if (m := ~np.isnan(y[:, t])).any()]
    return float(np.mean(values)) if values else math.nan


def rmse(y: np.ndarray, pred: np.ndarray) -> float:
    return _per_task(y, pred, lambda e: float(np.sqrt(np.mean(e ** 2))))


def mae(y: np.ndarray, pred: np.ndarray) -> float:
    return _per_task(y, pred, lambda e: float(np.mean(np.abs(e))))


METRICS = {"roc_auc": roc_auc, "rmse": rmse, "mae": mae}


def score(metric: str, y: np.ndarray, pred: np.ndarray) -> float:
    return METRICS[metric](y, pred)


def better(metric: str, new: float, old: float | None) -> bool:
    if math.isnan(new):
        return False
    if old is None or math.isnan(old):
        return True
    return new > old if HIGHER_IS_BETTER[metric] else new < old
