"""Conformation generation and its scores.

Generators: ``etkdg`` (RDKit ETKDGv3, the baseline) and ``flexmol`` (ETKDG coordinates refined by
a pre-trained model's SE(3)-equivariant coordinate head, as Uni-Mol does; the head was trained to
denoise coordinates in pre-training). Scores against reference geometries, per molecule with
R references and K generated conformers, heavy atoms only, RMSD after optimal alignment and
over symmetry-equivalent atom orderings (RDKit's GetBestRMS):

- COV = share of references matched by some generated conformer within ``delta`` (0.5 Å);
- MAT = mean over references of the best RMSD.

Both are averaged over molecules (means and medians reported).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from rdkit import Chem
from rdkit.Chem import rdMolAlign

from flexmol.chem.conformers import generate_conformers, molecule_seed
from flexmol.config import FeaturizerConfig


@dataclass
class ConfgenConfig:
    num_confs: int = 2  # generated per molecule (twice the references: QM9 has one per molecule)
    delta: float = 0.5  # Å, COV threshold
    seed: int = 0
    mmff: bool = False  # MMFF-optimise the ETKDG conformers first (off: plain ETKDG, the baseline)
    refine_steps: int = 1  # coordinate-head passes for the flexmol generator
    embed_timeout_s: float = 10.0


def with_coords(mol: Chem.Mol, coords: np.ndarray) -> Chem.Mol:
    """A copy of ``mol`` with one conformer per entry of ``coords`` [K, n, 3]."""
    out = Chem.Mol(mol)
    out.RemoveAllConformers()
    for xyz in np.asarray(coords, dtype=np.float64).reshape(-1, mol.GetNumAtoms(), 3):
        conf = Chem.Conformer(mol.GetNumAtoms())
        for i, p in enumerate(xyz):
            conf.SetAtomPosition(i, p.tolist())
        out.AddConformer(conf, assignId=True)
    return out


def rmsd_matrix(mol: Chem.Mol, refs: np.ndarray, gens: np.ndarray) -> np.ndarray:
    """[R, K] heavy-atom RMSD of every generated conformer to every reference, after optimal
    alignment, minimised over the molecule's symmetry-equivalent atom mappings."""
    if mol.GetNumHeavyAtoms() != mol.GetNumAtoms():
        raise ValueError("rmsd_matrix takes a heavy-atom molecule")
    out = np.zeros((len(refs), len(gens)))
    for r, ref in enumerate(refs):
        ref_mol = with_coords(mol, ref[None])
        for k, gen in enumerate(gens):
            out[r, k] = rdMolAlign.GetBestRMS(with_coords(mol, gen[None]), ref_mol)
    return out


def cov_mat(rmsd: np.ndarray, delta: float) -> tuple[float, float]:
    """COV and MAT of one molecule from its [R, K] RMSD matrix."""
    best = rmsd.min(axis=1)
    return float((best <= delta).mean()), float(best.mean())


def etkdg(mol: Chem.Mol, cfg: ConfgenConfig, key: str) -> np.ndarray:
    """[K, n, 3] heavy-atom coordinates from ETKDGv3 (optionally MMFF-optimised)."""
    fcfg = FeaturizerConfig(num_conformers=cfg.num_confs, mmff=cfg.mmff, embed_timeout_s=cfg.embed_timeout_s)
    coords, _, _ = generate_conformers(Chem.AddHs(mol), fcfg, molecule_seed(cfg.seed, key))
    return coords[:, : mol.GetNumAtoms()]  # AddHs appends the hydrogens after the heavy atoms


@torch.no_grad()
def refine(model, record: dict, coords: np.ndarray, steps: int) -> np.ndarray:
    """Move ``coords`` [K, n, 3] with the model's coordinate head, ``steps`` times; the graph of
    ``record`` (schema v1) goes with every conformer."""
    from flexmol.data.collate import collate, move

    param = next(model.parameters())
    recs = [{**record, "modality": "paired", "pos": c[None].astype(np.float32)} for c in coords]
    batch = move(collate(recs, model.cfg.max_spd, model.cfg.max_path), param.device, param.dtype)
    if param.dtype == torch.float64:  # exact coordinates for a float64 model, not float32-rounded ones
        batch["pos"] = torch.as_tensor(np.asarray(coords), dtype=torch.float64, device=param.device)
    pos = batch["pos"]
    for _ in range(steps):
        out = model(batch, pos=pos, decode=False)
        pos = model.coord_head(out["pair"], pos, batch["mask"])
    return pos.float().cpu().numpy()


def score_molecule(mol: Chem.Mol, refs: np.ndarray, gens: np.ndarray, delta: float) -> dict:
    m = rmsd_matrix(mol, refs, gens)
    cov, mat = cov_mat(m, delta)
    return {"cov": cov, "mat": mat, "best_rmsd": float(m.min())}


def aggregate(rows: list[dict]) -> dict:
    cov = np.array([r["cov"] for r in rows])
    mat = np.array([r["mat"] for r in rows])
    return {"molecules": len(rows), "cov_mean": float(cov.mean()) if len(rows) else math.nan,
            "cov_median": float(np.median(cov)) if len(rows) else math.nan,
            "mat_mean": float(mat.mean()) if len(rows) else math.nan,
            "mat_median": float(np.median(mat)) if len(rows) else math.nan}


# ------------------------------------------------------------------------------------------ jobs

def _featurizer(modality: str):
    from flexmol.chem.featurizer import Featurizer

    return Featurizer(FeaturizerConfig(), modality)


def seen_inchikeys(directories) -> set[str]:
    """InChIKeys of every molecule in the given datasets (e.g. the pre-training shards)."""
    from pathlib import Path

    from flexmol.data.shards import read_shard, shard_paths

    keys: set[str] = set()
    for d in directories:
        paths = shard_paths(Path(d))
        if not paths:
            raise ValueError(f"{d}: no shards to exclude molecules from")
        for p in paths:
            keys.update(r["inchikey"] for r in read_shard(p))
    return keys


def generate(inputs, cfg: ConfgenConfig, model=None):
    """Conformers for ``inputs`` (SMILES strings, or :class:`RawInput` records of any graph kind:
    SMILES, molfile blocks): yields (input, heavy molecule with K conformers, None), or
    (input, None, reason) for one that could not be processed. Strings come back as RawInputs."""
    from flexmol.chem.errors import Rejected
    from flexmol.chem.featurizer import RawInput

    feat = _featurizer("2d")
    for i, raw in enumerate(inputs):
        if isinstance(raw, str):
            raw = RawInput(i, f"mol{i}", "smiles", raw)
        try:
            record, mol = feat.with_molecule(raw)
            coords = etkdg(mol, cfg, record["inchikey"])
            if model is not None:
                coords = refine(model, record, coords, cfg.refine_steps)
        except Rejected as exc:
            yield raw, None, f"{exc.code}: {exc.reason}"
            continue
        yield raw, with_coords(mol, coords), None


def evaluate_qm9(cfg: ConfgenConfig, model=None, *, count: int = 200, start: int = 100000, stride: int = 130,
                 exclude=(), log=print) -> dict:
    """COV/MAT against QM9's DFT geometries on ``count`` molecules: every ``stride``-th row from
    ``start`` on (QM9's order follows its enumeration, so consecutive rows are near-copies), skipping any
    whose InChIKey is in the ``exclude`` datasets (the pre-training data), for ETKDG and, given a
    model, for FlexMol's refinement of the same ETKDG conformers."""
    from itertools import islice

    from flexmol.chem.errors import Rejected
    from flexmol.data.sources import open_source

    seen = seen_inchikeys(exclude) if exclude else set()
    feat = _featurizer("paired")
    rows, rejects, skipped_seen, picked_keys = [], [], 0, set()
    for raw in islice(open_source("qm9"), start, None, stride):
        if len(rows) == count:
            break
        try:
            record, mol = feat.with_molecule(raw)
        except Rejected as exc:
            rejects.append({"id": raw.id, "code": exc.code, "reason": exc.reason})
            continue
        key = record["inchikey"]
        if key in seen or key in picked_keys:  # seen in pre-training, or a QM9 duplicate
            skipped_seen += 1
            continue
        try:
            gens = etkdg(mol, cfg, key)
        except Rejected as exc:
            rejects.append({"id": raw.id, "code": exc.code, "reason": exc.reason})
            continue
        picked_keys.add(key)
        ref = record["pos"][:1]
        row = {"id": raw.id, "smiles": record["smiles"], "atoms": mol.GetNumAtoms(),
               "etkdg": score_molecule(mol, ref, gens, cfg.delta)}
        if model is not None:
            row["flexmol"] = score_molecule(mol, ref, refine(model, record, gens, cfg.refine_steps), cfg.delta)
        rows.append(row)
        if log and len(rows) % 50 == 0:
            log(f"[confgen] {len(rows)}/{count} molecules scored")
    if len(rows) < count:
        log(f"[confgen] QM9 ran out after {len(rows)} molecules (start={start})")
    methods = ["etkdg"] + (["flexmol"] if model is not None else [])
    return {"reference": "QM9 DFT (B3LYP) geometry, one per molecule", "start_row": start, "stride": stride,
            "delta": cfg.delta, "num_confs": cfg.num_confs, "refine_steps": cfg.refine_steps,
            "skipped_seen_in_pretraining_or_duplicate": skipped_seen, "excluded_datasets": [str(e) for e in exclude],
            "rejected": rejects, "scores": {m: aggregate([r[m] for r in rows]) for m in methods},
            "molecules": rows}
