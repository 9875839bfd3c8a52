"""How well a model aligns its two modalities, on held-out paired molecules.

Stage 2 leans on what stage 1 learned: the feature learners' outputs are the decoders' targets
and the contrastive alignment is what makes a generated modality usable by the multi-modal
encoder. If stage 1 left them poorly aligned, stage 2's targets are noise (METHOD.md,
"Pre-training"). This report says so before stage 2 is paid for.

On the first ``count`` molecules of one or more paired datasets (directory order, then the
manifest's shard order, then record order; a molecule seen earlier, by InChIKey, is skipped), with
each molecule's first conformer, the model in eval mode and no gradient:

- retrieval: ``z2 = proj_2d(mean(x^(F)))`` and ``z3 = proj_3d(mean(y^(F)))`` as in the contrastive
  loss, cosine similarity, top-1 and top-5 accuracy of 2D->3D (find a molecule's conformer among
  all N) and 3D->2D, beside the chance levels 1/N and 5/N. A tie with the matched molecule counts
  against it, so a collapsed model (every embedding the same) scores chance, not 1.0;
- cosine of matched pairs (the diagonal) and unmatched pairs (every other entry), their gap, and
  whether the matched mean is above 0.8 (the paper's sanity check);
- the feature learners' error, MSE over real atoms of 3D-FL(x) against y and 2D-FL(y) against x;
- the decoders' error, D_2->3's (y^, Q^) against (y, Q) and D_3->2's (x^, P^) against (x, P),
  atom and pair MSE.

Every MSE is also given relative to its target's variance: the MSE of predicting each channel's
mean over the evaluated atoms (pairs), i.e. the mean over channels of the per-channel variance. A
relative error of 1.0 is no better than that constant; 0 is exact.

Nothing in the report is random (eval mode: no dropout; no masking or noise; the first
conformer). ``seed`` still seeds torch inside a forked RNG around the forward passes, so a model
with a stochastic module would give a reproducible report, and the caller's RNG state is left as
it was. Batches are filled to an atom budget after sorting the molecules by size (less padding);
the figures do not depend on the batching.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F

from flexmol.data.collate import atom_budget_batches, collate, move
from flexmol.model.heads import masked_mean
from flexmol.objectives.losses import atom_mse, pair_mse

MATCHED_THRESHOLD = 0.8  # the paper's sanity check on the mean cosine of matched pairs


class AlignmentError(ValueError):
    """The report cannot be made from what was given; the message names the problem."""


# ------------------------------------------------------------------------------------------ data

def check_datasets(data_dirs: Sequence[str | Path]) -> int:
    """Check that every directory is a finished paired dataset; return how many molecules they
    hold together (the manifests' written counts)."""
    from flexmol.data.shards import MANIFEST, load_manifest

    if isinstance(data_dirs, (str, Path)):
        data_dirs = [data_dirs]
    if not data_dirs:
        raise AlignmentError("no dataset given")
    total = 0
    for d in data_dirs:
        path = Path(d)
        if not path.is_dir():
            raise AlignmentError(f"{path}: {'not a directory' if path.exists() else 'no such dataset directory'}")
        try:
            manifest = load_manifest(path)
        except FileNotFoundError as exc:
            raise AlignmentError(str(exc)) from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise AlignmentError(f"{path / MANIFEST}: not valid JSON ({exc})") from None
        modality = manifest.get("modality")
        if modality != "paired":
            raise AlignmentError(f"{path}: a {modality} dataset (manifest modality {modality!r}); the alignment "
                                 "report needs paired molecules (flexmol featurize ... --modality paired)")
        total += int(manifest.get("counts", {}).get("written", 0))
    return total


def read_records(data_dirs: Sequence[str | Path], count: int) -> list[dict]:
    """The first ``count`` distinct (by InChIKey) records of the datasets, in order."""
    import tarfile

    from flexmol.data import schema
    from flexmol.data.shards import read_shard, shard_paths

    records: list[dict] = []
    seen: set[str] = set()
    for d in data_dirs:
        for path in shard_paths(Path(d)):
            try:
                for rec in read_shard(path):
                    if rec.get("modality") != "paired":
                        raise AlignmentError(f"{path}: holds a {rec.get('modality')} record, not a paired one")
                    key = rec.get("inchikey")
                    if key in seen:
                        continue
                    seen.add(key)
                    records.append(rec)
                    if len(records) == count:
                        return records
            except (OSError, tarfile.TarError, EOFError, schema.SchemaError) as exc:
                raise AlignmentError(f"{path}: unreadable ({exc})") from None
    return records


# ----------------------------------------------------------------------------------- accumulators

class _Error:
    """Sums over real atoms (or pairs) of the squared error and of the target's per-channel first
    and second moments, for the MSE and the variance over the whole evaluation set."""

    def __init__(self):
        self.sse = 0.0
        self.count = 0.0
        self.s1: torch.Tensor | None = None
        self.s2: torch.Tensor | None = None

    def add(self, mse: torch.Tensor, count: torch.Tensor, target: torch.Tensor, select: torch.Tensor) -> None:
        """``mse`` averaged over ``count`` elements; ``target[select]`` their [M, C] targets."""
        self.sse += float(mse) * float(count)
        self.count += float(count)
        t = target[select].double()
        s1, s2 = t.sum(0), t.pow(2).sum(0)
        self.s1 = s1 if self.s1 is None else self.s1 + s1
        self.s2 = s2 if self.s2 is None else self.s2 + s2

    def result(self) -> dict:
        mse = self.sse / self.count
        mean = self.s1 / self.count
        var = float((self.s2 / self.count - mean.pow(2)).clamp(min=0).mean())
        return {"mse": mse, "target_variance": var, "relative": mse / var if var > 0 else math.nan}


def _ranks(sim: torch.Tensor) -> torch.Tensor:
    """Per row: how many other columns score at least as high as the matched (diagonal) one."""
    diag = sim.diagonal().unsqueeze(1)
    ahead = (sim >= diag).sum(1) - 1  # the diagonal itself is always counted once
    return ahead


def retrieval(z2: torch.Tensor, z3: torch.Tensor) -> dict:
    """Retrieval and cosine figures of paired projections ``z2``, ``z3`` [N, D] (row i of both
    is molecule i)."""
    n = len(z2)
    a, b = F.normalize(z2.double(), dim=-1), F.normalize(z3.double(), dim=-1)
    sim = a @ b.T  # [N 2D, N 3D]
    r23, r32 = _ranks(sim), _ranks(sim.T)
    matched = sim.diagonal()
    off = ~torch.eye(n, dtype=torch.bool, device=sim.device)
    unmatched_mean = float(sim[off].mean())
    matched_mean = float(matched.mean())
    return {
        "retrieval": {
            "2d_to_3d": {"top1": float((r23 < 1).double().mean()), "top5": float((r23 < 5).double().mean())},
            "3d_to_2d": {"top1": float((r32 < 1).double().mean()), "top5": float((r32 < 5).double().mean())},
            "chance_top1": 1.0 / n,
            "chance_top5": min(5, n) / n,
        },
        "cosine": {
            "matched_mean": matched_mean,
            "unmatched_mean": unmatched_mean,
            "gap": matched_mean - unmatched_mean,
            "matched_above_0_8": bool(matched_mean > MATCHED_THRESHOLD),
            "matched_fraction_above_0_8": float((matched > MATCHED_THRESHOLD).double().mean()),
        },
    }


# ------------------------------------------------------------------------------------------ report

def _model_of(model):
    # A DeepSpeed engine (or another wrapper) holds the FlexMol as ``module``.
    return getattr(model, "module", model)


@torch.no_grad()
def _forward_all(model, records: list[dict], max_atoms: int, device: torch.device, dtype: torch.dtype):
    cfg = model.cfg
    errors = {name: _Error() for name in ("fl_3d", "fl_2d", "d23_atom", "d23_pair", "d32_atom", "d32_pair")}
    z2s, z3s, atoms = [], [], 0
    ordered = sorted(records, key=lambda r: len(r["z"]))  # by size: less padding per batch
    for group in atom_budget_batches(ordered, max_atoms):
        batch = move(collate(group, cfg.max_spd, cfg.max_path), device, dtype)
        mask = batch["mask"]
        out = model(batch)
        z2s.append(model.proj_2d(masked_mean(out["x_f"], mask)).float())
        z3s.append(model.proj_3d(masked_mean(out["y_f"], mask)).float())
        n_atoms = mask.sum()
        pm = mask.unsqueeze(-1) & mask.unsqueeze(-2)
        n_pairs = pm.sum()
        atoms += int(n_atoms)
        x, y, P, Q = out["x"], out["y"], out["P"], out["Q"]
        errors["fl_3d"].add(atom_mse(model.fl_3d(x), y, mask), n_atoms, y, mask)
        errors["fl_2d"].add(atom_mse(model.fl_2d(y), x, mask), n_atoms, x, mask)
        errors["d23_atom"].add(atom_mse(out["y_hat"], y, mask), n_atoms, y, mask)
        errors["d23_pair"].add(pair_mse(out["Q_hat"], Q, mask), n_pairs, Q, pm)
        errors["d32_atom"].add(atom_mse(out["x_hat"], x, mask), n_atoms, x, mask)
        errors["d32_pair"].add(pair_mse(out["P_hat"], P, mask), n_pairs, P, pm)
    return torch.cat(z2s).cpu(), torch.cat(z3s).cpu(), {k: e.result() for k, e in errors.items()}, atoms


def alignment_report(model, data_dirs: Sequence[str | Path] | str | Path, count: int | None = 1000,
                     max_atoms: int = 4096, device: str | torch.device | None = None, seed: int = 0) -> dict:
    """The alignment report of ``model`` (a FlexMol, or a wrapper holding one as ``.module``) on
    the first ``count`` distinct molecules of the paired datasets ``data_dirs`` (``count=None``:
    all of them). ``device``: where to run (default: where the model is; the model is moved there
    and back). The model's train/eval mode and device are restored afterwards; its dtype is used
    for the batches (bf16 works).

    Raises :class:`AlignmentError` (a ``ValueError``) for a missing directory or manifest, a dataset
    that is not paired, ``count < 2``, or ``count`` larger than the datasets hold.

    Keys of the returned dict: ``molecules``, ``atoms``, ``data``, ``max_atoms``, ``seed``,
    ``device``, ``dtype``, ``seconds``; ``retrieval`` {``2d_to_3d``, ``3d_to_2d``: {``top1``,
    ``top5``}, ``chance_top1``, ``chance_top5``}; ``cosine`` {``matched_mean``, ``unmatched_mean``,
    ``gap``, ``matched_above_0_8``, ``matched_fraction_above_0_8``}; ``feature_learners``
    {``3d_fl`` (3D-FL(x) vs y), ``2d_fl`` (2D-FL(y) vs x)} and ``decoders`` {``2to3``, ``3to2``:
    {``atom``, ``pair``}}, each of these a dict {``mse``, ``target_variance``, ``relative``}.
    """
    start = time.perf_counter()
    dirs = [data_dirs] if isinstance(data_dirs, (str, Path)) else list(data_dirs)
    if count is not None and count < 2:
        raise AlignmentError(f"count must be at least 2 (got {count}): retrieval needs other molecules to rank against")
    if max_atoms < 1:
        raise AlignmentError(f"max_atoms must be at least 1 (got {max_atoms})")
    held = check_datasets(dirs)
    if count is not None and count > held:
        raise AlignmentError(f"count {count} is more than the {held} molecules {_names(dirs)} "
                             f"{'holds' if len(dirs) == 1 else 'hold together'}; ask for {held} or fewer")
    records = read_records(dirs, held if count is None else count)
    want = len(records) if count is None else count
    if len(records) < max(want, 2):
        raise AlignmentError(f"{_names(dirs)} {'holds' if len(dirs) == 1 else 'hold'} only {len(records)} distinct "
                             f"molecules; ask for {len(records)} or fewer (at least 2)")
    report = records_report(model, records, max_atoms=max_atoms, device=device, seed=seed)
    report["data"] = [str(d) for d in dirs]
    report["seconds"] = round(time.perf_counter() - start, 3)
    return report


def records_report(model, records: list[dict], max_atoms: int = 4096, device: str | torch.device | None = None,
                   seed: int = 0) -> dict:
    """The report of :func:`alignment_report` on paired records already read (e.g. a training
    run's held-out shards); ``data`` is left empty."""
    start = time.perf_counter()
    if len(records) < 2:
        raise AlignmentError(f"{len(records)} molecule(s): retrieval needs at least 2")
    net = _model_of(model)
    param = next(net.parameters())
    home = param.device
    dev = torch.device(device) if device is not None else home
    was_training = net.training
    rng_devices = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
    try:
        net.eval()
        if dev != home:
            net.to(dev)
        with torch.random.fork_rng(devices=rng_devices):
            torch.manual_seed(seed)
            z2, z3, errors, atoms = _forward_all(net, records, max_atoms, dev, param.dtype)
    finally:
        if dev != home:
            net.to(home)
        net.train(was_training)

    report = {"molecules": len(records), "atoms": atoms, "data": [], "max_atoms": max_atoms,
              "seed": seed, "device": str(dev), "dtype": str(param.dtype).replace("torch.", "")}
    report.update(retrieval(z2, z3))
    report["feature_learners"] = {"3d_fl": errors["fl_3d"], "2d_fl": errors["fl_2d"]}
    report["decoders"] = {"2to3": {"atom": errors["d23_atom"], "pair": errors["d23_pair"]},
                          "3to2": {"atom": errors["d32_atom"], "pair": errors["d32_pair"]}}
    report["seconds"] = round(time.perf_counter() - start, 3)
    return report


def _names(dirs: Iterable) -> str:
    return ", ".join(str(d) for d in dirs)


def flat_metrics(report: dict, prefix: str = "align/") -> dict[str, float]:
    """The report's figures as one flat {name: number} dict, e.g. for ``metrics.jsonl`` or wandb."""
    out: dict[str, float] = {}

    def walk(node, name):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{name}{k}/" if isinstance(v, dict) else f"{name}{k}")
        elif isinstance(node, (bool, int, float)):
            out[name] = float(node)

    for key in ("retrieval", "cosine", "feature_learners", "decoders"):
        walk(report[key], f"{prefix}{key}/")
    out[f"{prefix}molecules"] = float(report["molecules"])
    return out


def format_report(report: dict) -> str:
    """A readable table of :func:`alignment_report`'s dict."""
    r, c = report["retrieval"], report["cosine"]
    n = report["molecules"]
    lines = [
        f"modality alignment on {n} paired molecules ({report['atoms']} atoms) from {_names(report['data'])}",
        "",
        f"{'retrieval (cosine of projected, pooled encoder outputs)':<58} {'top-1':>7} {'top-5':>7}",
        f"{'  2D -> 3D (a graph finds its conformer)':<58} {r['2d_to_3d']['top1']:>7.3f} {r['2d_to_3d']['top5']:>7.3f}",
        f"{'  3D -> 2D (a conformer finds its graph)':<58} {r['3d_to_2d']['top1']:>7.3f} {r['3d_to_2d']['top5']:>7.3f}",
        f"{'  chance':<58} {r['chance_top1']:>7.3f} {r['chance_top5']:>7.3f}",
        "",
        f"cosine: matched {c['matched_mean']:.3f}, unmatched {c['unmatched_mean']:.3f}, gap {c['gap']:.3f}; "
        f"matched mean > {MATCHED_THRESHOLD}: {'yes' if c['matched_above_0_8'] else 'NO'} "
        f"({100 * c['matched_fraction_above_0_8']:.1f}% of molecules above)",
        "",
        f"{'reconstruction error over real atoms / pairs':<44} {'MSE':>10} {'target var':>11} {'relative':>9}",
    ]
    rows = [("  3D-FL(x) vs y", report["feature_learners"]["3d_fl"]),
            ("  2D-FL(y) vs x", report["feature_learners"]["2d_fl"]),
            ("  D_2->3 atoms: y^ vs y", report["decoders"]["2to3"]["atom"]),
            ("  D_2->3 pairs: Q^ vs Q", report["decoders"]["2to3"]["pair"]),
            ("  D_3->2 atoms: x^ vs x", report["decoders"]["3to2"]["atom"]),
            ("  D_3->2 pairs: P^ vs P", report["decoders"]["3to2"]["pair"])]
    for name, e in rows:
        lines.append(f"{name:<44} {e['mse']:>10.4g} {e['target_variance']:>11.4g} {e['relative']:>9.3f}")
    lines.append("  (relative = MSE / target variance: 1.0 is no better than predicting the mean, 0 is exact)")
    return "\n".join(lines)
