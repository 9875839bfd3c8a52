"""2D graph features of an RDKit molecule. (Shortest-path tables are stored with the record by
:mod:`flexmol.chem.pairs`, or computed at batching time in the loader workers.)

This is the hot loop of 2D featurisation. What costs in it is crossing into RDKit: ~0.7 us to make
an atom or bond wrapper and 0.3-0.7 us for each accessor, on MOSES molecules of ~22 atoms and ~24
bonds. So each atom and bond is visited once with one call per feature, and the rest (clipping
counts into their last bucket, ordering bond ends) is a few numpy calls on the whole molecule.
"""
from __future__ import annotations

import numpy as np
from rdkit import Chem

from flexmol.chem.errors import Rejected
from flexmol.chem.vocab import ATOM_FEATURE_SIZES, FORMAL_CHARGE_OFFSET

_MAX_NODES = int(np.iinfo(np.uint16).max) + 1

# Bounds of the atom feature columns (atomic number, chirality, degree, charge, Hs, radicals,
# hybridisation, aromatic, in ring): counts are clipped into their last bucket ("that many or
# more"), the formal charge into -FORMAL_CHARGE_OFFSET..max and then shifted to start at 0;
# enumerations and flags pass unchanged.
_I16 = np.iinfo(np.int16)
_ATOM_LOW = np.array([_I16.min] * 3 + [-FORMAL_CHARGE_OFFSET] + [_I16.min] * 5, dtype=np.int16)
_ATOM_HIGH = np.array([_I16.max, _I16.max, ATOM_FEATURE_SIZES[2] - 1, ATOM_FEATURE_SIZES[3] - 1 - FORMAL_CHARGE_OFFSET,
                       ATOM_FEATURE_SIZES[4] - 1, ATOM_FEATURE_SIZES[5] - 1, _I16.max, _I16.max, _I16.max],
                      dtype=np.int16)
_ATOM_SHIFT = np.array([0, 0, 0, FORMAL_CHARGE_OFFSET, 0, 0, 0, 0, 0], dtype=np.int16)


def graph_features(mol: Chem.Mol) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Atom and bond features of ``mol`` (every atom of the molecule becomes a node).

    Returns ``atom_feat`` uint8 [n, 9], ``bond_index`` uint16 [E, 2] (each bond once, begin < end)
    and ``bond_feat`` uint8 [E, 3]; columns as in :mod:`flexmol.chem.vocab`.
    """
    n = mol.GetNumAtoms()
    if n > _MAX_NODES:
        raise Rejected("too_large", f"{n} atoms: bond_index stores atom numbers as uint16 (at most {_MAX_NODES} nodes)")
    # The hydrogen count includes hydrogen atoms bonded to the atom (GetTotalNumHs(True)). In a
    # molecule without hydrogen atoms the plain count is the same number at half the price.
    h_atoms = n != mol.GetNumHeavyAtoms()
    # Indexed access, not ``for a in mol.GetAtoms()``: RDKit's sequence wrapper re-checks the
    # length on every step and makes this loop 3x slower.
    atoms = [
        (a.GetAtomicNum(), a.GetChiralTag(), a.GetTotalDegree(), a.GetFormalCharge(), a.GetTotalNumHs(h_atoms),
         a.GetNumRadicalElectrons(), a.GetHybridization(), a.GetIsAromatic(), a.IsInRing())
        for a in map(mol.GetAtomWithIdx, range(n))
    ]
    bonds = [
        (b.GetBeginAtomIdx(), b.GetEndAtomIdx(), b.GetBondType(), b.GetStereo(), b.GetIsConjugated())
        for b in map(mol.GetBondWithIdx, range(mol.GetNumBonds()))
    ]
    atom = np.array(atoms, dtype=np.int16).reshape(-1, 9)
    np.maximum(atom, _ATOM_LOW, out=atom)
    np.minimum(atom, _ATOM_HIGH, out=atom)
    atom += _ATOM_SHIFT
    bond = np.array(bonds, dtype=np.int32).reshape(-1, 5)
    index = np.sort(bond[:, :2], axis=1).astype(np.uint16)
    return atom.astype(np.uint8), index, bond[:, 2:].astype(np.uint8)
