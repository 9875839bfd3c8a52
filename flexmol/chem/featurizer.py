"""One input molecule -> one record (a dict of numpy arrays and scalars, schema in flexmol.data.schema)."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
from rdkit import Chem

from flexmol.chem.conformers import attach_geometry, generate_conformers, molecule_seed, mol_from_xyz_block, perceive_bonds
from flexmol.chem.errors import Rejected
from flexmol.chem.features import graph_features
from flexmol.chem.molecule import assign_stereo, identity, parse_smiles, sanitize_or_reject, standardize
from flexmol.chem.pairs import stored_tables
from flexmol.config import MODALITIES, FeaturizerConfig
from flexmol.data.schema import SCHEMA_VERSION

# Input kinds, as the readers in flexmol.data.sources produce them.
KINDS = ("smiles", "molblock", "xyz", "smiles+geometry")
GRAPH_KINDS = ("smiles", "molblock", "smiles+geometry")


@dataclass
class RawInput:
    """One molecule as read from a source, before any chemistry. ``index`` is its 0-based position
    in the source (after ``--limit``), the key that ties a record or a rejection back to it."""

    index: int
    id: str
    kind: str
    text: str
    labels: dict[str, Any] = field(default_factory=dict)
    # smiles+geometry: {"elements": symbols, "coords": [n, 3] in Å}, as lists or as the text of
    # such lists (QM9's columns; parsed here, in the worker, not in the reading process).
    geometry: Optional[dict] = None
    error: Optional[str] = None  # set by a reader that could not split this record out


class Featurizer:
    """Featurises inputs for one modality: ``paired`` (graph + conformers), ``2d`` or ``3d``."""

    def __init__(self, cfg: FeaturizerConfig, modality: str):
        if modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
        self.cfg = cfg
        self.modality = modality
        self.needs_graph = modality in ("paired", "2d")
        self.needs_3d = modality in ("paired", "3d")

    def __call__(self, raw: RawInput) -> dict:
        """The record of ``raw``; raises :class:`Rejected` with the reason when it cannot be made."""
        return self.with_molecule(raw)[0]

    def with_molecule(self, raw: RawInput) -> tuple[dict, Chem.Mol]:
        """The record and the RDKit molecule whose atoms are its nodes, in the same order."""
        cfg = self.cfg
        if raw.error:
            raise Rejected("malformed_record", raw.error, raw.text or None)
        if raw.kind not in KINDS:
            raise Rejected("bad_input", f"unknown input kind {raw.kind!r}")
        if self.needs_graph and raw.kind not in GRAPH_KINDS:
            raise Rejected("no_graph", f"a {raw.kind} input has no bond graph; use modality 3d")

        geometry = None  # molecule with explicit hydrogens and the input's own conformer
        method = None
        if raw.kind in ("smiles", "smiles+geometry"):
            mol, stripped = standardize(parse_smiles(raw.text, cfg), cfg, raw.text)
            if raw.kind == "smiles+geometry" and self.needs_3d:
                elements, coords = parse_geometry(raw.geometry or {})
                geometry = attach_geometry(Chem.AddHs(mol), elements, coords)
                method = "input"
        elif raw.kind == "molblock":
            mol = Chem.MolFromMolBlock(raw.text, sanitize=False, removeHs=False)
            if mol is None:
                raise Rejected("malformed_record", "molfile block does not parse")
            mol, stripped = standardize(sanitize_or_reject(mol, "molfile block"), cfg)
            if self.needs_3d and cfg.use_input_geometry and mol.GetNumConformers() and mol.GetConformer().Is3D():
                geometry = Chem.AddHs(mol, addCoords=True)  # no-op for atoms whose Hs are explicit
                Chem.AssignStereochemistryFrom3D(geometry)
                method = "input"
        else:  # xyz
            geometry = perceive_bonds(mol_from_xyz_block(raw.text))
            geometry, stripped = standardize(geometry, cfg)
            mol = geometry
            method = "input"

        heavy = assign_stereo(_without_hydrogens(geometry if geometry is not None else mol))
        smiles, key = identity(heavy)
        record: dict[str, Any] = {"v": SCHEMA_VERSION, "index": raw.index, "id": raw.id, "smiles": smiles,
                                  "inchikey": key, "modality": self.modality}

        if self.needs_3d:
            if geometry is None:
                mol_h = Chem.AddHs(heavy)
                coords, energies, method = generate_conformers(mol_h, cfg, molecule_seed(cfg.seed, key))
            else:
                mol_h = geometry
                coords = geometry.GetConformer().GetPositions()[None].astype(np.float32)
                energies = None
            if cfg.explicit_hydrogens:
                nodes = mol_h
            else:
                nodes = heavy
                coords = np.ascontiguousarray(coords[:, _heavy_positions(mol_h)])
            record["pos"] = coords
            record["conf_method"] = method
            if energies is not None:
                record["energy"] = energies
        else:
            nodes = Chem.AddHs(heavy) if cfg.explicit_hydrogens else heavy

        if self.needs_graph:
            record["atom_feat"], record["bond_index"], record["bond_feat"] = graph_features(nodes)
            record["z"] = np.ascontiguousarray(record["atom_feat"][:, 0])
            # The 2D pair inputs, stored so that the loader does not search every batch's graphs.
            record.update(stored_tables(Chem.GetDistanceMatrix(nodes), record["bond_index"]) or {})
        else:
            record["z"] = np.array([a.GetAtomicNum() for a in nodes.GetAtoms()], dtype=np.uint8)
        if raw.labels:
            record["labels"] = raw.labels
        if stripped:
            record["fragments_stripped"] = True
        return record, nodes


_SYMBOL = re.compile(r"[A-Z][a-z]?")
_FLOAT = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def parse_geometry(g: dict) -> tuple[list[str], np.ndarray]:
    elements, coords = g.get("elements"), g.get("coords")
    try:
        if isinstance(elements, str):
            elements = _SYMBOL.findall(elements)
        if isinstance(coords, str):
            coords = np.array(_FLOAT.findall(coords), dtype=np.float64).reshape(-1, 3)
        return list(elements), np.asarray(coords, dtype=np.float64).reshape(-1, 3)
    except (TypeError, ValueError) as exc:
        raise Rejected("malformed_geometry", f"geometry unreadable: {exc}") from None


def _without_hydrogens(mol: Chem.Mol) -> Chem.Mol:
    if mol.GetNumAtoms() == mol.GetNumHeavyAtoms():
        return mol
    # RemoveAllHs, not RemoveHs: the latter keeps some hydrogens (isotopes, bridging H) as atoms,
    # which would break the heavy-atom coordinate mapping below.
    # Sanitised again: without it the heavy atoms keep no hydrogen count and InChI sees radicals.
    return sanitize_or_reject(Chem.RemoveAllHs(mol, sanitize=False), "molecule without hydrogens")


def _heavy_positions(mol: Chem.Mol) -> np.ndarray:
    """Indices of heavy atoms in ``mol``'s order: the order RemoveAllHs keeps them in."""
    return np.fromiter((a.GetIdx() for a in mol.GetAtoms() if a.GetAtomicNum() > 1), dtype=np.int64)
