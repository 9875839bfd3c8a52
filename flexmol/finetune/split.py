"""Train/validation/test splits of a fine-tuning set: the deterministic scaffold split of the
literature's MoleculeNet protocol, and a seeded random split.

Scaffold split (MoleculeNet, as used by GEM, Uni-Mol and FlexMol): molecules are grouped by
Bemis–Murcko scaffold; groups are taken largest first (ties: later first appearance first) into train until
it would exceed its share, then validation, then test. The same split for every seed — seeds vary
the training. No scaffold is ever in two parts.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from flexmol.chem.scaffold import murcko_scaffold

SPLITS = ("scaffold", "random")


@dataclass(frozen=True)
class Split:
    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray

    def sizes(self) -> dict:
        return {"train": len(self.train), "valid": len(self.valid), "test": len(self.test)}


def _check(fractions) -> tuple[float, float, float]:
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"split fractions must be three non-negative numbers summing to 1, got {list(fractions)}")
    return tuple(float(f) for f in fractions)


def scaffold_groups(smiles: list[str]) -> list[list[int]]:
    """Indices grouped by scaffold, largest group first; among groups of one size, the group whose
    first molecule comes later in the file first (DeepChem's and GEM's order, so that the parts
    are the ones the literature's numbers were measured on)."""
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(smiles):
        groups.setdefault(murcko_scaffold(s), []).append(i)
    return sorted(groups.values(), key=lambda g: (len(g), g[0]), reverse=True)


def scaffold_split(smiles: list[str], fractions=(0.8, 0.1, 0.1)) -> Split:
    f_train, f_valid, _ = _check(fractions)
    n = len(smiles)
    train_cut, valid_cut = f_train * n, (f_train + f_valid) * n
    train: list[int] = []
    valid: list[int] = []
    test: list[int] = []
    for group in scaffold_groups(smiles):
        if len(train) + len(group) <= train_cut:
            train += group
        elif len(train) + len(valid) + len(group) <= valid_cut:
            valid += group
        else:
            test += group
    return Split(*(np.array(sorted(p), dtype=np.int64) for p in (train, valid, test)))


def random_split(n: int, seed: int, fractions=(0.8, 0.1, 0.1)) -> Split:
    f_train, f_valid, _ = _check(fractions)
    perm = np.random.default_rng(seed).permutation(n)
    a, b = int(round(f_train * n)), int(round((f_train + f_valid) * n))
    return Split(*(np.sort(p) for p in (perm[:a], perm[a:b], perm[b:])))


def make_split(kind: str, smiles: list[str], seed: int, fractions=(0.8, 0.1, 0.1)) -> Split:
    if kind == "scaffold":
        return scaffold_split(smiles, fractions)
    if kind == "random":
        return random_split(len(smiles), seed, fractions)
    raise ValueError(f"unknown split {kind!r}; choose from {', '.join(SPLITS)}")
