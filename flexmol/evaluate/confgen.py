"""Conformation generation and its scores.

Generators (:data:`METHODS`): ``etkdg`` (RDKit ETKDGv3) and ``etkdg_mmff`` (the same embeddings,
MMFF94-optimised), the baselines; ``flexmol`` (ETKDG coordinates moved by a pre-trained model's
SE(3)-equivariant coordinate head, which pre-training taught to denoise coordinates); and, from a
conformer task model (``flexmol finetune-confgen``), ``finetuned`` (its input generator's RDKit
conformers refined by the fine-tuned model, the same seeded conformers as the baseline row of that
generator) and ``two_d_only`` (coordinates from the 2D graph alone, no RDKit conformer).

Scores against reference geometries, per molecule with R references and K generated conformers
(K = 2R by default, as GEOM protocols do), heavy atoms only, RMSD after optimal alignment and over
symmetry-equivalent atom orderings (RDKit's GetBestRMS):

- COV = share of references matched by some generated conformer within ``delta`` (0.5 Å);
- MAT = mean over references of the best RMSD.

Both are averaged over molecules (means and medians reported). References are QM9's DFT
geometries (one per molecule) or an SDF of reference conformers (records of one molecule, by
InChIKey, are its references). Molecules seen in pre-training or fine-tuning are never scored,
nor are their stereo-isomers (the same InChIKey connectivity block, :func:`connectivity`).
Each row also reports ``stereo``: the share of generated conformers whose geometry gives every
tetrahedral stereocentre the molecule's chiral tag (RMSD alone barely sees a wrong diastereomer).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch
from rdkit import Chem
from rdkit.Chem import rdMolAlign

from flexmol.chem.conformers import generate_conformers, molecule_seed
from flexmol.config import FeaturizerConfig

METHODS = {
    "etkdg": "RDKit ETKDGv3",
    "etkdg_mmff": "RDKit ETKDGv3 + MMFF94 (the same embeddings, optimised)",
    "flexmol": "pre-trained coordinate head on the ETKDG conformers (--checkpoint)",
    "finetuned": "conformer task model on its input generator's RDKit conformers (--task-model)",
    "two_d_only": "conformer task model from the 2D graph alone, no RDKit conformer (deterministic: one "
                  "conformer per molecule)",
}

QM9_NOTE = ("QM9 holds one DFT (B3LYP/6-31G(2df,p)) geometry per molecule, not GEOM-QM9's ensemble of "
            "conformers: with one reference, COV is a per-molecule hit rate (1 when some generated conformer "
            "lies within delta of the DFT geometry, else 0) and MAT is the best RMSD to that geometry; neither "
            "is comparable in level with GEOM-QM9 figures such as COV 97.25% / MAT 0.189 A, only between rows "
            "on the same molecules")

HELD_OUT_NOTE = ("no scored molecule shares its InChIKey connectivity block (the first 14 characters: stereo-isomers "
                 "count as the same molecule) with a molecule of the pre-training datasets (--exclude-shards) or of "
                 "the task model's train_inchikeys.txt / val_inchikeys.txt (its training and validation molecules): "
                 "such molecules are skipped and counted under 'skipped'")


def connectivity(inchikey: str) -> str:
    """The InChIKey's first block (the skeleton: formula and connections, tautomers included);
    stereo-isomers and isotopologues of a molecule share it."""
    return inchikey.split("-")[0]


@dataclass
class ConfgenConfig:
    num_confs: Optional[int] = None  # generated per molecule; None: confs_per_reference x its references
    confs_per_reference: int = 2  # GEOM protocols generate twice as many conformers as references
    delta: float = 0.5  # Å, COV threshold
    seed: int = 0  # base seed of the ETKDG embeddings (per molecule: molecule_seed(seed, InChIKey))
    mmff: bool = False  # the pre-trained refinement (and `flexmol confgen` without a task model) starts from MMFF
    refine_steps: int = 1  # coordinate-head passes for the pre-trained refinement (``flexmol``)
    embed_timeout_s: float = 10.0

    def conformers_for(self, references: int) -> int:
        """Conformers to generate for a molecule with ``references`` reference geometries."""
        return self.num_confs if self.num_confs is not None else self.confs_per_reference * references


def with_coords(mol: Chem.Mol, coords: np.ndarray) -> Chem.Mol:
    """A copy of ``mol`` with one conformer per entry of ``coords`` [K, n, 3]."""
    out = Chem.Mol(mol)
    out.RemoveAllConformers()
    for xyz in np.asarray(coords, dtype=np.float64).reshape(-1, mol.GetNumAtoms(), 3):
        conf = Chem.Conformer(mol.GetNumAtoms())
        for i, p in enumerate(xyz):
            conf.SetAtomPosition(i, p.tolist())
        conf.Set3D(True)
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


def etkdg(mol: Chem.Mol, cfg: ConfgenConfig, key: str, num_confs: Optional[int] = None,
          mmff: Optional[bool] = None) -> np.ndarray:
    """[K, n, 3] heavy-atom coordinates from ETKDGv3 (optionally MMFF-optimised), seeded by
    ``cfg.seed`` and the molecule's ``key``: with and without MMFF, the same embeddings.
    ``num_confs`` and ``mmff`` default to the config's (``num_confs`` unset there: 2)."""
    k = num_confs or cfg.num_confs or 2
    fcfg = FeaturizerConfig(num_conformers=k, mmff=cfg.mmff if mmff is None else mmff,
                            embed_timeout_s=cfg.embed_timeout_s)
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


def graph_only(record: dict) -> dict:
    """``record`` without its geometry (``pos`` and what describes it): what a generator may see
    of a molecule whose reference geometry is being predicted."""
    return {k: v for k, v in record.items() if k not in ("pos", "energy", "conf_method")}


def stereo_agrees(mol: Chem.Mol, coords: np.ndarray) -> bool:
    """Whether ``coords`` [n, 3] give every tetrahedral stereocentre of the heavy-atom ``mol`` its
    chiral tag when stereochemistry is assigned from 3D (True for a molecule without such tags)."""
    chiral = (Chem.ChiralType.CHI_TETRAHEDRAL_CW, Chem.ChiralType.CHI_TETRAHEDRAL_CCW)
    tags = {a.GetIdx(): a.GetChiralTag() for a in mol.GetAtoms() if a.GetChiralTag() in chiral}
    if not tags:
        return True
    copy = with_coords(mol, np.asarray(coords)[None])
    Chem.AssignStereochemistryFrom3D(copy)
    return all(copy.GetAtomWithIdx(i).GetChiralTag() == t for i, t in tags.items())


def score_molecule(mol: Chem.Mol, refs: np.ndarray, gens: np.ndarray, delta: float) -> dict:
    """COV, MAT, the best RMSD, the number of generated conformers and ``stereo``, the share of
    them with the molecule's tetrahedral stereochemistry (:func:`stereo_agrees`)."""
    m = rmsd_matrix(mol, refs, gens)
    cov, mat = cov_mat(m, delta)
    stereo = float(np.mean([stereo_agrees(mol, g) for g in gens]))
    return {"cov": cov, "mat": mat, "best_rmsd": float(m.min()), "conformers": len(gens), "stereo": stereo}


def aggregate(rows: list[dict]) -> dict:
    cov = np.array([r["cov"] for r in rows])
    mat = np.array([r["mat"] for r in rows])
    n = len(rows)
    return {"molecules": n, "cov_mean": float(cov.mean()) if n else math.nan,
            "cov_median": float(np.median(cov)) if n else math.nan,
            "mat_mean": float(mat.mean()) if n else math.nan,
            "mat_median": float(np.median(mat)) if n else math.nan,
            "conformers_mean": float(np.mean([r["conformers"] for r in rows])) if n else math.nan,
            "stereo_mean": float(np.mean([r["stereo"] for r in rows])) if n else math.nan}


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


@dataclass
class TaskModel:
    """A conformer task model as the generators use it: the network, its ``task.json`` meta, where
    it was loaded from, and the InChIKeys of every molecule it was fine-tuned on (train and
    validation), which an evaluation never scores."""

    model: torch.nn.Module
    meta: dict
    path: str
    trained: frozenset

    @property
    def mmff(self) -> bool:
        """Whether its input conformers are MMFF-optimised ETKDG ones (as in fine-tuning)."""
        return bool(self.meta.get("input", {}).get("mmff"))


def load_task_model(path) -> TaskModel:
    """The conformer task model in ``path`` (``flexmol finetune-confgen``'s output), in eval mode."""
    from flexmol.finetune.confgen import load_conformer_model, trained_inchikeys

    model, meta = load_conformer_model(path)
    return TaskModel(model.eval(), meta, str(path), frozenset(trained_inchikeys(path)))


class Generator:
    """Conformers of one molecule by each method; the ETKDG embeddings are made once per molecule
    and shared, so every row that starts from RDKit conformers starts from the same ones.

    ``model``: a pre-trained FlexMol (the ``flexmol`` row); ``task``: a :class:`TaskModel`
    (``finetuned`` and ``two_d_only``)."""

    def __init__(self, cfg: ConfgenConfig, model=None, task=None):
        self.cfg, self.model, self.task = cfg, model, task
        self.methods = ["etkdg", "etkdg_mmff"] + (["flexmol"] if model is not None else []) \
            + (["finetuned", "two_d_only"] if task is not None else [])
        self.seconds = {m: 0.0 for m in self.methods}

    def __call__(self, record: dict, mol: Chem.Mol, k: int, methods=None) -> dict[str, np.ndarray]:
        """{method: [K_m, n, 3]} for ``methods`` (default: all of this generator's), ``k``
        conformers each (one for ``two_d_only``), for the molecule of ``record`` and ``mol`` (its
        heavy-atom RDKit molecule in the record's order: its chiral tags pick the 2D-only path's
        mirror image). The generators see the record's graph only, never its ``pos``. Raises
        :class:`Rejected` when ETKDG cannot embed the molecule."""
        methods = methods or self.methods
        key, graph, out, cache = record["inchikey"], graph_only(record), {}, {}
        mol = Chem.Mol(mol)
        mol.RemoveAllConformers()  # a reference geometry stays with the scorer

        def rdkit(mmff: bool) -> np.ndarray:
            name = "etkdg_mmff" if mmff else "etkdg"
            if name not in cache:
                t = time.perf_counter()
                cache[name] = etkdg(mol, self.cfg, key, k, mmff=mmff)
                self.seconds[name] += time.perf_counter() - t
            return cache[name]

        for m in methods:
            if m in ("etkdg", "etkdg_mmff"):
                out[m] = rdkit(m == "etkdg_mmff")
                continue
            inputs = None if m == "two_d_only" else rdkit(self.cfg.mmff if m == "flexmol" else self.task.mmff)
            t = time.perf_counter()
            if m == "flexmol":
                out[m] = refine(self.model, graph, inputs, self.cfg.refine_steps)
            else:
                from flexmol.finetune.confgen import predict

                out[m] = predict(self.task.model, graph, inputs, mol)
            self.seconds[m] += time.perf_counter() - t
        return out


def generate(inputs, cfg: ConfgenConfig, model=None, task=None, method: Optional[str] = None):
    """Conformers for ``inputs`` (SMILES strings, or :class:`RawInput` records of any graph kind:
    SMILES, molfile blocks) by ``method`` (default: ``finetuned`` with a task model, ``flexmol``
    with a pre-trained one, else ``etkdg``, MMFF-optimised when ``cfg.mmff``): yields (input, heavy
    molecule with its conformers, None), or (input, None, reason) for one that could not be
    processed. Strings come back as RawInputs. Each molecule carries the properties ``inchikey``
    and ``seed`` (the per-molecule ETKDG seed; none for ``two_d_only``)."""
    from flexmol.chem.errors import Rejected
    from flexmol.chem.featurizer import RawInput

    method = method or ("finetuned" if task is not None else "flexmol" if model is not None else
                        "etkdg_mmff" if cfg.mmff else "etkdg")
    gen = Generator(cfg, model, task)
    if method not in gen.methods:
        raise ValueError(f"method {method!r} needs {'a task model' if task is None else 'a pre-trained model'}")
    feat = _featurizer("2d")
    for i, raw in enumerate(inputs):
        if isinstance(raw, str):
            raw = RawInput(i, f"mol{i}", "smiles", raw)
        try:
            record, mol = feat.with_molecule(raw)
            coords = gen(record, mol, cfg.conformers_for(1), [method])[method]
        except Rejected as exc:
            yield raw, None, f"{exc.code}: {exc.reason}"
            continue
        out = with_coords(mol, coords)
        out.SetProp("inchikey", record["inchikey"])
        if method != "two_d_only":
            out.SetIntProp("seed", molecule_seed(cfg.seed, record["inchikey"]))
        yield raw, out, None


# ----------------------------------------------------------------------------------- references

@dataclass
class Reference:
    """One molecule to score: its record (graph; ``pos`` = the first reference), its heavy-atom
    molecule in the record's atom order, and every reference geometry [R, n, 3]."""

    id: str
    record: dict
    mol: Chem.Mol
    refs: np.ndarray
    records: tuple = ()  # ids of the source records that gave the references (an SDF's)


def qm9_references(start: int, stride: int, rejects: list) -> Iterator[Reference]:
    """Every ``stride``-th QM9 row from ``start`` on, each with its DFT geometry as the reference
    (QM9's order follows its enumeration, so consecutive rows are near-copies)."""
    from itertools import islice

    from flexmol.chem.errors import Rejected
    from flexmol.data.sources import open_source

    feat = _featurizer("paired")
    for raw in islice(open_source("qm9"), start, None, stride):
        try:
            record, mol = feat.with_molecule(raw)
        except Rejected as exc:
            rejects.append({"id": raw.id, "code": exc.code, "reason": exc.reason})
            continue
        yield Reference(raw.id, record, mol, record["pos"][:1], (raw.id,))


def sdf_references(path, rejects: list) -> list[Reference]:
    """The molecules of an SDF of reference conformers: records with the same InChIKey are one
    molecule's references (in file order; atoms mapped onto the first record's order). A record
    without 3D coordinates, or one whose graph does not map onto its InChIKey's first record, is
    rejected with its reason."""
    from flexmol.chem.errors import Rejected
    from flexmol.config import SourceOptions
    from flexmol.data.sources import open_source

    feat = _featurizer("paired")
    groups: dict[str, list] = {}
    for raw in open_source(str(path), SourceOptions()):
        try:
            record, mol = feat.with_molecule(raw)
            if record.get("conf_method") != "input":
                raise Rejected("no_reference", "the record has no 3D coordinates to serve as a reference")
        except Rejected as exc:
            rejects.append({"id": raw.id, "code": exc.code, "reason": exc.reason})
            continue
        key = record["inchikey"]
        if key not in groups:
            groups[key] = [record, mol, [record["pos"][0]], [raw.id]]
            continue
        first = groups[key]
        match = mol.GetSubstructMatch(first[1])
        if len(match) != first[1].GetNumAtoms() or mol.GetNumAtoms() != first[1].GetNumAtoms():
            rejects.append({"id": raw.id, "code": "reference_mismatch",
                            "reason": f"same InChIKey as record {first[3][0]!r} but its atoms do not map onto it"})
            continue
        first[2].append(record["pos"][0][list(match)])
        first[3].append(raw.id)
    return [Reference(ids[0], rec, mol, np.stack(pos), tuple(ids)) for rec, mol, pos, ids in groups.values()]


def evaluate(references, cfg: ConfgenConfig, model=None, task=None, *, count: int = 200,
             exclude_pretraining: frozenset = frozenset(), exclude_finetuning: frozenset = frozenset(),
             log=print) -> dict:
    """COV/MAT of every generator on the first ``count`` held-out molecules of ``references``
    (:class:`Reference` items): a molecule whose InChIKey's connectivity block (:func:`connectivity`)
    is that of one in ``exclude_pretraining`` (the pre-training data) or ``exclude_finetuning`` (a
    task model's trained molecules) -- the same molecule or a stereo-isomer --, or that repeats an
    earlier one, is skipped and counted; one ETKDG cannot embed is rejected with its reason. Every
    method is scored on the same molecules. ``seconds``: each method's generation time in all (a
    refining row's without its input conformers, which its baseline row counts), and the scoring's."""
    from flexmol.chem.errors import Rejected

    gen = Generator(cfg, model, task)
    rows, rejects, picked = [], [], set()
    skipped = {"seen_in_pretraining": 0, "seen_in_finetuning": 0, "duplicate": 0}
    skipped_ids: dict[str, list] = {k: [] for k in skipped}
    scoring = 0.0
    seen_pre = {connectivity(k) for k in exclude_pretraining}
    seen_ft = {connectivity(k) for k in exclude_finetuning}
    for ref in references:
        if len(rows) == count:
            break
        key = ref.record["inchikey"]
        reason = ("seen_in_pretraining" if connectivity(key) in seen_pre else
                  "seen_in_finetuning" if connectivity(key) in seen_ft else "duplicate" if key in picked else None)
        if reason:
            skipped[reason] += 1
            skipped_ids[reason].append(ref.id)
            continue
        try:
            gens = gen(ref.record, ref.mol, cfg.conformers_for(len(ref.refs)))
        except Rejected as exc:
            rejects.append({"id": ref.id, "code": exc.code, "reason": exc.reason})
            continue
        picked.add(key)
        t = time.perf_counter()
        row = {"id": ref.id, "inchikey": key, "smiles": ref.record["smiles"], "atoms": ref.mol.GetNumAtoms(),
               "references": len(ref.refs)}
        row.update({m: score_molecule(ref.mol, ref.refs, g, cfg.delta) for m, g in gens.items()})
        scoring += time.perf_counter() - t
        rows.append(row)
        if log and len(rows) % 50 == 0:
            log(f"[confgen] {len(rows)}/{count} molecules scored")
    return {"delta": cfg.delta, "seed": cfg.seed,
            "num_confs": cfg.num_confs if cfg.num_confs is not None else f"{cfg.confs_per_reference} x references",
            "refine_steps": cfg.refine_steps, "mmff_before_refine": cfg.mmff,
            "held_out": HELD_OUT_NOTE, "skipped": skipped, "skipped_ids": skipped_ids, "rejected": rejects,
            "methods": {m: METHODS[m] for m in gen.methods},
            "seconds": {**{m: round(s, 2) for m, s in gen.seconds.items()}, "scoring": round(scoring, 2)},
            "scores": {m: aggregate([r[m] for r in rows]) for m in gen.methods},
            "molecules": rows}


def evaluate_qm9(cfg: ConfgenConfig, model=None, task=None, *, count: int = 200, start: int = 100000,
                 stride: int = 130, exclude=(), log=print) -> dict:
    """:func:`evaluate` against QM9's DFT geometries: every ``stride``-th row from ``start`` on,
    skipping molecules in the ``exclude`` datasets (the pre-training data) and, given a ``task``
    model, the molecules it was fine-tuned on (its ``train_inchikeys.txt``)."""
    rejects: list = []
    res = evaluate(qm9_references(start, stride, rejects), cfg, model, task, count=count,
                   exclude_pretraining=frozenset(seen_inchikeys(exclude) if exclude else ()),
                   exclude_finetuning=task.trained if task else frozenset(), log=log)
    if log and len(res["molecules"]) < count:
        log(f"[confgen] QM9 ran out after {len(res['molecules'])} molecules (start={start})")
    res["rejected"] = rejects + res["rejected"]
    return {"reference": "QM9 DFT geometry, one per molecule", "note": QM9_NOTE, "start_row": start,
            "stride": stride, "excluded_datasets": [str(e) for e in exclude], **res}


def evaluate_sdf(path, cfg: ConfgenConfig, model=None, task=None, *, count: int = 200, exclude=(),
                 log=print) -> dict:
    """:func:`evaluate` against the reference conformers of an SDF (records grouped by InChIKey;
    see :func:`sdf_references`), with the same held-out rules as :func:`evaluate_qm9`."""
    rejects: list = []
    refs = sdf_references(path, rejects)
    res = evaluate(refs, cfg, model, task, count=count,
                   exclude_pretraining=frozenset(seen_inchikeys(exclude) if exclude else ()),
                   exclude_finetuning=task.trained if task else frozenset(), log=log)
    res["rejected"] = rejects + res["rejected"]
    return {"reference": f"{path}: {sum(len(r.refs) for r in refs)} reference conformers of {len(refs)} "
                         "molecules (records grouped by InChIKey)",
            "note": "COV is the share of a molecule's references matched within delta, MAT the mean over them "
                    "of the best RMSD", "excluded_datasets": [str(e) for e in exclude], **res}
