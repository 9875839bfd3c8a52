"""One fine-tuning run (one model, one split, one seed): epochs over the training part, the metric
on validation and test after each, early stopping on validation, the test metric reported at the
best validation epoch and that epoch's weights kept."""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from flexmol.data.collate import collate, move
from flexmol.evaluate.metrics import better, score
from flexmol.finetune.data import TaskData
from flexmol.finetune.model import BATCH_MODALITY, TaskModel, trainable_state
from flexmol.finetune.split import Split
from flexmol.train.schedule import lr_factor


@dataclass
class Standardizer:
    """Regression targets as (y - mean) / std with train-part statistics, per task."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, y: np.ndarray) -> "Standardizer":
        mean = np.nanmean(y, axis=0)
        std = np.nanstd(y, axis=0)
        return cls(np.nan_to_num(mean), np.where(np.nan_to_num(std) > 0, std, 1.0))

    def forward(self, y):
        return (y - self.mean) / self.std

    def inverse(self, y):
        return y * self.std + self.mean


class Batches:
    """Collated batches of a part of the set, in the input mode's modality."""

    def __init__(self, data: TaskData, mode: str, max_spd: int, max_path: int):
        modality = BATCH_MODALITY[mode]
        self.records = [r if r["modality"] == modality else {**r, "modality": modality} for r in data.records]
        self.max_spd, self.max_path = max_spd, max_path

    def __call__(self, idx) -> dict:
        return collate([self.records[i] for i in idx], self.max_spd, self.max_path)


def epoch_batches(train: np.ndarray, sizes: np.ndarray, batch_size: int, bucket: int, rng) -> list[np.ndarray]:
    """One epoch's batches: a random permutation; with ``bucket`` > 1, each run of ``bucket``
    batches is sorted by molecule size before it is cut (less padding: a batch is as wide as its
    largest molecule), and the batches are shuffled again."""
    perm = rng.permutation(train)
    if bucket > 1:
        span = batch_size * bucket
        runs = np.split(perm, range(span, len(perm), span))
        perm = np.concatenate([c[np.argsort(sizes[c], kind="stable")] for c in runs])
    out = [perm[s:s + batch_size] for s in range(0, len(perm), batch_size)]
    if bucket > 1:
        out = [out[i] for i in rng.permutation(len(out))]
    return out


def predict(model: TaskModel, batches: Batches, idx: np.ndarray, batch_size: int, device) -> np.ndarray:
    model.eval()
    order = np.argsort([len(batches.records[i]["z"]) for i in idx], kind="stable")  # less padding
    outs = []
    with torch.no_grad():
        for s in range(0, len(idx), batch_size):
            outs.append(model(move(batches(idx[order[s:s + batch_size]]), device)).float().cpu().numpy())
    if not outs:
        return np.zeros((0, 1))
    pred = np.empty_like(np.concatenate(outs))
    pred[order] = np.concatenate(outs)
    return pred


def _loss(logits, y, task):
    mask = ~torch.isnan(y)
    target = torch.nan_to_num(y)
    if task == "classification":
        per = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    else:
        per = (logits - target) ** 2
    return (per * mask).sum() / mask.sum().clamp(min=1)


def train_seed(model: TaskModel, data: TaskData, split: Split, seed: int, cfg, metric: str, device,
               label: str = "", log=None) -> dict:
    """Train ``model`` on ``split.train``; returns the run's record (metrics at the best validation
    epoch, per-epoch history) and leaves the best epoch's weights in ``model``."""
    t = cfg.train
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    shape = base_model(model).cfg
    batches = Batches(data, cfg.mode, shape.max_spd, shape.max_path)
    task = data.task
    y_all = data.labels
    scaler = Standardizer.fit(y_all[split.train]) if task == "regression" else None
    y_train = scaler.forward(y_all) if scaler else y_all

    head = [p for p in model.head.parameters() if p.requires_grad]
    body = [p for p in model.backbone.parameters() if p.requires_grad]
    groups = [{"params": body, "lr": t.lr}, {"params": head, "lr": t.head_lr or t.lr}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=t.weight_decay)
    steps_per_epoch = math.ceil(len(split.train) / t.batch_size)
    total = steps_per_epoch * t.epochs
    warmup = max(1, int(t.warmup_ratio * total))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, warmup, total, "linear", 0.0))

    def evaluate(idx):
        pred = predict(model, batches, idx, t.eval_batch_size, device)
        if scaler:
            pred = scaler.inverse(pred)
        else:
            pred = 1 / (1 + np.exp(-pred))
        return score(metric, y_all[idx], pred), pred

    sizes = np.array([len(r["z"]) for r in data.records])
    best, best_state, best_pred, best_epoch, since, history = None, None, None, -1, 0, []
    start = time.perf_counter()
    for epoch in range(t.epochs):
        model.train()
        losses = []
        for idx in epoch_batches(split.train, sizes, t.batch_size, t.bucket, rng):
            batch = move(batches(idx), device)
            y = torch.as_tensor(y_train[idx], dtype=torch.float32, device=device)
            loss = _loss(model(batch).float(), y, task)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if t.grad_clip:
                torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], t.grad_clip)
            opt.step()
            sched.step()
            losses.append(loss.item())
        valid, _ = evaluate(split.valid)
        test, test_pred = evaluate(split.test)
        history.append({"epoch": epoch, "loss": float(np.mean(losses)), "valid": valid, "test": test})
        if better(metric, valid, best):
            best, best_epoch, since = valid, epoch, 0
            best_state, best_pred = trainable_state(model), test_pred
        else:
            since += 1
        if log:
            log(f"{label} epoch {epoch + 1}/{t.epochs} loss {np.mean(losses):.4f} valid {metric} {valid:.4f} "
                f"test {test:.4f} (best epoch {best_epoch + 1}) {time.perf_counter() - start:.0f}s")
        if since >= t.patience:
            break
    if best_state is None:  # validation metric undefined at every epoch: the last epoch stands
        best_epoch, best_pred = len(history) - 1, test_pred
    else:
        model.load_state_dict(best_state, strict=False)
    return {"seed": seed, "best_epoch": best_epoch + 1, "epochs_run": len(history), "valid": best,
            "test": history[best_epoch]["test"], "seconds": round(time.perf_counter() - start, 1),
            "history": history, "_test_pred": best_pred}


def base_model(model: TaskModel):
    """The FlexMol under the task model (inside peft's wrapper when there are adapters)."""
    body = model.backbone
    return body.get_base_model() if hasattr(body, "get_base_model") else body


def console(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
