"""3D: ETKDGv3 conformers with MMFF94 optimisation, and geometries taken from the input.

Coordinates are in Å. Conformers are always generated on the molecule with explicit hydrogens
(ETKDG needs them for sensible geometry); the caller drops the hydrogens afterwards when the
featuriser works on heavy atoms, which keeps heavy-atom order (RDKit appends hydrogens last).
"""
from __future__ import annotations

import hashlib
import re
import time

import numpy as np
from rdkit import Chem
from rdkit.Chem import rdDetermineBonds, rdDistGeom, rdForceFieldHelpers

from flexmol.chem.errors import Rejected
from flexmol.config import FeaturizerConfig


def molecule_seed(base_seed: int, key: str) -> int:
    """Per-molecule RNG seed from the config seed and the molecule's identity (its InChIKey), so a
    conformer does not depend on where the molecule sits in the input or on the shard size."""
    digest = hashlib.sha256(f"{base_seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def generate_conformers(mol_h: Chem.Mol, cfg: FeaturizerConfig, seed: int) -> tuple[np.ndarray, np.ndarray | None, str]:
    """Embed ``cfg.num_conformers`` conformers of ``mol_h`` (hydrogens explicit) and optimise them.

    Returns (coords float32 [K', n, 3] with 1 <= K' <= K, MMFF energies float32 [K'] or None,
    method). Fewer than K conformers come back when ETKDG fails for some; none is a rejection.
    """
    params = rdDistGeom.ETKDGv3()
    params.randomSeed = seed
    params.numThreads = 1
    params.timeout = int(np.ceil(cfg.embed_timeout_s)) if cfg.embed_timeout_s > 0 else 0
    params.clearConfs = True
    started = time.perf_counter()
    cids: list[int] = []
    for attempt in range(cfg.embed_max_attempts):
        # The second attempt starts from random coordinates, RDKit's own remedy for molecules
        # whose eigenvalue embedding fails (large rings, cages).
        params.useRandomCoords = attempt > 0
        # A stopped embedding (time limit) returns [-1], not an empty list.
        cids = [c for c in rdDistGeom.EmbedMultipleConfs(mol_h, cfg.num_conformers, params) if c >= 0]
        if cids:
            break
    if not cids:
        elapsed = time.perf_counter() - started
        if cfg.embed_timeout_s > 0 and elapsed >= cfg.embed_timeout_s * cfg.embed_max_attempts * 0.95:
            raise Rejected("embed_timeout", f"ETKDG embedding timed out ({elapsed:.1f} s, featurizer.embed_timeout_s={cfg.embed_timeout_s})")
        raise Rejected("embed_failed", f"ETKDG embedding failed after {cfg.embed_max_attempts} attempt(s)")

    energies = None
    method = "etkdg"
    if cfg.mmff and rdForceFieldHelpers.MMFFHasAllMoleculeParams(mol_h):
        results = rdForceFieldHelpers.MMFFOptimizeMoleculeConfs(mol_h, numThreads=1, maxIters=cfg.mmff_max_iters)
        energies = np.array([e for _, e in results], dtype=np.float32)
        method = "etkdg+mmff"
    coords = np.stack([mol_h.GetConformer(c).GetPositions() for c in cids]).astype(np.float32)
    if not np.isfinite(coords).all():
        raise Rejected("embed_failed", "conformer has non-finite coordinates")
    return coords, energies, method


def mol_from_xyz_block(block: str) -> Chem.Mol:
    """An XYZ frame (count, comment, ``symbol x y z`` lines) as a molecule with one conformer and no
    bonds. Malformed frames are rejected with the line at fault."""
    # Lines end at \n or \r only: str.splitlines() would also break a comment line at U+2028,
    # U+0085 or a form feed and shift every atom line after it.
    lines = re.split(r"\r\n|\r|\n", block.strip("\r\n"))
    if len(lines) < 3:
        raise Rejected("malformed_xyz", "XYZ frame shorter than 3 lines")
    try:
        n = int(lines[0].split()[0])
    except (ValueError, IndexError):
        raise Rejected("malformed_xyz", f"XYZ atom count line is not a number: {lines[0][:40]!r}") from None
    atoms = lines[2 : 2 + n]
    if len(atoms) != n:
        raise Rejected("malformed_xyz", f"XYZ frame declares {n} atoms but has {len(atoms)} atom lines")
    symbols, coords = [], []
    for ln in atoms:
        parts = ln.split()
        try:
            symbols.append(parts[0])
            coords.append([float(x.replace("*^", "e")) for x in parts[1:4]])
        except (ValueError, IndexError):
            raise Rejected("malformed_xyz", f"XYZ atom line not 'symbol x y z': {ln[:60]!r}") from None
        if len(coords[-1]) != 3:
            raise Rejected("malformed_xyz", f"XYZ atom line not 'symbol x y z': {ln[:60]!r}")
    return mol_from_elements(symbols, np.asarray(coords, dtype=np.float64))


def mol_from_elements(symbols: list[str], coords: np.ndarray) -> Chem.Mol:
    table = Chem.GetPeriodicTable()
    rw = Chem.RWMol()
    for s in symbols:
        try:
            z = table.GetAtomicNumber(s.capitalize() if len(s) <= 2 else s)
        except RuntimeError:
            z = 0
        if z <= 0:
            raise Rejected("element", f"unknown element symbol {s!r} in geometry")
        atom = Chem.Atom(z)
        atom.SetNoImplicit(True)
        rw.AddAtom(atom)
    if coords.shape != (len(symbols), 3) or not np.isfinite(coords).all():
        raise Rejected("malformed_geometry", f"geometry has shape {coords.shape} for {len(symbols)} atoms, or non-finite values")
    conf = Chem.Conformer(len(symbols))
    conf.Set3D(True)
    for i, xyz in enumerate(coords):
        conf.SetAtomPosition(i, xyz.tolist())
    rw.AddConformer(conf, assignId=True)
    return rw.GetMol()


def perceive_bonds(geo: Chem.Mol, charge: int = 0) -> Chem.Mol:
    """Bonds and bond orders from a bare geometry (RDKit's xyz2mol port); rejected if it fails."""
    mol = Chem.Mol(geo)
    try:
        rdDetermineBonds.DetermineBonds(mol, charge=charge)
        Chem.SanitizeMol(mol)
    except Exception as exc:
        raise Rejected("bond_perception", f"could not perceive bonds from the geometry: {str(exc).strip()[:120]}") from None
    return mol


def _skeleton(mol: Chem.Mol) -> Chem.Mol:
    """Elements and connectivity only: single bonds, no charges, no aromaticity."""
    rw = Chem.RWMol()
    for a in mol.GetAtoms():
        b = Chem.Atom(a.GetAtomicNum())
        b.SetNoImplicit(True)
        rw.AddAtom(b)
    for bond in mol.GetBonds():
        rw.AddBond(bond.GetBeginAtomIdx(), bond.GetEndAtomIdx(), Chem.BondType.SINGLE)
    m = rw.GetMol()
    m.UpdatePropertyCache(strict=False)
    return m


def attach_geometry(mol_h: Chem.Mol, symbols: list[str], coords: np.ndarray) -> Chem.Mol:
    """Put a reference geometry (e.g. QM9's DFT structure, hydrogens included, in its own atom
    order) onto ``mol_h``, the molecule parsed from the SMILES with explicit hydrogens.

    The atom mapping is found by matching the bond graph that the geometry implies (covalent
    radii) against the SMILES graph, element by element. Different atom counts, elements or bond
    graphs (the molecule changed during relaxation, or the SMILES is wrong) are rejected with the
    difference named. Stereochemistry is then assigned from the 3D structure, so the record's
    chirality features describe the geometry it carries.
    """
    geo = mol_from_elements(symbols, coords)
    if geo.GetNumAtoms() != mol_h.GetNumAtoms():
        raise Rejected(
            "geometry_mismatch",
            f"SMILES has {mol_h.GetNumAtoms()} atoms with hydrogens, geometry has {geo.GetNumAtoms()}",
        )
    formula_smiles = sorted(a.GetAtomicNum() for a in mol_h.GetAtoms())
    formula_geo = sorted(a.GetAtomicNum() for a in geo.GetAtoms())
    if formula_smiles != formula_geo:
        raise Rejected("geometry_mismatch", "SMILES and geometry have different elements")
    conn = Chem.RWMol(geo)
    rdDetermineBonds.DetermineConnectivity(conn)
    if conn.GetNumBonds() != mol_h.GetNumBonds():
        raise Rejected(
            "geometry_mismatch",
            f"geometry implies {conn.GetNumBonds()} bonds, SMILES has {mol_h.GetNumBonds()}: "
            "the bond graph changed (e.g. during DFT relaxation)",
        )
    match = _skeleton(conn).GetSubstructMatch(_skeleton(mol_h))
    if len(match) != mol_h.GetNumAtoms():
        raise Rejected("geometry_mismatch", "the bond graph implied by the geometry differs from the SMILES graph")
    out = Chem.Mol(mol_h)
    out.RemoveAllConformers()
    conf = Chem.Conformer(out.GetNumAtoms())
    conf.Set3D(True)
    for i_smiles, i_geo in enumerate(match):
        conf.SetAtomPosition(i_smiles, coords[i_geo].tolist())
    out.AddConformer(conf, assignId=True)
    Chem.AssignStereochemistryFrom3D(out)
    return out
