"""2D graph features of an RDKit molecule, and shortest-path distances over its bonds."""
from __future__ import annotations

import numpy as np
from rdkit import Chem

from flexmol.chem.vocab import ATOM_FEATURE_SIZES, FORMAL_CHARGE_OFFSET

_MAX_DEGREE = ATOM_FEATURE_SIZES[2] - 1
_MAX_CHARGE = ATOM_FEATURE_SIZES[3] - 1 - FORMAL_CHARGE_OFFSET
_MAX_HS = ATOM_FEATURE_SIZES[4] - 1
_MAX_RADICALS = ATOM_FEATURE_SIZES[5] - 1


def graph_features(mol: Chem.Mol) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Atom and bond features of ``mol`` (every atom of the molecule becomes a node).

    Returns ``atom_feat`` uint8 [n, 9], ``bond_index`` uint16 [E, 2] (each bond once, begin < end)
    and ``bond_feat`` uint8 [E, 3]; columns as in :mod:`flexmol.chem.vocab`.
    """
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


def shortest_path_distances(num_atoms: int, bond_index: np.ndarray, max_distance: int | None = None) -> np.ndarray:
    """Shortest-path distance (in bonds) between every pair of atoms: int [n, n].

    Atoms in different fragments get ``max_distance + 1`` when ``max_distance`` is given (the
    "unreachable" class), else -1. With ``max_distance`` the result is clipped to
    ``0..max_distance + 1``.
    """
    from scipy.sparse import csr_matrix  # here, not at the top: featurisation workers never need it
    from scipy.sparse.csgraph import shortest_path

    if num_atoms == 0:
        return np.zeros((0, 0), dtype=np.int64)
    edges = np.asarray(bond_index, dtype=np.int64).reshape(-1, 2)
    adj = csr_matrix(
        (np.ones(len(edges), dtype=np.int8), (edges[:, 0], edges[:, 1])), shape=(num_atoms, num_atoms)
    )
    dist = shortest_path(adj, directed=False, unweighted=True)
    unreachable = ~np.isfinite(dist)
    if max_distance is None:
        dist[unreachable] = -1
        return dist.astype(np.int64)
    dist[unreachable] = max_distance + 1
    return np.minimum(dist, max_distance + 1).astype(np.int64)
