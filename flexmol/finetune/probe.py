"""Linear probes: a frozen backbone's pooled molecule embedding (the one the task head sees, in
the configured input mode, eval mode, no gradients) fed to scikit-learn — logistic regression per
target for classification, ridge per target for regression — on the same splits as every other
arm. What they measure is what the backbone's weights put into the embedding, with nothing trained
but a linear map.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from flexmol.data.collate import move
from flexmol.evaluate.metrics import HIGHER_IS_BETTER, score
from flexmol.finetune.data import TaskData
from flexmol.finetune.split import Split


def embeddings(backbone, data: TaskData, mode: str, batch_size: int, device) -> np.ndarray:
    """The pooled embedding [n, d] (float32) of every molecule of ``data``, in its order: batches
    of similar-sized molecules (less padding), eval mode, no gradients; the backbone is left as it
    was found (its train/eval mode included)."""
    from flexmol.finetune.trainer import Batches

    was_training = backbone.training
    backbone.eval()
    batches = Batches(data, mode, backbone.cfg.max_spd, backbone.cfg.max_path)
    sizes = np.array([len(r["z"]) for r in batches.records])
    order = np.argsort(sizes, kind="stable")
    out = np.zeros((len(order), backbone.cfg.dim), dtype=np.float32)
    try:
        with torch.inference_mode():
            for s in range(0, len(order), batch_size):
                idx = order[s:s + batch_size]
                emb = backbone(move(batches(idx), device), decode=False)["embedding"]
                out[idx] = emb.float().cpu().numpy()
    finally:
        backbone.train(was_training)
    return out


def _fit_predict(task: str, value: float, x_train, y_train, xs, seed: int, max_iter: int):
    """Predictions for each of ``xs``, and whether the solver stopped at ``max_iter``."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression, Ridge

    if task == "classification":
        model = LogisticRegression(C=value, max_iter=max_iter, random_state=seed)
        with warnings.catch_warnings():  # counted in the run's record instead
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.fit(x_train, y_train.astype(int))
        return [model.predict_proba(x)[:, 1] for x in xs], bool(np.max(model.n_iter_) >= max_iter)
    model = Ridge(alpha=value)
    model.fit(x_train, y_train)
    return [model.predict(x) for x in xs], False


def _best(metric: str, scores: list[float]) -> int | None:
    """Index of the best defined score; ties go to the earlier grid value."""
    best = None
    for i, s in enumerate(scores):
        if np.isnan(s):
            continue
        if best is None or (s > scores[best] if HIGHER_IS_BETTER[metric] else s < scores[best]):
            best = i
    return best


def linear_probe(x: np.ndarray, y: np.ndarray, split: Split, seed: int, task: str, metric: str, probe,
                 targets: list[str]) -> dict:
    """One linear model per target on ``x`` (features standardised with the training part's
    statistics), fitted on the training molecules that have that target's label, for every value
    of the grid (``probe.c_grid``: LogisticRegression's C; ``probe.alpha_grid``: Ridge's alpha);
    the value kept for a target is the one with the best validation metric on it (where that is
    undefined — one class in the validation part — the best on the validation metric of all
    targets together), and valid/test are reported at the values kept. A target without the
    labels to fit (one class among its training labels; no training label) is predicted as that
    class (0.5, or 0 for regression, without any) and scored like every other arm's prediction.
    The chosen values and every validation score go into the run's record."""
    from sklearn.preprocessing import StandardScaler

    start = time.perf_counter()
    key = "C" if task == "classification" else "alpha"
    grid = list(probe.c_grid if task == "classification" else probe.alpha_grid)
    scaler = StandardScaler().fit(x[split.train])
    xv, xt = (scaler.transform(x[getattr(split, p)]) for p in ("valid", "test"))
    y_valid = y[split.valid]
    n_t = y.shape[1]
    # predictions[g]: valid and test predictions of every target at grid value g
    valid = np.zeros((len(grid), len(split.valid), n_t))
    test = np.zeros((len(grid), len(split.test), n_t))
    constant, not_converged = {}, []
    for t in range(n_t):
        rows = split.train[~np.isnan(y[split.train, t])]
        classes = np.unique(y[rows, t])
        if len(classes) < (2 if task == "classification" else 1):
            constant[targets[t]] = float(classes[0]) if len(classes) else (0.5 if task == "classification" else 0.0)
            valid[:, :, t] = test[:, :, t] = constant[targets[t]]
            continue
        x_train = scaler.transform(x[rows])
        for g, value in enumerate(grid):
            (valid[g, :, t], test[g, :, t]), capped = _fit_predict(task, value, x_train, y[rows, t], [xv, xt], seed,
                                                                   probe.max_iter)
            if capped:
                not_converged.append({"target": targets[t], key: value})
    joint = [score(metric, y_valid, valid[g]) for g in range(len(grid))]
    fallback = _best(metric, joint)
    fallback = 0 if fallback is None else fallback
    chosen, per_target = [], {}
    for t in range(n_t):
        scores = [score(metric, y_valid[:, t:t + 1], valid[g, :, t:t + 1]) for g in range(len(grid))]
        g = _best(metric, scores)
        chosen.append(fallback if g is None else g)
        per_target[targets[t]] = [None if np.isnan(s) else s for s in scores]
    pick = np.array(chosen)
    cols = np.arange(n_t)
    valid_pred, test_pred = valid[pick, :, cols].T, test[pick, :, cols].T  # [n, T]
    return {"seed": seed, "valid": score(metric, y_valid, valid_pred), "test": score(metric, y[split.test], test_pred),
            "seconds": round(time.perf_counter() - start, 1),
            "probe": {"model": "LogisticRegression" if task == "classification" else "Ridge", "param": key,
                      "grid": grid, "chosen": {targets[t]: grid[g] for t, g in enumerate(chosen)
                                               if targets[t] not in constant},
                      "valid_by_value": per_target, "valid_joint_by_value": [None if np.isnan(s) else s for s in joint],
                      "constant": constant, "not_converged": not_converged},
            "_test_pred": test_pred}
