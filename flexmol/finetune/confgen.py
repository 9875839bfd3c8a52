"""The conformer-generation task: a pre-trained FlexMol fine-tuned to move RDKit conformers onto
reference geometries, and a 2D-only path that needs no RDKit conformer at all.

- :class:`ConformerModel` wraps the backbone. :meth:`~ConformerModel.refine` runs the paired forward
  on an input conformer and moves it with the SE(3)-equivariant coordinate head, ``passes`` times
  (each pass re-encodes the moved coordinates). :meth:`~ConformerModel.from_graph` is the 2D-only
  path: the 2D forward (D_2->3 generates the 3D representation), the distance head's pair
  distances, coordinates from them by classical multidimensional scaling (the mirror image that
  matches the molecule's chiral tags), then the same refinement passes.
- :func:`confgen_loss`: pair distances of the prediction against the reference's, and coordinates
  after optimal superposition (Kabsch: the reference rotated and translated onto the prediction,
  that transform not differentiated), so the loss does not depend on the reference's frame.
- :func:`save_conformer_model` / :func:`load_conformer_model`: the backbone as an export
  (safetensors + YAML + checksums), ``task.json`` (``"task": "confgen"`` and the run's
  description), ``train_inchikeys.txt`` and ``val_inchikeys.txt`` (every molecule the model was
  fine-tuned or validated on; their sha256 in ``task.json``); :func:`trained_inchikeys` reads them.

Training (data, the loop, ``flexmol finetune-confgen``) lives in :mod:`flexmol.finetune.confgen_train`.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from rdkit import Chem
from torch import nn

from flexmol.config import ConfigError

TASK = "confgen"
TASK_FILE = "task.json"
TRAIN_KEYS = "train_inchikeys.txt"
VAL_KEYS = "val_inchikeys.txt"
LOSS_KINDS = ("l1", "mse")


class ConformerModel(nn.Module):
    """A FlexMol backbone (its coordinate and distance heads included) fine-tuned for conformers."""

    def __init__(self, backbone, passes: int = 1):
        super().__init__()
        if passes < 1:
            raise ConfigError(f"config key 'passes': must be at least 1, got {passes}")
        self.backbone = backbone
        self.passes = passes

    @property
    def cfg(self):
        """The backbone's :class:`~flexmol.model.network.ModelConfig` (``max_spd``, ``max_path`` for collation)."""
        return self.backbone.cfg

    def refine(self, batch: dict, pos: torch.Tensor) -> torch.Tensor:
        """Coordinates [B, N, 3] moved from ``pos`` [B, N, 3] (padding rows stay where they are):
        ``passes`` times the paired forward on the current coordinates and the coordinate head.
        ``batch`` holds the molecules' graphs (a paired or 2D batch). Equivariant: rotating and
        translating ``pos`` rotates and translates the output with it."""
        paired = {**batch, "modality": "paired"}
        for _ in range(self.passes):
            out = self.backbone(paired, pos=pos, decode=False)
            pos = self.backbone.coord_head(out["pair"], pos, batch["mask"])
        return pos

    def pair_distances(self, batch: dict) -> torch.Tensor:
        """[B, N, N] pair distances (Å) the distance head reads from the 2D forward, where D_2->3
        generates the 3D representation from the graph: no coordinates are used."""
        out = self.backbone({**batch, "modality": "2d"})
        return self.backbone.dist_head(out["pair"])

    def from_graph(self, batch: dict, mols=None) -> torch.Tensor:
        """The 2D-only path: [B, N, 3] coordinates from the graphs of ``batch`` alone. The distance
        head's pair distances (:meth:`pair_distances`) become coordinates by classical MDS
        (:func:`mds`, not differentiated), mirrored where that matches the chiral tags of ``mols``
        (RDKit heavy-atom molecules in the batch's atom order; None: no mirror choice), then
        :meth:`refine`. Deterministic."""
        return self.refine(batch, self.mds_start(batch, mols))

    @torch.no_grad()
    def mds_start(self, batch: dict, mols=None, dist: torch.Tensor | None = None) -> torch.Tensor:
        """The 2D-only path's starting coordinates [B, N, 3] (see :meth:`from_graph`), from the
        pair distances ``dist`` [B, N, N] when given (training computes them once, with gradient)."""
        dist = self.pair_distances(batch) if dist is None else dist.detach()
        mask = batch["mask"]
        pos = torch.zeros(*mask.shape, 3, dtype=dist.dtype, device=dist.device)
        for b in range(mask.shape[0]):
            n = int(mask[b].sum())
            xyz = mds(dist[b, :n, :n])
            if mols is not None and mols[b] is not None:
                xyz = match_chirality(mols[b], xyz)
            pos[b, :n] = xyz
        return pos


def mds(dist: torch.Tensor) -> torch.Tensor:
    """Classical multidimensional scaling: [n, n] distances (symmetrised, negatives clipped) ->
    [n, 3] centred coordinates whose distances approximate them (the Gram matrix's three largest
    eigenvalues; a negative one contributes nothing)."""
    n = dist.shape[0]
    d = 0.5 * (dist + dist.T)
    d = d.clamp(min=0) * (1 - torch.eye(n, dtype=d.dtype, device=d.device))
    j = torch.eye(n, dtype=d.dtype, device=d.device) - 1.0 / n
    gram = -0.5 * j @ (d * d) @ j
    vals, vecs = torch.linalg.eigh(gram.double())
    top = min(3, n)
    vals, vecs = vals.flip(0)[:top].clamp(min=0), vecs.flip(1)[:, :top]
    xyz = torch.zeros(n, 3, dtype=torch.float64, device=d.device)
    xyz[:, :top] = vecs * vals.sqrt()
    return xyz.to(dist.dtype)


def match_chirality(mol: Chem.Mol, xyz: torch.Tensor) -> torch.Tensor:
    """``xyz`` [n, 3] or its mirror image, whichever gives more of ``mol``'s tetrahedral chiral
    tags when stereochemistry is assigned from 3D (on a copy of ``mol``); ``xyz`` itself for a
    molecule without chiral tags or on a tie."""
    tags = {a.GetIdx(): a.GetChiralTag() for a in mol.GetAtoms()
            if a.GetChiralTag() in (Chem.ChiralType.CHI_TETRAHEDRAL_CW, Chem.ChiralType.CHI_TETRAHEDRAL_CCW)}
    if not tags:
        return xyz

    def agreeing(coords: np.ndarray) -> int:
        copy = Chem.Mol(mol)
        copy.RemoveAllConformers()
        conf = Chem.Conformer(mol.GetNumAtoms())
        conf.Set3D(True)
        for i, p in enumerate(coords.astype(np.float64)):
            conf.SetAtomPosition(i, p.tolist())
        copy.AddConformer(conf, assignId=True)
        Chem.AssignStereochemistryFrom3D(copy)
        return sum(copy.GetAtomWithIdx(i).GetChiralTag() == t for i, t in tags.items())

    coords = xyz.detach().cpu().numpy()
    mirror = coords * np.array([-1.0, 1.0, 1.0])
    return xyz * xyz.new_tensor([-1.0, 1.0, 1.0]) if agreeing(mirror) > agreeing(coords) else xyz


# ------------------------------------------------------------------------------------------ loss

def kabsch(mobile: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``mobile`` [B, N, 3] rotated and translated onto ``target`` by the proper rotation (no
    reflection) that minimises the RMSD over the real atoms of ``mask`` [B, N]. The transform is
    computed without gradient: what comes back moves with ``mobile`` only as a rigid body would."""
    m = mask.unsqueeze(-1).to(mobile.dtype)
    count = m.sum(1, keepdim=True).clamp(min=1)
    with torch.no_grad():
        mc = (mobile * m).sum(1, keepdim=True) / count
        tc = (target * m).sum(1, keepdim=True) / count
        h = ((mobile - mc) * m).transpose(1, 2) @ ((target - tc) * m)  # [B, 3, 3]
        u, _, vt = torch.linalg.svd(h.double())
        d = torch.sign(torch.linalg.det(vt.transpose(1, 2) @ u.transpose(1, 2)))
        d = torch.where(d == 0, torch.ones_like(d), d)
        fix = torch.diag_embed(torch.stack([torch.ones_like(d), torch.ones_like(d), d], -1))
        rot = (vt.transpose(1, 2) @ fix @ u.transpose(1, 2)).to(mobile.dtype)  # target ~ rot @ mobile
    return ((mobile - mc) @ rot.transpose(1, 2) + tc) * m


def confgen_loss(pred: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor, kind: str = "l1",
                 distance_weight: float = 1.0, coord_weight: float = 1.0) -> dict:
    """The conformer loss of predicted coordinates ``pred`` [B, N, 3] against reference ones
    ``ref`` [B, N, 3] (``mask`` [B, N] the real atoms). Terms, each a mean over molecules:

    - ``distance``: over the real atom pairs (i < j), |d_pred - d_ref| (``kind`` l1) or its square
      (mse), Å or Å²;
    - ``coord``: over the real atoms, after the reference is superposed onto the prediction
      (:func:`kabsch`, not differentiated), the mean per-atom deviation |x_pred - x_ref| (l1, Å)
      or the mean squared deviation (mse, Å²);
    - ``loss`` = ``distance_weight`` * distance + ``coord_weight`` * coord;
    - ``rmsd`` (no gradient): the mean heavy-atom RMSD after that superposition, Å.

    Rotating or translating ``ref`` changes none of them; rotating ``pred`` with the reference
    changes none either (the model's outputs are equivariant)."""
    if kind not in LOSS_KINDS:
        raise ConfigError(f"config key 'loss.kind': '{kind}' is not one of {', '.join(LOSS_KINDS)}")
    mask = mask.bool()
    m = mask.to(pred.dtype)
    atoms = m.sum(1).clamp(min=1)
    pairs = (m.unsqueeze(-1) * m.unsqueeze(-2)).triu(1)

    def err(x):
        return x.abs() if kind == "l1" else x * x

    d_pred = _distances(pred)
    d_ref = _distances(ref.to(pred.dtype))
    distance = (err(d_pred - d_ref) * pairs).sum((1, 2)) / pairs.sum((1, 2)).clamp(min=1)
    aligned = kabsch(ref.to(pred.dtype), pred.detach(), mask)
    diff = (pred - aligned) * m.unsqueeze(-1)
    dev2 = (diff * diff).sum(-1)  # per atom: a norm, not components (|R d|_1 != |d|_1 would depend on the frame)
    coord = (((dev2 + 1e-12).sqrt() - 1e-6 if kind == "l1" else dev2) * m).sum(1) / atoms  # 0 at 0, finite gradient
    with torch.no_grad():
        rmsd = ((diff * diff).sum((1, 2)) / atoms).sqrt()
    distance, coord = distance.mean(), coord.mean()
    return {"loss": distance_weight * distance + coord_weight * coord, "distance": distance, "coord": coord,
            "rmsd": rmsd.mean()}


def _distances(pos: torch.Tensor) -> torch.Tensor:
    """[B, N, N] Euclidean distances, with a gradient that stays finite at zero (the diagonal)."""
    delta = pos.unsqueeze(2) - pos.unsqueeze(1)
    return ((delta * delta).sum(-1) + 1e-12).sqrt()


def aligned_rmsd(pred: np.ndarray, ref: np.ndarray) -> float:
    """Heavy-atom RMSD (Å) of ``pred`` [n, 3] to ``ref`` [n, 3] after optimal superposition, atoms
    in the same order (no symmetry search)."""
    p = torch.as_tensor(np.asarray(pred, dtype=np.float64))[None]
    r = torch.as_tensor(np.asarray(ref, dtype=np.float64))[None]
    mask = torch.ones(1, p.shape[1], dtype=torch.bool)
    diff = p - kabsch(r, p, mask)
    return float((diff * diff).sum(-1).mean().sqrt())


# ------------------------------------------------------------------------------------ prediction

def batch_of(model: ConformerModel, records: list[dict], pos=None) -> dict:
    """A batch of ``records`` (schema v1, with graphs) for ``model``, on its device and in its
    dtype; ``pos`` (a list of [n, 3] arrays, one per record) becomes the batch's ``pos``."""
    from flexmol.data.collate import collate, move

    param = next(model.parameters())
    if pos is None:
        recs = [{**r, "modality": "2d"} for r in records]
    else:
        recs = [{**r, "modality": "paired", "pos": np.asarray(p, dtype=np.float32)[None]} for r, p in zip(records, pos)]
    batch = move(collate(recs, model.cfg.max_spd, model.cfg.max_path), param.device, param.dtype)
    if pos is not None and param.dtype == torch.float64:  # exact coordinates for a float64 model
        for b, p in enumerate(pos):
            batch["pos"][b, : len(p)] = torch.as_tensor(np.asarray(p), dtype=torch.float64)
    return batch


@torch.no_grad()
def predict(model: ConformerModel, record: dict, inputs, mol: Chem.Mol | None = None) -> np.ndarray:
    """Heavy-atom coordinates [K, n, 3] (float32, Å, the record's atom order) for the molecule of
    ``record`` (schema v1, with its graph).

    ``inputs`` [K, n, 3]: K input conformers (e.g. seeded ETKDG, in the record's atom order), each
    refined (:meth:`ConformerModel.refine`). ``inputs`` None: the 2D-only path
    (:meth:`ConformerModel.from_graph`), one conformer [1, n, 3], deterministic (the same
    coordinates on every call); ``mol`` (the RDKit heavy-atom molecule in the record's order, as
    :meth:`Featurizer.with_molecule` gives it) picks the mirror image that matches its chiral tags;
    without it the molecule is rebuilt from the record's SMILES and matched to its graph."""
    model.eval()
    if inputs is None:
        batch = batch_of(model, [record])
        if mol is None:
            mol = record_molecule(record)
        return model.from_graph(batch, [mol]).float().cpu().numpy()
    inputs = np.asarray(inputs, dtype=np.float32)
    if inputs.ndim != 3 or inputs.shape[1:] != (len(record["z"]), 3):
        raise ValueError(f"inputs of shape {inputs.shape} for a molecule of {len(record['z'])} atoms "
                         "(expected [K, n, 3])")
    batch = batch_of(model, [record] * len(inputs), list(inputs))
    return model.refine(batch, batch["pos"]).float().cpu().numpy()


def record_molecule(record: dict) -> Chem.Mol | None:
    """The heavy-atom RDKit molecule of ``record`` in the record's atom order: its SMILES parsed
    and renumbered onto its graph (elements and bonds). None when they do not match."""
    mol = Chem.MolFromSmiles(record["smiles"])
    if mol is None or mol.GetNumAtoms() != len(record["z"]):
        return None
    from flexmol.chem.conformers import _skeleton

    graph = Chem.RWMol()
    for z in np.asarray(record["z"]).tolist():
        atom = Chem.Atom(int(z))
        atom.SetNoImplicit(True)
        graph.AddAtom(atom)
    for i, j in np.asarray(record["bond_index"]).reshape(-1, 2).tolist():
        if i != j and graph.GetBondBetweenAtoms(int(i), int(j)) is None:
            graph.AddBond(int(i), int(j), Chem.BondType.SINGLE)
    g, s = graph.GetMol(), _skeleton(mol)
    g.UpdatePropertyCache(strict=False)
    match = s.GetSubstructMatch(g)  # match[i]: the SMILES atom of record atom i
    if len(match) != mol.GetNumAtoms() or g.GetNumBonds() != s.GetNumBonds():
        return None
    return Chem.RenumberAtoms(mol, list(match))


# ------------------------------------------------------------------------------------ save / load

def _sha256_text(path: Path) -> str:
    from flexmol.data.shards import file_sha256

    return file_sha256(path)


def save_conformer_model(model: ConformerModel, out_dir, meta: dict, train_keys=(), val_keys=()) -> Path:
    """Write ``model`` to ``out_dir``: the backbone as an export (``model.safetensors``,
    ``model.yaml``, ``checksums.json``), ``train_inchikeys.txt`` / ``val_inchikeys.txt`` (sorted,
    one InChIKey per line) and ``task.json``: ``meta`` (the input generator, the pre-trained
    checkpoint, the training data, counts) with ``"task": "confgen"``, ``passes`` and the key
    files' sha256 added. Returns the directory."""
    from flexmol.model.export import save_pretrained

    out = Path(out_dir)
    save_pretrained(model.backbone, out)
    sums = {}
    for name, keys in ((TRAIN_KEYS, train_keys), (VAL_KEYS, val_keys)):
        (out / name).write_text("".join(f"{k}\n" for k in sorted(set(keys))))
        sums[name] = _sha256_text(out / name)
    task = {**meta, "task": TASK, "passes": model.passes, "inchikey_files": sums,
            "counts": {**meta.get("counts", {}), "train_molecules": len(set(train_keys)),
                       "val_molecules": len(set(val_keys))}}
    (out / TASK_FILE).write_text(json.dumps(task, indent=1) + "\n")
    return out


def is_conformer_model(path) -> bool:
    """Whether ``path`` is a directory holding a ``task.json`` (a fine-tuned task model, which
    :func:`load_conformer_model` then accepts or refuses) rather than a plain export."""
    return (Path(path) / TASK_FILE).is_file()


def task_meta(path) -> dict:
    """``task.json`` of a conformer task model; a :class:`ConfigError` in one line, naming the
    file, for anything else."""
    path = Path(path)
    file = path / TASK_FILE
    if not path.is_dir():
        raise ConfigError(f"{path}: {'not a directory' if path.exists() else 'no such directory'} "
                          "(a conformer task model, written by flexmol finetune-confgen)")
    if not file.is_file():
        raise ConfigError(f"{path}: no {TASK_FILE} (not a conformer task model: a pre-trained export?)")
    try:
        meta = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"{file}: not readable JSON ({type(exc).__name__})") from None
    if not isinstance(meta, dict) or meta.get("task") != TASK:
        what = meta.get("task") if isinstance(meta, dict) else type(meta).__name__
        raise ConfigError(f"{file}: task {what!r}, not {TASK!r} (not a conformer task model)")
    if not isinstance(meta.get("passes"), int) or isinstance(meta["passes"], bool) or meta["passes"] < 1:
        raise ConfigError(f"{file}: 'passes' is {meta.get('passes')!r}, not a positive integer")
    return meta


def load_conformer_model(path) -> tuple[ConformerModel, dict]:
    """The :class:`ConformerModel` in ``path`` (eval mode) and its ``task.json``. Nothing is
    unpickled (safetensors, YAML, JSON); the weights are checked against their checksum. Refuses
    in one line (:class:`ConfigError`, the file named) a directory that is not a conformer task
    model or whose files are damaged."""
    from flexmol.model.export import load_pretrained

    meta = task_meta(path)
    trained_inchikeys(path)  # the key files are there and are the ones written
    return ConformerModel(load_pretrained(Path(path), _stacklevel=3), meta["passes"]).eval(), meta


def trained_inchikeys(path) -> set[str]:
    """Every InChIKey the conformer task model in ``path`` was fine-tuned or validated on (its
    ``train_inchikeys.txt`` and ``val_inchikeys.txt``), each file checked against the sha256 in
    ``task.json``."""
    meta = task_meta(path)
    keys: set[str] = set()
    for name in (TRAIN_KEYS, VAL_KEYS):
        file = Path(path) / name
        if not file.is_file():
            raise ConfigError(f"{Path(path)}: no {name} (the conformer task model is incomplete)")
        if _sha256_text(file) != meta.get("inchikey_files", {}).get(name):
            raise ConfigError(f"{file}: sha256 differs from {TASK_FILE}: the file was altered or damaged")
        keys.update(line.strip() for line in file.read_text().splitlines() if line.strip())
    return keys
