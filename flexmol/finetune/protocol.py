"""The fine-tuning protocol: every model (the pre-trained checkpoint with LoRA, then the arms
beside it: the checkpoint fully fine-tuned, the same architecture from scratch, linear probes on
both models' frozen embeddings, ECFP4 + random forest) x every seed on the same splits, results
per run on disk as they finish (a rerun resumes), and the summary ``results.json`` with the table.

Runs are independent; under a launcher (``WORLD_SIZE`` > 1) rank r takes runs r, r + W, ...,
and rank 0 writes the summary once every rank is done.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from flexmol import config
from flexmol.finetune.config import ARMS, NEEDS_CHECKPOINT, FinetuneConfig, export_dir, selected_baselines
from flexmol.finetune.data import TaskData, load_task_data
from flexmol.finetune.split import Split, make_split
from flexmol.finetune.trainer import console


def _device(cfg: FinetuneConfig) -> torch.device:
    if cfg.device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    return torch.device(cfg.device)


PRETRAINED = ("flexmol",) + NEEDS_CHECKPOINT  # the arms that start from the checkpoint
PROBES = ("probe_flexmol", "probe_scratch")


def model_names(cfg: FinetuneConfig) -> list[str]:
    return (["flexmol"] if cfg.checkpoint else []) + selected_baselines(cfg)


def training(cfg: FinetuneConfig, name: str) -> str:
    """How arm ``name`` is trained, as the table says it."""
    if name == "flexmol":
        return f"LoRA r={cfg.lora.r}" if cfg.lora.enabled else "full"
    if name == "ecfp_rf":
        return f"ECFP{2 * cfg.rf.radius} + RF"
    return ARMS[name][0]


def model_shape(cfg: FinetuneConfig):
    """The architecture: the checkpoint's, or ``scratch_model`` when there is none."""
    from flexmol.model.summary import model_config

    if cfg.checkpoint:
        from flexmol.model.export import export_model_config

        return export_model_config(export_dir(cfg.checkpoint))
    return model_config(cfg.scratch_model, key="scratch_model")


def backbone(cfg: FinetuneConfig, pretrained: bool):
    """The pre-trained FlexMol of ``cfg.checkpoint``, or a freshly initialised one of the same shape;
    weights that cannot be allocated raise a :class:`ConfigError` naming the sizes' file or key."""
    from flexmol import load_pretrained
    from flexmol.model.summary import build_model

    if pretrained:
        return load_pretrained(export_dir(cfg.checkpoint)).train()
    return build_model(model_shape(cfg), model_source(cfg))


def model_source(cfg: FinetuneConfig) -> str:
    """Where :func:`model_shape`'s sizes come from, for errors: the file, and the config key naming it."""
    if cfg.checkpoint:
        return f"config key 'checkpoint': {export_dir(cfg.checkpoint) / 'model.yaml'}"
    return f"config key 'scratch_model': {config.resolve_resource('model', cfg.scratch_model, key='scratch_model')}"


def checkpoint_sha256(cfg: FinetuneConfig) -> str:
    """sha256 of the checkpoint's weights (read once per file version)."""
    from flexmol.model.export import cached_sha256

    return cached_sha256(export_dir(cfg.checkpoint) / "model.safetensors")


def data_fingerprint(cfg: FinetuneConfig) -> dict:
    """What identifies the data's content (a file's sha256, a named set's pinned wheel)."""
    from flexmol.finetune.data import source_fingerprint

    d = cfg.data
    return source_fingerprint(d.source, d.targets, d.smiles_column, d.id_column)


def run_digest(cfg: FinetuneConfig, name: str) -> str:
    """What model ``name``'s result for a seed depends on, and nothing else (not the device, the
    output folder, the other models or seeds): baselines run before a checkpoint exists are reused
    once it does, and a changed setting, or a changed data file, reruns only the runs it affects."""
    d = config.to_dict(cfg)
    keep = {"data": {k: v for k, v in d["data"].items() if k != "num_workers"}, "split": d["split"],
            "featurizer": d["featurizer"], "mode": d["mode"], "content": data_fingerprint(cfg)}
    if name == "ecfp_rf":
        keep["rf"] = d["rf"]
        return _digest(keep)
    if name in PROBES:
        keep["probe"] = d["probe"]
    else:
        keep.update(head=d["head"], train=d["train"])
    if name == "flexmol":
        keep["lora"] = d["lora"]
    if name in PRETRAINED:
        keep["checkpoint_sha256"] = checkpoint_sha256(cfg)
    else:  # scratch, probe_scratch: only the architecture (its initialisation is the seed's)
        keep["shape"] = config.to_dict(model_shape(cfg))
    return _digest(keep)


def _digest(keep: dict) -> str:
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_classes(labels: np.ndarray, split: Split, targets: list[str], what: str, hint: str = "") -> None:
    """ROC-AUC needs both classes: refuse a split whose validation or test part has no task with
    both, rather than report an undefined metric. ``hint``: what the user may change."""
    hint = hint or "try split.kind=random or other split.fractions"
    for part in ("train", "valid", "test"):
        y = labels[getattr(split, part)]
        if not any(len(np.unique(y[~np.isnan(y[:, t]), t])) == 2 for t in range(y.shape[1])):
            raise ValueError(f"{what}: the {part} part ({len(y)} molecules) holds one class only for every "
                             f"target {targets}; ROC-AUC is undefined there ({hint})")


def _class_hint(cfg: FinetuneConfig, data: TaskData) -> str:
    """Why a classification set may hold one class: labels other than 0/1 rejected, a set with one
    class, or a split that puts one class in a part."""
    bad = sum(r["code"] == "bad_label" for r in data.rejects)
    if bad:
        return (f"{bad} of {data.read} rows were rejected for their labels, which must be 0 or 1; "
                f"see {Path(cfg.out) / 'rejects.jsonl'}")
    if all(len(np.unique(col[~np.isnan(col)])) < 2 for col in data.labels.T):
        return "the whole set holds one class"
    return "try other split.fractions" if cfg.split.kind == "random" else \
        "try split.kind=random or other split.fractions"


def probe_features(name: str, seed: int, data: TaskData, cfg: FinetuneConfig, device, cache: dict | None = None):
    """The frozen embeddings [n, d] a probe arm fits on, with the seconds they took: the
    checkpoint's (the same for every seed, so computed once per ``cache``) or those of the
    architecture freshly initialised with ``torch.manual_seed(seed)`` — the initial backbone of
    the ``scratch`` arm's run with that seed."""
    from flexmol.finetune.probe import embeddings

    key = (name,) if name == "probe_flexmol" else (name, seed)
    if cache is not None and key in cache:
        return cache[key], 0.0
    start = time.perf_counter()
    if name == "probe_flexmol":
        model = backbone(cfg, True)
    else:
        torch.manual_seed(seed)
        model = backbone(cfg, False)
    x = embeddings(model.to(device), data, cfg.mode, cfg.train.eval_batch_size, device)
    if cache is not None:
        cache.clear()  # one model's embeddings held at a time
        cache[key] = x
    return x, time.perf_counter() - start


def _run_one(name: str, seed: int, data: TaskData, split: Split, cfg: FinetuneConfig, run_dir: Path, device,
             cache: dict | None = None) -> dict:
    metric = cfg.data.metric
    label = f"[{name} seed {seed}]"
    if name == "ecfp_rf":
        from flexmol.finetune.baselines import ecfp, random_forest_seed

        console(f"{label} ECFP{2 * cfg.rf.radius} ({cfg.rf.bits} bits) + random forest ({cfg.rf.n_estimators} trees)")
        result = random_forest_seed(ecfp(data.smiles, cfg.rf.radius, cfg.rf.bits), data.labels, split, seed,
                                    data.task, metric, cfg.rf)
    elif name in PROBES:
        from flexmol.finetune.probe import linear_probe

        x, took = probe_features(name, seed, data, cfg, device, cache)
        what = "LogisticRegression" if data.task == "classification" else "Ridge"
        console(f"{label} linear probe ({what}) on frozen {x.shape[1]}-d embeddings of the "
                f"{'pre-trained' if name == 'probe_flexmol' else 'randomly initialised'} model, mode {cfg.mode} "
                f"({len(x)} molecules embedded in {took:.1f}s)" if took else
                f"{label} linear probe ({what}) on the same frozen {x.shape[1]}-d embeddings")
        result = linear_probe(x, data.labels, split, seed, data.task, metric, cfg.probe, data.targets)
        result["embed_seconds"] = round(took, 1)
        result["seconds"] = round(result["seconds"] + took, 1)
    else:
        from flexmol.finetune.model import build_task_model, save_task_model
        from flexmol.finetune.trainer import train_seed

        torch.manual_seed(seed)  # the head's (and the scratch model's) initialisation
        pretrained = name in PRETRAINED
        lora = name == "flexmol" and cfg.lora.enabled
        model = build_task_model(
            backbone(cfg, pretrained), data.labels.shape[1], lora=lora, r=cfg.lora.r,
            alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout, target_modules=cfg.lora.target_modules,
            head_hidden=cfg.head.hidden, head_dropout=cfg.head.dropout).to(device)
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in model.parameters())
        console(f"{label} {'LoRA r=%d' % cfg.lora.r if lora else 'all weights'}"
                f"{' from the checkpoint' if pretrained else ' from a random initialisation'}: "
                f"{n_train:,} of {n_all:,} parameters trained; mode {cfg.mode}")
        result = train_seed(model, data, split, seed, cfg, metric, device, label, console)
        if cfg.save_models:
            meta = {"model": name, "seed": seed, "targets": data.targets, "task": data.task, "mode": cfg.mode,
                    "training": training(cfg, name), "checkpoint": cfg.checkpoint if pretrained else None}
            save_task_model(model, run_dir / "model", meta)
    pred = result.pop("_test_pred")
    _write_predictions(run_dir / "test_predictions.csv", data, split.test, pred)
    console(f"{label} test {metric} {result['test']:.4f} (valid {result['valid']:.4f})")
    return result


def _write_predictions(path: Path, data: TaskData, idx: np.ndarray, pred: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "smiles"] + [f"{t}" for t in data.targets] + [f"pred_{t}" for t in data.targets])
        for i, p in zip(idx, pred):
            rec = data.records[i]
            w.writerow([rec["id"], rec["smiles"], *data.labels[i].tolist(), *np.asarray(p).tolist()])


def _summary(runs: list[dict], metric: str) -> dict:
    tests = [r["test"] for r in runs]
    return {"metric": metric, "mean": float(np.mean(tests)), "std": float(np.std(tests)),
            "per_seed": tests, "valid_mean": float(np.mean([r["valid"] for r in runs])),
            "seeds": [r["seed"] for r in runs]}


def table(results: dict) -> str:
    """One row per arm, saying how it was trained and whether it started from the checkpoint."""
    metric = results["metric"]
    head = (f"{results['data']['source']} — {metric}, {results['split']['kind']} split, "
            f"{len(results['seeds'])} seeds, mode {results['mode']} (test at the best validation epoch; "
            "probes: at the best validation regularisation)")
    width = max([13] + [len(n) for n in results["models"]])
    lines = [head, f"{'model':<{width}} {'training':<12} {'pre-trained':<11} {'test':>17} {'valid':>8}  per seed"]
    for name, s in results["models"].items():
        per = " ".join(f"{v:.3f}" for v in s["per_seed"])
        pre = {True: "yes", False: "no"}.get(s.get("pretrained"), "-")
        lines.append(f"{name:<{width}} {s.get('training', ''):<12} {pre:<11} {s['mean']:>8.3f} ± {s['std']:<6.3f} "
                     f"{s['valid_mean']:>8.3f}  {per}")
    return "\n".join(lines)


def run_finetune(cfg: FinetuneConfig) -> dict:
    """Run the protocol; returns (and, on rank 0, writes) the summary."""
    import torch.distributed as dist

    out = Path(cfg.out)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    distributed = world > 1
    if distributed and not dist.is_initialized():
        dist.init_process_group("gloo")
    device = _device(cfg)
    digests = {name: run_digest(cfg, name) for name in model_names(cfg)}
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise config.ConfigError(f"config key 'out': cannot create {out} ({exc.strerror or exc})") from None
    modality = "2d" if cfg.mode == "2d" else "paired"

    def load(progress):
        d = cfg.data
        return load_task_data(d.source, d.targets, d.task, smiles_column=d.smiles_column, id_column=d.id_column,
                              modality=modality, featurizer=cfg.featurizer, limit=d.limit,
                              subsample=cfg.data.subsample, subsample_seed=cfg.data.subsample_seed,
                              workers=cfg.data.num_workers, cache_dir=out / "cache", progress=progress)

    try:
        if rank == 0:
            data = load(True)
        if distributed:  # the other ranks read rank 0's cache
            dist.barrier()
        if rank != 0:
            data = load(False)
        if not data.records:
            raise ValueError(f"{cfg.data.source}: no usable molecule ({data.summary()})")
    except BaseException:
        if created and rank == 0 and not any(p.is_file() for p in out.rglob("*")):
            shutil.rmtree(out, ignore_errors=True)  # a refused run leaves no empty --out behind
        raise
    if rank == 0:
        console(f"[finetune] {cfg.data.source}: {data.summary()}")
        with open(out / "rejects.jsonl", "w") as f:
            for r in data.rejects:
                f.write(json.dumps(r) + "\n")

    splits = {seed: make_split(cfg.split.kind, data.smiles, seed, cfg.split.fractions) for seed in cfg.seeds}
    for seed, sp in splits.items():
        empty = [part for part, n in sp.sizes().items() if n == 0]
        if empty:
            raise ValueError(f"{cfg.split.kind} split of {len(data.records)} molecules leaves {', '.join(empty)} "
                             f"empty (split.fractions={list(cfg.split.fractions)}); more molecules are needed")
    if data.task == "classification":
        for seed, sp in splits.items():
            check_classes(data.labels, sp, data.targets, f"{cfg.split.kind} split (seed {seed})",
                          _class_hint(cfg, data))
    jobs = [(name, seed) for name in model_names(cfg) for seed in cfg.seeds]
    cache: dict = {}  # the probes' embeddings
    for j, (name, seed) in enumerate(jobs):
        if j % world != rank:
            continue
        run_dir = out / "runs" / name / f"seed{seed}"
        done = run_dir / "result.json"
        if done.is_file():
            prev = json.loads(done.read_text())
            if prev.get("digest") == digests[name]:
                console(f"[{name} seed {seed}] done before: test {prev['test']:.4f} ({done})")
                continue
            console(f"[{name} seed {seed}] {done} is from another configuration; running again")
        result = _run_one(name, seed, data, splits[seed], cfg, run_dir, device, cache)
        result.update(model=name, digest=digests[name], split=splits[seed].sizes(), rank=rank)
        tmp = done.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        tmp.replace(done)
    if distributed:
        dist.barrier()
    if rank != 0:
        return {}

    metric = cfg.data.metric
    models = {}
    for name in model_names(cfg):
        runs = [json.loads((out / "runs" / name / f"seed{s}" / "result.json").read_text()) for s in cfg.seeds]
        models[name] = {**_summary(runs, metric), "training": training(cfg, name), "pretrained": ARMS[name][1]}
    first = models[model_names(cfg)[0]]
    split0 = splits[cfg.seeds[0]]
    results = {
        **first, "model": model_names(cfg)[0], "models": models,
        "data": {"source": cfg.data.source, "targets": cfg.data.targets, "task": cfg.data.task, "rows": data.read,
                 "molecules": len(data.records), "rejected": len(data.rejects),
                 "rejected_by_reason": _count(data.rejects)},
        "split": {"kind": cfg.split.kind, "fractions": list(cfg.split.fractions), **split0.sizes()},
        "mode": cfg.mode, "checkpoint": cfg.checkpoint, "lora": asdict(cfg.lora) if cfg.checkpoint else None,
        "probe": asdict(cfg.probe) if any(n in PROBES for n in models) else None,
        "digests": digests,
    }
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    tmp.replace(out / "results.json")
    (out / "table.txt").write_text(table(results) + "\n")
    return results


def _count(rejects: list[dict]) -> dict:
    counts: dict = {}
    for r in rejects:
        counts[r["code"]] = counts.get(r["code"], 0) + 1
    return counts
