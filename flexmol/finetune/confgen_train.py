"""``flexmol finetune-confgen``: fine-tune a pre-trained FlexMol to move RDKit conformers onto
reference geometries (:mod:`flexmol.finetune.confgen`), on the molecules of a train split only.

Every input conformer of a training molecule is one example; its target is the molecule's
reference nearest to that input conformer after superposition, over the reference's relabellings
by the graph's symmetries (fixed when the data are made: with one reference per molecule, as in
QM9, it is that one, its symmetric atoms matched to the input's). Every weight of the backbone and its
heads is trained (AdamW, linear warm-up then cosine decay), on batches filled up to an atom
budget. The 2D-only path trains on the same references, the one nearest to its prediction (its
distance-head distances and its refined coordinates; ``loss.two_d`` weighs it, 0 leaves it out). Every ``train.eval_every`` steps
the validation molecules' mean heavy-atom RMSD after superposition is measured for the refined
inputs and the 2D-only path, beside the inputs' own; the weights with the best refined RMSD are
the ones saved. Writes OUT/: the model (:func:`~flexmol.finetune.confgen.save_conformer_model`),
``metrics.jsonl``, ``rejects.jsonl``, the input-conformer cache.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch

from flexmol import config
from flexmol.config import ConfigError

DEFAULT_CONFIG = config.resolve_resource("finetune", "confgen")
PATH_KEYS = ("checkpoint", "data.source", "data.exclude", "data.cache_dir")


@dataclass
class DataSection:
    source: str = "qm9"  # qm9, or an SDF of reference conformers (records of one molecule grouped by InChIKey)
    start: int = 50000  # rows [start, stop) of the source, every stride-th
    stop: Optional[int] = 100000  # null: to the end
    stride: int = 5  # QM9's rows follow its enumeration: neighbours are near-copies
    exclude: List[str] = field(default_factory=list)  # dataset dirs or InChIKey files: never trained on
    val_fraction: float = 0.05  # of the molecules (by InChIKey), for validation
    split_seed: int = 0
    workers: int = 2  # processes featurising and embedding
    cache_dir: Optional[str] = None  # the input conformers' cache (inputs.npz); null: out. Runs may share it


@dataclass
class InputSection:
    num_confs: int = 4  # seeded ETKDGv3 input conformers per molecule
    mmff: bool = True  # MMFF94-optimised (ETKDG + MMFF is the baseline to beat)
    seed: int = 0  # per molecule: molecule_seed(seed, InChIKey), as flexmol evaluate confgen seeds its ETKDG
    embed_timeout_s: float = 10.0


@dataclass
class LossSection:
    kind: str = "mse"  # l1 | mse, for both terms
    distance: float = 1.0  # weight of the pair-distance term
    coord: float = 1.0  # weight of the superposed-coordinate term
    two_d: float = 0.5  # weight of the 2D-only path's terms; 0 leaves the path untrained


@dataclass
class TrainSection:
    steps: int = 3000
    lr: float = 4.0e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    max_atoms: int = 512  # padded atoms per batch (batch size x its largest molecule)
    seed: int = 0
    threads: int = 2  # torch CPU threads
    eval_every: int = 250  # steps between validations (and at the end)
    log_every: int = 50  # steps between progress lines


@dataclass
class ConfgenTaskConfig:
    checkpoint: str = ""  # a pre-trained export (or a pre-training output_dir holding export/)
    passes: int = 1  # coordinate-head passes, each re-encoding the moved coordinates
    data: DataSection = field(default_factory=DataSection)
    input: InputSection = field(default_factory=InputSection)
    loss: LossSection = field(default_factory=LossSection)
    train: TrainSection = field(default_factory=TrainSection)
    device: str = "cpu"  # cpu | cuda | cuda:N
    out: str = "outputs/finetune-confgen"


def load(*sources, overrides: Optional[List[str]] = None) -> ConfgenTaskConfig:
    cfg = config.build(ConfgenTaskConfig, *sources, overrides=overrides)
    validate(cfg)
    return cfg


def validate(cfg: ConfgenTaskConfig) -> None:
    from flexmol.finetune.config import check_export, check_out, device_problem
    from flexmol.finetune.confgen import LOSS_KINDS

    def fail(key, why):
        raise ConfigError(f"config key '{key}': {why}")

    if not cfg.checkpoint:
        fail("checkpoint", "is required (a pre-trained export; --checkpoint)")
    if cfg.passes < 1:
        fail("passes", f"must be at least 1, got {cfg.passes}")
    d = cfg.data
    if not d.source:
        fail("data.source", "is required (qm9 or an SDF of reference conformers)")
    from flexmol.data.sources import SourceError, open_source

    try:
        open_source(d.source)
    except SourceError as exc:
        fail("data.source", str(exc))
    for entry in d.exclude:
        if not Path(entry).exists():
            fail("data.exclude", f"{entry}: no such dataset directory or InChIKey file")
    if d.start < 0:
        fail("data.start", f"must be 0 or more, got {d.start}")
    if d.stop is not None and d.stop <= d.start:
        fail("data.stop", f"must be more than data.start ({d.start}), got {d.stop}")
    if d.stride < 1:
        fail("data.stride", f"must be at least 1, got {d.stride}")
    if d.cache_dir:
        try:
            check_out(d.cache_dir)
        except ConfigError as exc:
            fail("data.cache_dir", str(exc).removeprefix("config key 'out': "))
    if not 0 <= d.val_fraction < 1:
        fail("data.val_fraction", f"must be in [0, 1), got {d.val_fraction}")
    if d.workers < 0:
        fail("data.workers", f"must be 0 or more (0 and 1: in this process), got {d.workers}")
    i = cfg.input
    if not 1 <= i.num_confs <= config.MAX_CONFORMERS:
        fail("input.num_confs", f"must be between 1 and {config.MAX_CONFORMERS}, got {i.num_confs}")
    if i.seed < 0:
        fail("input.seed", f"must be 0 or more, got {i.seed}")
    if not (math.isfinite(i.embed_timeout_s) and 0 <= i.embed_timeout_s <= config.MAX_SECONDS):
        fail("input.embed_timeout_s", f"{i.embed_timeout_s} is not a number of seconds between 0 and "
                                      f"{config.MAX_SECONDS:g}")
    if cfg.loss.kind not in LOSS_KINDS:
        fail("loss.kind", f"'{cfg.loss.kind}' is not one of {', '.join(LOSS_KINDS)}")
    for key in ("distance", "coord", "two_d"):
        value = getattr(cfg.loss, key)
        if not (math.isfinite(value) and value >= 0):
            fail(f"loss.{key}", f"must be a weight of 0 or more, got {value}")
    if cfg.loss.distance == 0 and cfg.loss.coord == 0:
        fail("loss.coord", "loss.distance and loss.coord are both 0: nothing to train")
    t = cfg.train
    for key in ("steps", "max_atoms", "threads", "eval_every", "log_every"):
        if getattr(t, key) < 1:
            fail(f"train.{key}", f"must be at least 1, got {getattr(t, key)}")
    if not (math.isfinite(t.lr) and t.lr > 0):
        fail("train.lr", f"must be positive, got {t.lr}")
    for key in ("warmup_steps", "weight_decay", "grad_clip", "seed"):
        if not getattr(t, key) >= 0:
            fail(f"train.{key}", f"must be 0 or more, got {getattr(t, key)}")
    why = device_problem(cfg.device)
    if why:
        fail("device", why)
    if not cfg.out:
        fail("out", "is required (the output directory)")
    check_out(cfg.out)
    cfg.checkpoint = str(check_export(cfg.checkpoint))


# ---------------------------------------------------------------------------------------- training

def _batches(examples: list[tuple[int, int]], sizes: np.ndarray, max_atoms: int, rng) -> list[list]:
    """One pass over ``examples`` (molecule, conformer) in a random order, cut into batches whose
    padded size (count x largest molecule) stays within ``max_atoms`` (one example at least)."""
    out, batch, widest = [], [], 0
    for e in rng.permutation(len(examples)):
        m, k = examples[e]
        n = int(sizes[m])
        if batch and (len(batch) + 1) * max(widest, n) > max_atoms:
            out.append(batch)
            batch, widest = [], 0
        batch.append((m, k))
        widest = max(widest, n)
    if batch:
        out.append(batch)
    return out


def _padded(arrays: list[np.ndarray], mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, N, 3] of [n_b, 3] arrays, zero-padded to the atoms of ``mask`` [B, N], on its device."""
    out = torch.zeros(*mask.shape, 3, dtype=dtype)
    for b, a in enumerate(arrays):
        out[b, : len(a)] = torch.as_tensor(a)
    return out.to(mask.device)


def step_loss(model, molecules, batch_items, cfg: ConfgenTaskConfig) -> dict:
    """The loss of one batch of (molecule, conformer) examples: the refined inputs against their
    targets, plus (``loss.two_d`` > 0) the 2D-only path on the batch's distinct molecules."""
    from flexmol.finetune.confgen import batch_of, confgen_loss

    lc = cfg.loss
    mols = [molecules[m] for m, _ in batch_items]
    batch = batch_of(model, [x.record for x in mols], [x.inputs[k] for x, (_, k) in zip(mols, batch_items)])
    ref = _padded([x.targets[k] for x, (_, k) in zip(mols, batch_items)], batch["mask"],
                  batch["pos"].dtype)
    pred = model.refine(batch, batch["pos"])
    out = confgen_loss(pred, ref, batch["mask"], lc.kind, lc.distance, lc.coord)
    if lc.two_d > 0:
        distinct = [molecules[m] for m in dict.fromkeys(m for m, _ in batch_items)]
        graphs = batch_of(model, [x.record for x in distinct])
        dist = model.pair_distances(graphs)
        start = model.mds_start(graphs, [x.mol for x in distinct], dist)
        pred2 = model.refine(graphs, start.to(batch["pos"].dtype))
        # the 2D path's target: the reference (relabelled) nearest to its prediction
        pos2 = pred2.detach().cpu().numpy()
        ref2 = _padded([x.nearest(pos2[b, :len(x.record["z"])]) for b, x in enumerate(distinct)], graphs["mask"],
                       batch["pos"].dtype)
        two = confgen_loss(pred2, ref2, graphs["mask"], lc.kind, lc.distance, lc.coord)
        mask = graphs["mask"]
        pairs = (mask.unsqueeze(-1) & mask.unsqueeze(-2)).to(dist.dtype).triu(1)
        delta = ref2.unsqueeze(2) - ref2.unsqueeze(1)
        err = dist - ((delta * delta).sum(-1) + 1e-12).sqrt()
        err = err.abs() if lc.kind == "l1" else err * err
        head = ((err * pairs).sum((1, 2)) / pairs.sum((1, 2)).clamp(min=1)).mean()
        out["two_d_loss"] = two["loss"] + lc.distance * head  # the distance head's own term
        out["two_d_rmsd"] = two["rmsd"]
        out["loss"] = out["loss"] + lc.two_d * out["two_d_loss"]
    return out


@torch.no_grad()
def validate_rmsd(model, molecules, max_atoms: int, two_d: bool = True, inputs: dict | None = None) -> dict:
    """Heavy-atom RMSDs (Å, after superposition, to the nearest reference over the graph's
    symmetries: :func:`~flexmol.finetune.confgen_data.reference_rmsd`) on ``molecules``:
    ``refined`` (the refined input conformers; mean over a molecule's conformers, then over the
    molecules), ``refined_best`` (each molecule's best conformer, as MAT counts it), the same of the
    inputs themselves (``inputs``, ``inputs_best``: :func:`inputs_rmsd`, or ``inputs`` when the
    caller has them) and (``two_d``) ``two_d``, the 2D-only path's."""
    from flexmol.finetune.confgen import batch_of
    from flexmol.finetune.confgen_data import reference_rmsd

    model.eval()
    examples = [(m, k) for m, x in enumerate(molecules) for k in range(len(x.inputs))]
    sizes = np.array([len(x.record["z"]) for x in molecules])
    refined = {m: [] for m in range(len(molecules))}
    for items in _batches(examples, sizes, max_atoms, np.random.default_rng(0)):
        mols = [molecules[m] for m, _ in items]
        batch = batch_of(model, [x.record for x in mols], [x.inputs[k] for x, (_, k) in zip(mols, items)])
        pred = model.refine(batch, batch["pos"]).float().cpu().numpy()
        for b, (m, _) in enumerate(items):
            refined[m].append(reference_rmsd(pred[b, :sizes[m]], molecules[m]))
    out = {"refined": float(np.mean([np.mean(v) for v in refined.values()])),
           "refined_best": float(np.mean([np.min(v) for v in refined.values()])),
           **(inputs_rmsd(molecules) if inputs is None else inputs)}
    if two_d:
        values = []
        for items in _batches([(m, 0) for m in range(len(molecules))], sizes, max_atoms, np.random.default_rng(0)):
            mols = [molecules[m] for m, _ in items]
            graphs = batch_of(model, [x.record for x in mols])
            pred = model.from_graph(graphs, [x.mol for x in mols]).float().cpu().numpy()
            values += [reference_rmsd(pred[b, :len(x.record["z"])], x) for b, x in enumerate(mols)]
        out["two_d"] = float(np.mean(values))
    model.train()
    return out


def inputs_rmsd(molecules) -> dict:
    """:func:`validate_rmsd`'s ``inputs`` and ``inputs_best`` (the input conformers themselves:
    what the model must improve on)."""
    from flexmol.finetune.confgen_data import reference_rmsd

    per = [[reference_rmsd(c, x) for c in x.inputs] for x in molecules]
    return {"inputs": float(np.mean([np.mean(v) for v in per])), "inputs_best": float(np.mean([np.min(v) for v in per]))}


def _eta(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def train_loop(model, opt, train, examples, cfg: ConfgenTaskConfig, rng, write, evaluate, log) -> float:
    """``train.steps`` optimiser steps over ``examples`` ((molecule, conformer) of ``train``): the
    learning-rate schedule, gradient clipping, a progress line and a ``metrics.jsonl`` entry
    (``write``) every ``train.log_every`` steps, ``evaluate(step)`` every ``train.eval_every``
    steps and at the end. Returns the wall time, s."""
    from flexmol.train.schedule import lr_factor

    sizes = np.array([len(x.record["z"]) for x in train])
    two_d = cfg.loss.two_d > 0
    started = time.perf_counter()
    step, queue, running = 0, [], {}
    while step < cfg.train.steps:
        if not queue:
            queue = _batches(examples, sizes, cfg.train.max_atoms, rng)
        items = queue.pop()
        for g in opt.param_groups:
            g["lr"] = cfg.train.lr * lr_factor(step, cfg.train.warmup_steps, cfg.train.steps, "cosine", 0.0)
        terms = step_loss(model, train, items, cfg)
        if not torch.isfinite(terms["loss"]):
            raise ValueError(f"the loss is {terms['loss'].item()} at step {step}: lower train.lr")
        opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        if cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        step += 1
        for k, v in terms.items():
            running[k] = running.get(k, 0.0) + float(v.detach())
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            count = step % cfg.train.log_every or cfg.train.log_every
            mean = {k: v / count for k, v in running.items()}
            running = {}
            elapsed = time.perf_counter() - started
            write({"step": step, "lr": opt.param_groups[0]["lr"], **mean, "elapsed_s": round(elapsed, 2)})
            log(f"[finetune-confgen] step {step}/{cfg.train.steps} loss {mean['loss']:.4f} rmsd {mean['rmsd']:.3f} A"
                + (f" 2D-only rmsd {mean['two_d_rmsd']:.3f} A" if two_d else "")
                + f" | {_eta(elapsed)} elapsed, ETA {_eta(elapsed / step * (cfg.train.steps - step))}")
        if step % cfg.train.eval_every == 0 or step == cfg.train.steps:
            evaluate(step)
    return time.perf_counter() - started


def run_finetune_confgen(cfg: ConfgenTaskConfig, log=print) -> dict:
    """Data, fine-tuning and the saved model in ``cfg.out``; returns the model's ``task.json``."""
    from flexmol.finetune.confgen import ConformerModel, save_conformer_model
    from flexmol.finetune.confgen_data import generator, load_data, split_keys
    from flexmol.model.export import cached_sha256, load_pretrained

    started = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    # an earlier run's model in this directory is not this run's: it goes before anything is written
    from flexmol.finetune.confgen import TASK_FILE

    (out / TASK_FILE).unlink(missing_ok=True)
    torch.set_num_threads(cfg.train.threads)
    data = load_data(cfg, out, log)
    with open(out / "rejects.jsonl", "w") as f:
        for r in data.rejects:
            f.write(json.dumps(r) + "\n")
    train_keys, val_keys = split_keys([x.key for x in data.molecules], cfg.data.val_fraction, cfg.data.split_seed)
    val_set = set(val_keys)
    train = [x for x in data.molecules if x.key not in val_set]
    val = [x for x in data.molecules if x.key in val_set]
    log(f"[finetune-confgen] {data.counts['rows_read']} rows -> {len(data.molecules)} molecules "
        f"({len(train)} train, {len(val)} validation); {len(data.rejects)} rejected (see {out / 'rejects.jsonl'})")
    prep_s = time.perf_counter() - started

    torch.manual_seed(cfg.train.seed)
    rng = np.random.default_rng(cfg.train.seed)
    device = torch.device(cfg.device)
    model = ConformerModel(load_pretrained(cfg.checkpoint, _stacklevel=3), cfg.passes).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    examples = [(m, k) for m, x in enumerate(train) for k in range(len(x.inputs))]
    best = {"step": 0, "refined": math.inf}
    best_state = None
    val_inputs = inputs_rmsd(val) if val else None

    def evaluate(step: int) -> None:
        nonlocal best_state
        if not val:
            return
        v = validate_rmsd(model, val, cfg.train.max_atoms, inputs=val_inputs)
        write({"step": step, **{f"val_{k}": x for k, x in v.items()}})
        mark = ""
        if v["refined"] < best["refined"]:
            best.update(step=step, **v)
            best_state = {k: t.detach().clone() for k, t in model.state_dict().items()}
            mark = " (best)"
        log(f"[finetune-confgen] step {step}: validation RMSD refined {v['refined']:.4f} A (best of "
            f"{cfg.input.num_confs} {v['refined_best']:.4f}), inputs {v['inputs']:.4f} A ({v['inputs_best']:.4f}), "
            f"2D-only {v['two_d']:.4f} A{mark}")

    last = {"step": 0}
    loop_started = time.perf_counter()
    interrupted = None
    with open(out / "metrics.jsonl", "w") as metrics:
        def write(entry: dict) -> None:
            last["step"] = max(last["step"], entry.get("step", 0))
            metrics.write(json.dumps(entry) + "\n")
            metrics.flush()

        evaluate(0)
        try:
            train_s = train_loop(model, opt, train, examples, cfg, rng, write, evaluate, log)
        except KeyboardInterrupt as exc:  # keep what was learnt: the best validated weights so far
            interrupted, train_s = exc, time.perf_counter() - loop_started
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    meta = {
        "checkpoint": str(Path(cfg.checkpoint).resolve()),
        "checkpoint_sha256": cached_sha256(Path(cfg.checkpoint) / "model.safetensors"),
        "input": generator(cfg),
        "data": {"source": cfg.data.source, "start": cfg.data.start, "stop": cfg.data.stop, "stride": cfg.data.stride,
                 "exclude": [str(e) for e in cfg.data.exclude], "val_fraction": cfg.data.val_fraction,
                 "split_seed": cfg.data.split_seed},
        "counts": {**data.counts, "train_examples": len(examples)},
        "target": "each input conformer's nearest reference after superposition, over the graph's symmetries",
        "loss": {"kind": cfg.loss.kind, "distance": cfg.loss.distance, "coord": cfg.loss.coord,
                 "two_d": cfg.loss.two_d},
        "train": {"steps": cfg.train.steps, "lr": cfg.train.lr, "warmup_steps": cfg.train.warmup_steps,
                  "max_atoms": cfg.train.max_atoms, "seed": cfg.train.seed, "threads": cfg.train.threads,
                  "best_step": best["step"] if val else cfg.train.steps,
                  "prepare_wall_s": round(prep_s, 1), "train_wall_s": round(train_s, 1)},
        "validation": {k: best.get(k) for k in ("refined", "refined_best", "inputs", "inputs_best", "two_d")}
        if val else None,
    }
    if interrupted is not None:
        if best_state is None:  # nothing validated: the pre-trained weights are not a fine-tuned model
            raise interrupted
        meta["interrupted_at_step"] = last["step"]
        save_conformer_model(model, out, meta, train_keys, val_keys)
        log(f"[finetune-confgen] interrupted after step {last['step']} (the last logged): saved the best validated weights "
            f"(step {best['step']}) to {out}, task.json says interrupted_at_step")
        raise interrupted
    save_conformer_model(model, out, meta, train_keys, val_keys)
    log(f"[finetune-confgen] saved {out} (best step {meta['train']['best_step']}; data {prep_s:.0f} s, "
        f"training {train_s:.0f} s)")
    return json.loads((out / "task.json").read_text())


# --------------------------------------------------------------------------------------------- CLI

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", help="pre-trained export (or a pre-training output_dir holding export/); "
                                        "config key checkpoint (required)")
    p.add_argument("--out", help="output directory: the task model, metrics.jsonl, rejects.jsonl, the input "
                                 "conformers' cache; config key out (default: outputs/finetune-confgen)")
    p.add_argument("--config", action="append", default=[],
                   help="YAML merged onto the packaged flexmol/configs/finetune/confgen.yaml; repeatable, later "
                        "files win (default: none)")
    p.epilog = ("Any config key can follow as key=value, e.g. data.stop=52000 train.steps=500 input.num_confs=2 "
                "data.exclude=[held_out_keys.txt].")


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    bad = [o for o in overrides if "=" not in o or o.startswith("-")]
    if bad:
        print(f"flexmol finetune-confgen: unrecognized arguments: {' '.join(bad)}", file=sys.stderr)
        return 2
    from flexmol.data.sources import SourceError

    try:
        explicit = {k: v for k, v in (("checkpoint", args.checkpoint), ("out", args.out)) if v}
        files = [config.load_file(path, PATH_KEYS) for path in args.config]
        cfg = load(DEFAULT_CONFIG, *files, explicit, overrides=overrides)
        meta = run_finetune_confgen(cfg, log=lambda m: print(m, file=sys.stderr, flush=True))
    except (ConfigError, SourceError, ValueError) as exc:
        print(f"flexmol finetune-confgen: {' '.join(str(exc).splitlines()[0].split()) or type(exc).__name__}",
              file=sys.stderr)
        return 2
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"flexmol finetune-confgen: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    v = meta.get("validation") or {}
    if v:
        print(f"validation RMSD (A): refined {v['refined']:.4f} (best conformer {v['refined_best']:.4f}), inputs "
              f"{v['inputs']:.4f} ({v['inputs_best']:.4f}), 2D-only {v['two_d']:.4f}")
    print(f"model: {cfg.out}")
    return 0
