"""Conformation generation: RMSD, COV and MAT on hand-made cases, the held-out QM9 evaluation."""
import numpy as np
import pytest
from rdkit import Chem
from rdkit.Chem import AllChem

from flexmol import config, save_pretrained
from flexmol.cli import main as cli
from flexmol.evaluate.confgen import ConfgenConfig, cov_mat, evaluate_qm9, refine, rmsd_matrix
from flexmol.featurize import run_featurize
from flexmol.model import FlexMol
from flexmol.model.summary import model_config


def _embedded(smiles: str, seed: int = 7):
    mol_h = Chem.AddHs(Chem.MolFromSmiles(smiles))
    AllChem.EmbedMolecule(mol_h, randomSeed=seed)
    mol = Chem.RemoveHs(mol_h)
    return mol, mol.GetConformer().GetPositions()


def _rotation(seed):
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    return q * np.sign(np.linalg.det(q))


def test_rmsd_is_zero_after_a_rigid_motion():
    mol, x = _embedded("OCC(F)C#N")
    moved = x @ _rotation(1).T + np.array([3.0, -2.0, 5.0])
    assert rmsd_matrix(mol, x[None], moved[None])[0, 0] == pytest.approx(0.0, abs=1e-6)


def test_rmsd_of_a_scaled_geometry_is_known():
    """Scaling about the centroid by s: the best rotation is the identity, and the RMSD is
    |s - 1| times the root-mean-square distance of the atoms from the centroid."""
    mol, x = _embedded("OCC(F)C#N")
    c = x - x.mean(0)
    for s in (1.1, 1.3):
        expected = (s - 1) * np.sqrt((c ** 2).sum(1).mean())
        got = rmsd_matrix(mol, x[None], (c * s @ _rotation(2).T)[None])[0, 0]
        assert got == pytest.approx(expected, rel=1e-5)


def test_rmsd_follows_molecular_symmetry():
    """Swapping the two methyl carbons of isopropanol changes nothing chemically: RMSD 0."""
    mol, x = _embedded("CC(C)O")
    methyls = [a.GetIdx() for a in mol.GetAtoms() if a.GetDegree() == 1 and a.GetSymbol() == "C"]
    swapped = x.copy()
    swapped[methyls] = x[methyls[::-1]]
    assert rmsd_matrix(mol, x[None], swapped[None])[0, 0] == pytest.approx(0.0, abs=1e-6)
    assert np.sqrt(((swapped - x) ** 2).sum(1).mean()) > 0.5  # naive atom-by-atom RMSD is not 0


def test_cov_and_mat_of_a_hand_made_rmsd_matrix():
    rmsd = np.array([[0.3, 0.7, 0.9], [0.6, 0.55, 1.2]])  # 2 references x 3 generated
    cov, mat = cov_mat(rmsd, 0.5)
    assert cov == 0.5 and mat == pytest.approx((0.3 + 0.55) / 2)
    assert cov_mat(rmsd, 0.6) == (1.0, pytest.approx(0.425))


def test_refinement_is_equivariant():
    """The coordinate head's update moves with the molecule: refining a rotated conformer gives
    the rotated refinement."""
    import torch

    from flexmol.chem.featurizer import Featurizer, RawInput

    torch.manual_seed(0)
    cfg = model_config("tiny")
    model = FlexMol(cfg).eval().double()
    rec, mol = Featurizer(config.FeaturizerConfig(), "2d").with_molecule(RawInput(0, "m", "smiles", "OCC(F)C#N"))
    x = _embedded("OCC(F)C#N")[1]
    rot = _rotation(3)
    a = refine(model, rec, x[None], 2)[0]
    b = refine(model, rec, (x @ rot.T)[None], 2)[0]
    assert np.allclose(a @ rot.T, b, atol=1e-6)
    assert not np.allclose(a, x)


@pytest.mark.slow
def test_qm9_evaluation_skips_molecules_seen_in_pretraining(qm9_rows, tmp_path):
    seen = tmp_path / "seen"
    run_featurize(config.build(config.FeaturizeConfig, {
        "source": "qm9", "out": str(seen), "modality": "paired", "limit": 30,
        "job": {"executor": "serial", "shard_size": 50, "progress": False}}), log=lambda m: None)
    model = FlexMol(model_config("tiny")).eval()
    res = evaluate_qm9(ConfgenConfig(num_confs=2), model, count=5, start=0, stride=1, exclude=[seen], log=None)
    ids = [m["id"] for m in res["molecules"]]
    assert len(ids) == 5 and res["skipped_seen_in_pretraining_or_duplicate"] >= 20
    first_unseen = {r.id for r in qm9_rows[30:60]}
    assert set(ids) <= first_unseen
    for name in ("etkdg", "flexmol"):
        s = res["scores"][name]
        assert s["molecules"] == 5 and 0 <= s["cov_mean"] <= 1 and s["mat_mean"] >= 0


def test_confgen_command_writes_conformers_and_reports_rejects(tmp_path, capsys):
    export = save_pretrained(FlexMol(model_config("tiny")), tmp_path / "export")
    out = tmp_path / "confs.sdf"
    assert cli(["confgen", "--smiles", "CCO", "C1CC(", "c1ccccc1C(=O)O", "--num-confs", "3",
                "--checkpoint", str(export), "--out", str(out)]) == 0
    mols = [m for m in Chem.SDMolSupplier(str(out), removeHs=False)]
    assert len(mols) == 6 and {m.GetProp("method") for m in mols} == {"flexmol"}
    assert all(m.GetNumAtoms() > m.GetNumHeavyAtoms() for m in mols)  # hydrogens placed back
    captured = capsys.readouterr()
    assert "C1CC(" in captured.err and "invalid_smiles" in captured.err and "1 rejected" in captured.out
