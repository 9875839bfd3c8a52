"""Bemis–Murcko scaffolds (RDKit's MurckoScaffold), the grouping behind the scaffold split."""
from __future__ import annotations

from rdkit import Chem
from rdkit.Chem.Scaffolds import MurckoScaffold


def murcko_scaffold(smiles: str, include_chirality: bool = False) -> str:
    """Canonical SMILES of the molecule's Bemis–Murcko scaffold; ``""`` for an acyclic molecule
    (all acyclic molecules share that one group, as in MoleculeNet's splitter)."""
    mol = Chem.MolFromSmiles(smiles)
    if mol is None:
        raise ValueError(f"SMILES does not parse: {smiles!r}")
    return MurckoScaffold.MurckoScaffoldSmiles(mol=mol, includeChirality=include_chirality)
