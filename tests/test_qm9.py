"""QM9 paired records: the DFT geometry is attached to the SMILES graph through a checked atom mapping."""
import numpy as np
import pytest
from rdkit import Chem

from flexmol.chem import Featurizer, Rejected
from flexmol.chem.featurizer import parse_geometry
from flexmol.config import FeaturizerConfig


@pytest.fixture(scope="module")
def paired(qm9_rows):
    feat = Featurizer(FeaturizerConfig(), "paired")
    out, rejected = [], []
    for raw in qm9_rows:
        try:
            out.append((raw, feat(raw)))
        except Rejected as exc:
            rejected.append((raw, exc))
    return out, rejected


def test_most_qm9_molecules_map_and_every_rejection_has_a_reason(paired):
    ok, rejected = paired
    assert len(ok) >= 0.9 * (len(ok) + len(rejected))
    assert all(exc.code == "geometry_mismatch" and exc.reason for _, exc in rejected)


def test_mapped_coordinates_are_the_dft_coordinates_of_the_same_atoms(paired):
    ok, _ = paired
    for raw, rec in ok[:200]:
        elements, coords = parse_geometry(raw.geometry)
        heavy_ref = coords[[i for i, e in enumerate(elements) if e != "H"]]
        pos = rec["pos"][0].astype(np.float64)
        assert rec["conf_method"] == "input"
        # same multiset of heavy-atom positions (rounded), as a mapping permutes but never moves atoms
        key = lambda a: sorted(map(tuple, np.round(a, 3)))
        assert key(pos) == key(heavy_ref)
        # and each mapped position carries the element the geometry gives it
        z_at = {tuple(np.round(c, 3)): e for c, e in zip(coords, elements)}
        symbols = [Chem.GetPeriodicTable().GetElementSymbol(int(z)) for z in rec["z"]]
        assert [z_at[tuple(np.round(p, 3))] for p in pos] == symbols


def test_bonded_atoms_are_at_bonding_distance_in_the_dft_geometry(paired):
    ok, _ = paired
    for _, rec in ok[:200]:
        if len(rec["bond_index"]) == 0:
            continue
        bi = rec["bond_index"].astype(int)
        pos = rec["pos"][0]
        lengths = np.linalg.norm(pos[bi[:, 0]] - pos[bi[:, 1]], axis=1)
        assert lengths.min() > 1.0 and lengths.max() < 1.75


def test_identity_matches_the_smiles_for_molecules_without_stereo(paired):
    ok, _ = paired
    checked = 0
    for raw, rec in ok:
        mol = Chem.MolFromSmiles(raw.text)
        if Chem.FindMolChiralCenters(mol, includeUnassigned=True, useLegacyImplementation=False):
            continue
        assert rec["inchikey"][:14] == Chem.MolToInchiKey(mol)[:14]
        checked += 1
    assert checked > 100


def test_labels_are_the_twelve_qm9_targets(paired):
    ok, _ = paired
    raw, rec = ok[0]
    assert len(rec["labels"]) == 12 and isinstance(rec["labels"]["gap"], float)
