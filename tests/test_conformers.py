"""3D records: conformer geometry is chemically sane, seeded, sized by config; input geometry kept."""
import numpy as np
import pytest
from rdkit import Chem

from flexmol.chem import Featurizer, RawInput, Rejected
from flexmol.chem.conformers import attach_geometry, mol_from_xyz_block
from flexmol.config import FeaturizerConfig


def featurize(smiles, modality="paired", **cfg):
    return Featurizer(FeaturizerConfig(**cfg), modality)(RawInput(0, "t", "smiles", smiles))


def bond_lengths(rec, conf=0):
    pos = rec["pos"][conf].astype(np.float64)
    bi = rec["bond_index"].astype(int)
    return np.linalg.norm(pos[bi[:, 0]] - pos[bi[:, 1]], axis=1)


def test_generated_bond_lengths_are_chemical():
    rec = featurize("CC(=O)Oc1ccccc1C(=O)O")
    lengths = bond_lengths(rec)
    assert rec["conf_method"] == "etkdg+mmff"
    assert lengths.min() > 1.15 and lengths.max() < 1.60
    aromatic = rec["bond_feat"][:, 0] == int(Chem.BondType.AROMATIC)
    assert np.allclose(lengths[aromatic], 1.39, atol=0.03)
    pos = rec["pos"][0]
    d = np.linalg.norm(pos[:, None] - pos[None], axis=-1) + np.eye(len(pos)) * 9
    assert d.min() > 1.0  # no two heavy atoms on top of each other


def test_conformers_are_seeded_and_counted_by_config():
    a = featurize("CCCCOc1ccccc1", num_conformers=3, seed=7)
    b = featurize("CCCCOc1ccccc1", num_conformers=3, seed=7)
    c = featurize("CCCCOc1ccccc1", num_conformers=3, seed=8)
    assert a["pos"].shape == (3, 11, 3)
    assert np.array_equal(a["pos"], b["pos"])
    assert not np.array_equal(a["pos"], c["pos"])
    assert a["energy"].shape == (3,)


def test_3d_only_record_has_no_graph():
    rec = featurize("CCO", modality="3d")
    assert set(rec) >= {"z", "pos", "smiles", "inchikey"}
    assert "atom_feat" not in rec and "bond_index" not in rec


def test_explicit_hydrogen_conformers_include_hydrogen_positions():
    rec = featurize("CCO", explicit_hydrogens=True)
    assert rec["pos"].shape == (1, 9, 3)
    ch = bond_lengths(rec)[(rec["z"][rec["bond_index"].astype(int)] == 1).any(axis=1)]
    assert np.allclose(ch, 1.0, atol=0.12)  # C-H and O-H bonds


# Buckminsterfullerene: ETKDG spends over ten seconds on the cage (and then fails) when nothing
# stops it, far beyond RDKit's smallest time limit (one second).
FULLERENE = ("c12c3c4c5c1c1c6c7c2c2c8c3c3c9c4c4c%10c5c5c1c1c6c6c%11c7c2c2c7c8c3c3c8c9c4c4c9c%10c5c5c1c1c6c6c%11"
             "c2c2c7c3c3c8c4c4c9c5c1c1c6c2c3c41")


def test_embedding_time_limit_and_size_limit_reject_with_reasons():
    import time

    started = time.perf_counter()
    with pytest.raises(Rejected) as exc:
        featurize(FULLERENE, embed_timeout_s=0.01, embed_max_attempts=1)
    assert exc.value.code == "embed_timeout" and "featurizer.embed_timeout_s=0.01" in exc.value.reason
    assert time.perf_counter() - started < 5  # cut short by the limit (1 s in RDKit), not a failed embedding
    with pytest.raises(Rejected) as exc:
        featurize("C" * 40, max_heavy_atoms=30)
    assert exc.value.code == "too_large" and "max_heavy_atoms" in exc.value.reason


def test_geometry_in_a_different_atom_order_is_mapped_back():
    """The QM9 case: a reference geometry whose atom order differs from the SMILES'."""
    mol_h = Chem.AddHs(Chem.MolFromSmiles("OCC(N)=O"))
    ref = featurize("OCC(N)=O", explicit_hydrogens=True)["pos"][0].astype(np.float64)
    perm = np.random.default_rng(0).permutation(mol_h.GetNumAtoms())
    symbols = [mol_h.GetAtomWithIdx(int(i)).GetSymbol() for i in perm]
    placed = attach_geometry(mol_h, symbols, ref[perm])
    assert np.allclose(placed.GetConformer().GetPositions(), ref, atol=1e-5) or _same_up_to_symmetry(placed, ref)


def _same_up_to_symmetry(mol, ref):
    pos = mol.GetConformer().GetPositions()
    heavy = [a.GetIdx() for a in mol.GetAtoms() if a.GetAtomicNum() > 1]
    return np.allclose(pos[heavy], ref[heavy], atol=1e-5)


def test_geometry_with_other_elements_or_bonds_is_rejected():
    mol_h = Chem.AddHs(Chem.MolFromSmiles("CCO"))
    pos = featurize("CCO", explicit_hydrogens=True)["pos"][0].astype(np.float64)
    symbols = [a.GetSymbol() for a in mol_h.GetAtoms()]
    with pytest.raises(Rejected, match="different elements"):
        attach_geometry(mol_h, ["N"] + symbols[1:], pos)
    stretched = pos.copy()
    stretched[2] += 3.0  # pull the oxygen away: the C-O bond is gone
    with pytest.raises(Rejected) as exc:
        attach_geometry(mol_h, symbols, stretched)
    assert exc.value.code == "geometry_mismatch"


def test_xyz_frame_parses_and_malformed_frames_say_why():
    block = "3\nwater\nO 0.0 0.0 0.0\nH 0.96 0.0 0.0\nH -0.24 0.93 0.0"
    mol = mol_from_xyz_block(block)
    assert mol.GetNumAtoms() == 3 and mol.GetConformer().Is3D()
    with pytest.raises(Rejected, match="declares 4 atoms"):
        mol_from_xyz_block(block.replace("3\n", "4\n", 1))
    with pytest.raises(Rejected, match="symbol x y z"):
        mol_from_xyz_block("1\nx\nC 0.0 zero 0.0")
