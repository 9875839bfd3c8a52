"""Parsing and standardisation: every way a molecule can be unacceptable ends in :class:`Rejected`.

Salts and mixtures policy (``featurizer.fragments``):
- ``largest`` (default): keep the fragment with the most heavy atoms (ties: the first in the
  input), as Uni-Mol and most pre-training sets do; the record notes ``fragments_stripped`` and
  the manifest counts them. Counter-ions and solvents thus never enter pre-training.
- ``reject``: any input with more than one fragment is rejected with the fragment count.
"""
from __future__ import annotations

import re

from rdkit import Chem, RDLogger

from flexmol.chem.errors import Rejected
from flexmol.config import FeaturizerConfig

RDLogger.DisableLog("rdApp.*")  # reasons are captured per molecule; RDKit's own log is noise here


def sanitize_or_reject(mol: Chem.Mol, what: str) -> Chem.Mol:
    try:
        Chem.SanitizeMol(mol)
    except Exception as exc:  # RDKit raises its own subclasses (valence, kekulisation, ...)
        raise Rejected("sanitization", f"{what} fails RDKit sanitisation: {str(exc).strip()}") from None
    return mol


def assign_stereo(mol: Chem.Mol) -> Chem.Mol:
    """Double-bond E/Z and atom chirality as RDKit's sanitising readers assign them, in place. A
    molecule read with ``sanitize=False`` and then sanitised has no bond stereo: E and Z isomers
    would get the same bond features and the same InChIKey (and be rejected as duplicates of each
    other). A 3D conformer decides from the geometry; a 2D one from its wedges and coordinates;
    otherwise the SMILES' bond directions and chiral tags."""
    if mol.GetNumConformers():
        conf = mol.GetConformer()
        if conf.Is3D():
            Chem.AssignStereochemistryFrom3D(mol, conf.GetId())
            return mol
        Chem.AssignChiralTypesFromBondDirs(mol, conf.GetId())
        Chem.DetectBondStereochemistry(mol, conf.GetId())
    Chem.AssignStereochemistry(mol, cleanIt=True, force=True)
    return mol


_WHITESPACE = re.compile(r"\s")  # any Unicode whitespace: space, tab, line breaks, U+2028, U+00A0 ...
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# A ChemAxon extension (CXSMILES): one space, then a single |...| block ending the field,
# e.g. "C[C@H](F)Cl |&1:1|". RDKit parses the block (an invalid one fails the parse).
_CX_TAIL = re.compile(r" \|[^|\s]*\|\Z")


def parse_smiles(smiles: str, cfg: FeaturizerConfig) -> Chem.Mol:
    smiles = smiles.strip()
    if not smiles:
        raise Rejected("empty", "empty SMILES")
    # RDKit reads whatever follows a space, tab or newline as the molecule's name and parses only
    # the text before it: "c1ccccc1 CCCl" would silently become benzene. A SMILES holds no
    # whitespace, so any inside the field (a CSV cell with a newline, two SMILES in one column) is
    # a rejection, never a truncation. The one exception is a trailing CXSMILES block, which RDKit
    # reads as part of the molecule.
    cx = _CX_TAIL.search(smiles)
    blank = _WHITESPACE.search(smiles, 0, cx.start() if cx else len(smiles))
    if blank:
        raise Rejected("invalid_smiles", f"SMILES contains whitespace ({blank.group()!r} at position {blank.start()}): "
                       "RDKit would parse only the text before it", smiles)
    # RDKit also skips a NUL at either end ("CCO\x00" parses as ethanol): control characters mean
    # a binary or corrupted input, never a molecule.
    control = _CONTROL.search(smiles)
    if control:
        raise Rejected("invalid_smiles", f"SMILES contains the control character {control.group()!r} at position "
                       f"{control.start()} (binary or corrupted input)", smiles)
    # A guard before parsing: a string this long cannot be within the size limit, and RDKit's
    # parser and ring perception are super-linear on pathological inputs.
    if len(smiles) > 12 * cfg.max_heavy_atoms + 200:
        raise Rejected("too_large", f"SMILES of {len(smiles)} characters exceeds the size limit", smiles)
    mol = Chem.MolFromSmiles(smiles, sanitize=False)
    if mol is None:
        raise Rejected("invalid_smiles", "SMILES does not parse (syntax error)", smiles)
    return sanitize_or_reject(mol, "SMILES")


def standardize(mol: Chem.Mol, cfg: FeaturizerConfig, smiles: str | None = None) -> tuple[Chem.Mol, bool]:
    """Fragment policy, element whitelist and size limits. Returns (mol, fragments_stripped)."""
    stripped = False
    frags = Chem.GetMolFrags(mol, asMols=False, sanitizeFrags=False)
    if len(frags) > 1:
        if cfg.fragments == "reject":
            raise Rejected("mixture", f"{len(frags)} fragments (salt or mixture) and featurizer.fragments=reject", smiles)
        heavy = [sum(1 for i in f if mol.GetAtomWithIdx(i).GetAtomicNum() > 1) for f in frags]
        keep = max(range(len(frags)), key=lambda k: (heavy[k], -k))
        mol = sanitize_or_reject(Chem.GetMolFrags(mol, asMols=True, sanitizeFrags=False)[keep], "largest fragment")
        stripped = True
    allowed, outside = _element_filter(tuple(cfg.elements))
    # One C++ substructure test; the per-atom Python loop only runs for molecules it rejects.
    if mol.HasSubstructMatch(outside):
        bad = sorted({a.GetSymbol() for a in mol.GetAtoms() if a.GetAtomicNum() not in allowed})
        raise Rejected("element", f"unsupported element(s) {', '.join(bad)} (featurizer.elements)", smiles)
    n_heavy = mol.GetNumHeavyAtoms()
    if n_heavy > cfg.max_heavy_atoms:
        raise Rejected("too_large", f"{n_heavy} heavy atoms > featurizer.max_heavy_atoms={cfg.max_heavy_atoms}", smiles)
    if n_heavy < cfg.min_heavy_atoms:
        raise Rejected("too_small", f"{n_heavy} heavy atoms < featurizer.min_heavy_atoms={cfg.min_heavy_atoms}", smiles)
    return mol, stripped


_FILTERS: dict[tuple, tuple[frozenset, Chem.Mol]] = {}


def _element_filter(symbols: tuple) -> tuple[frozenset, Chem.Mol]:
    """(allowed atomic numbers, a SMARTS query matching any atom outside them)."""
    if symbols not in _FILTERS:
        table = Chem.GetPeriodicTable()
        allowed = frozenset(table.GetAtomicNumber(s) for s in symbols)
        query = Chem.MolFromSmarts("[" + ";".join(f"!#{z}" for z in sorted(allowed)) + "]")
        _FILTERS[symbols] = (allowed, query)
    return _FILTERS[symbols]


def identity(mol: Chem.Mol) -> tuple[str, str]:
    """(canonical isomeric SMILES, InChIKey) of ``mol``; an InChI failure is a rejection."""
    smiles = Chem.MolToSmiles(mol)
    key = Chem.MolToInchiKey(mol)
    if not key:
        raise Rejected("inchi", "InChI could not be computed for this molecule", smiles)
    return smiles, key
