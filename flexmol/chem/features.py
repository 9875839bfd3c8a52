"""2D graph features of an RDKit molecule. (Shortest paths are computed at batching time, in the
loader workers: :func:`flexmol.data.collate.batch_shortest_paths`.)"""
from __future__ import annotations

import numpy as np
from rdkit import Chem

from flexmol.chem.errors import Rejected
from flexmol.chem.vocab import ATOM_FEATURE_SIZES, FORMAL_CHARGE_OFFSET

_MAX_DEGREE = ATOM_FEATURE_SIZES[2] - 1
_MAX_CHARGE = ATOM_FEATURE_SIZES[3] - 1 - FORMAL_CHARGE_OFFSET
_MAX_HS = ATOM_FEATURE_SIZES[4] - 1
_MAX_RADICALS = ATOM_FEATURE_SIZES[5] - 1
_MAX_NODES = int(np.iinfo(np.uint16).max) + 1


def graph_features(mol: Chem.Mol) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Atom and bond features of ``mol`` (every atom of the molecule becomes a node).

    Returns ``atom_feat`` uint8 [n, 9], ``bond_index`` uint16 [E, 2] (each bond once, begin < end)
    and ``bond_feat`` uint8 [E, 3]; columns as in :mod:`flexmol.chem.vocab`.
    """
    if mol.GetNumAtoms() > _MAX_NODES:
        raise Rejected("too_large", f"{mol.GetNumAtoms()} atoms: bond_index stores atom numbers as uint16 "
                       f"(at most {_MAX_NODES} nodes)")
    # Indexed access, not ``for a in mol.GetAtoms()``: RDKit's sequence wrapper re-checks the
    # length on every step and makes this loop, the hot spot of 2D featurisation, 3x slower.
    rows = []
    append = rows.append
    atom_at = mol.GetAtomWithIdx
    for i in range(mol.GetNumAtoms()):
        a = atom_at(i)
        append(
            (
                a.GetAtomicNum(),
                a.GetChiralTag(),
                a.GetTotalDegree(),
                a.GetFormalCharge(),
                a.GetTotalNumHs(True),
                a.GetNumRadicalElectrons(),
                a.GetHybridization(),
                a.GetIsAromatic(),
                a.IsInRing(),
            )
        )
    atom = np.array(rows, dtype=np.int16).reshape(-1, 9)
    np.minimum(atom[:, 2], _MAX_DEGREE, out=atom[:, 2])
    np.clip(atom[:, 3], -FORMAL_CHARGE_OFFSET, _MAX_CHARGE, out=atom[:, 3])
    atom[:, 3] += FORMAL_CHARGE_OFFSET
    np.minimum(atom[:, 4], _MAX_HS, out=atom[:, 4])
    np.minimum(atom[:, 5], _MAX_RADICALS, out=atom[:, 5])

    bonds = [
        (b.GetBeginAtomIdx(), b.GetEndAtomIdx(), b.GetBondType(), b.GetStereo(), b.GetIsConjugated())
        for b in map(mol.GetBondWithIdx, range(mol.GetNumBonds()))
    ]
    b = np.array(bonds, dtype=np.int32).reshape(-1, 5)
    index = np.sort(b[:, :2], axis=1).astype(np.uint16)
    return atom.astype(np.uint8), index, b[:, 2:].astype(np.uint8)
