"""2D features of known molecules: counts, vocab values, bond symmetry, shortest paths."""
import numpy as np
from rdkit import Chem

from flexmol.chem import Featurizer, RawInput
from flexmol.chem.features import graph_features
from flexmol.data.collate import collate
from flexmol.chem.vocab import ATOM_FEATURE_SIZES, BOND_FEATURE_SIZES, FORMAL_CHARGE_OFFSET
from flexmol.config import FeaturizerConfig

ASPIRIN = "CC(=O)Oc1ccccc1C(=O)O"


def record(smiles, modality="2d", **cfg):
    return Featurizer(FeaturizerConfig(**cfg), modality)(RawInput(0, "t", "smiles", smiles))


def test_benzene_atoms_bonds_and_aromaticity():
    r = record("c1ccccc1")
    assert r["z"].tolist() == [6] * 6
    af = r["atom_feat"]
    assert (af[:, 2] == 3).all()  # total degree: 2 ring neighbours + 1 H
    assert (af[:, 4] == 1).all()  # one hydrogen each
    assert (af[:, 6] == int(Chem.HybridizationType.SP2)).all()
    assert (af[:, 7] == 1).all() and (af[:, 8] == 1).all()  # aromatic, in ring
    assert r["bond_index"].shape == (6, 2)
    assert (r["bond_feat"][:, 0] == int(Chem.BondType.AROMATIC)).all()
    assert (r["bond_feat"][:, 2] == 1).all()  # conjugated


def test_aspirin_counts_and_bond_list_is_each_bond_once_sorted():
    r = record(ASPIRIN)
    assert len(r["z"]) == 13 and sorted(r["z"].tolist()).count(8) == 4
    bi = r["bond_index"].astype(int)
    assert len(bi) == 13
    assert (bi[:, 0] < bi[:, 1]).all()
    assert len({tuple(b) for b in bi}) == 13
    assert r["smiles"] == Chem.MolToSmiles(Chem.MolFromSmiles(ASPIRIN))
    assert r["inchikey"] == "BSYNRYMUTXBXSQ-UHFFFAOYSA-N"


def spd_of(records, max_spd=8):
    batch = collate([dict(r, modality="2d") for r in records], max_spd=max_spd)
    return [batch["spd"][i, :len(r["z"]), :len(r["z"])].numpy() for i, r in enumerate(records)]


def test_shortest_paths_are_symmetric_with_known_values():
    benzene, aspirin = record("c1ccccc1"), record(ASPIRIN)
    spd, spd_a = spd_of([benzene, aspirin])
    assert (spd == spd.T).all() and (np.diag(spd) == 0).all()
    assert sorted(spd[0].tolist()) == [0, 1, 1, 2, 2, 3]  # ortho, meta, para
    # the record keeps the input's atom order, so RDKit's own distance matrix of the input applies
    assert (spd_a == Chem.GetDistanceMatrix(Chem.MolFromSmiles(ASPIRIN)).astype(int)).all()
    assert spd_a.max() == 6  # methyl C to the acid O
    (clipped,) = spd_of([aspirin], max_spd=4)
    assert clipped.max() == 5  # "more than 4" is its own class
    assert ((clipped == 5) == (spd_a > 4)).all()


def test_disconnected_fragments_get_the_unreachable_class():
    both = record("CC.CC", fragments="largest")  # the policy keeps one fragment...
    assert len(both["z"]) == 2
    rec = {"z": np.array([6, 6, 6, 6]), "atom_feat": np.zeros((4, 9), np.uint8),
           "bond_index": np.array([[0, 1], [2, 3]], np.uint16), "bond_feat": np.zeros((2, 3), np.uint8)}
    (spd,) = spd_of([rec])  # ...but the collation handles disconnected graphs all the same
    assert spd[0, 1] == 1 and spd[0, 2] == 9 and spd[1, 3] == 9


def test_charged_molecule_formal_charges():
    r = record("C[N+](C)(C)C")  # tetramethylammonium
    charges = r["atom_feat"][:, 3].astype(int) - FORMAL_CHARGE_OFFSET
    n = int(np.flatnonzero(r["z"] == 7)[0])
    assert charges[n] == 1 and charges.sum() == 1
    assert r["atom_feat"][n, 2] == 4  # four neighbours, no H
    acetate = record("CC(=O)[O-]")
    assert sorted((acetate["atom_feat"][:, 3].astype(int) - FORMAL_CHARGE_OFFSET).tolist()) == [-1, 0, 0, 0]


def test_chiral_molecule_tags_distinguish_enantiomers():
    l_ala = record("C[C@@H](C(=O)O)N")
    d_ala = record("C[C@H](C(=O)O)N")
    tags = {int(Chem.ChiralType.CHI_TETRAHEDRAL_CW), int(Chem.ChiralType.CHI_TETRAHEDRAL_CCW)}
    assert set(l_ala["atom_feat"][:, 1].tolist()) & tags
    assert l_ala["inchikey"] != d_ala["inchikey"]
    assert l_ala["inchikey"][:14] == d_ala["inchikey"][:14]  # same connectivity
    assert not np.array_equal(l_ala["atom_feat"][:, 1], d_ala["atom_feat"][:, 1])


def test_feature_values_stay_inside_the_vocabularies(nci_smi):
    feat = Featurizer(FeaturizerConfig(), "2d")
    lines = nci_smi.read_text().splitlines()[:500]
    checked = 0
    for i, line in enumerate(lines):
        try:
            r = feat(RawInput(i, str(i), "smiles", line.split()[0]))
        except Exception:
            continue
        assert (r["atom_feat"].max(axis=0) < np.array(ATOM_FEATURE_SIZES)).all()
        if len(r["bond_feat"]):
            assert (r["bond_feat"].max(axis=0) < np.array(BOND_FEATURE_SIZES)).all()
        checked += 1
    assert checked > 400


def test_explicit_hydrogens_become_nodes():
    heavy = record("CCO")
    with_h = record("CCO", explicit_hydrogens=True)
    assert len(heavy["z"]) == 3 and len(with_h["z"]) == 9
    assert (with_h["z"] == 1).sum() == 6
    assert len(with_h["bond_index"]) == 8
    assert with_h["inchikey"] == heavy["inchikey"]


def test_graph_features_match_rdkit_directly():
    mol = Chem.MolFromSmiles("O=C1NC(=O)c2ccccc21")
    af, bi, bf = graph_features(mol)
    for atom in mol.GetAtoms():
        i = atom.GetIdx()
        assert af[i, 0] == atom.GetAtomicNum()
        assert af[i, 4] == atom.GetTotalNumHs()
        assert bool(af[i, 8]) == atom.IsInRing()
    for (i, j), f in zip(bi.tolist(), bf):
        assert int(mol.GetBondBetweenAtoms(i, j).GetBondType()) == f[0]


def test_e_and_z_isomers_get_their_bond_stereo_and_distinct_inchikeys(egfr_sdf):
    """Read without sanitising then sanitised, a molecule has no bond stereo unless it is assigned:
    E and Z isomers would featurise alike and be rejected as duplicates of each other."""
    from rdkit.Chem import AllChem

    f = Featurizer(FeaturizerConfig(), modality="2d")
    recs = [f(RawInput(i, str(i), "smiles", s)) for i, s in enumerate(["F/C=C/F", "F/C=C\\F", "FC=CF"])]
    stereo = [tuple(r["bond_feat"][:, 1]) for r in recs]
    assert len(set(stereo)) == 3 and len({r["inchikey"] for r in recs}) == 3
    # the same from a 3D molfile: the geometry decides
    blocks = []
    for s in ("F/C=C/F", "F/C=C\\F"):
        m = Chem.AddHs(Chem.MolFromSmiles(s))
        AllChem.EmbedMolecule(m, randomSeed=0)
        blocks.append(Chem.MolToMolBlock(m))
    from_3d = [Featurizer(FeaturizerConfig(), modality="2d")(RawInput(i, str(i), "molblock", b)) for i, b in enumerate(blocks)]
    assert [r["inchikey"] for r in from_3d] == [r["inchikey"] for r in recs[:2]]
    assert [tuple(r["bond_feat"][:, 1]) for r in from_3d] == stereo[:2]
