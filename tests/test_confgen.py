"""Conformation generation: RMSD, COV and MAT on hand-made cases, the held-out QM9 evaluation
(pre-training and fine-tuning molecules never scored), references from an SDF, and the commands
with a fine-tuned conformer task model."""
import json

import numpy as np
import pytest
from rdkit import Chem
from rdkit.Chem import AllChem

from flexmol import config, save_pretrained
from flexmol.cli import main as cli
from flexmol.evaluate.confgen import (ConfgenConfig, Generator, cov_mat, evaluate, evaluate_qm9, evaluate_sdf,
                                      load_task_model, refine, rmsd_matrix, score_molecule, sdf_references)
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


def test_a_mirror_image_conformer_fails_the_stereo_check():
    mol, x = _embedded("C[C@H](O)C#N")
    mirror = x * np.array([-1.0, 1.0, 1.0])
    assert score_molecule(mol, x[None], np.stack([x, mirror]), 0.5)["stereo"] == 0.5
    flat, y = _embedded("CC(C)O")  # no stereocentre: nothing to get wrong
    assert score_molecule(flat, y[None], (y * np.array([-1.0, 1.0, 1.0]))[None], 0.5)["stereo"] == 1.0


def test_a_stereo_isomer_of_a_fine_tuned_molecule_is_never_scored(tmp_path):
    """Held out means the skeleton too: the enantiomer of a trained molecule (another InChIKey, the
    same connectivity block) is skipped and counted, not scored."""
    path = tmp_path / "refs.sdf"
    mol = Chem.AddHs(Chem.MolFromSmiles("C[C@H](O)C#N"))
    AllChem.EmbedMolecule(mol, randomSeed=1)
    with Chem.SDWriter(str(path)) as w:
        w.write(mol)
    refs = sdf_references(path, [])
    other = Chem.MolToInchiKey(Chem.MolFromSmiles("C[C@@H](O)C#N"))
    assert other != refs[0].record["inchikey"] and other[:14] == refs[0].record["inchikey"][:14]
    res = evaluate(refs, ConfgenConfig(), exclude_finetuning=frozenset({other}), log=None)
    assert not res["molecules"] and res["skipped"]["seen_in_finetuning"] == 1
    res = evaluate(refs, ConfgenConfig(), exclude_pretraining=frozenset({other}), log=None)
    assert not res["molecules"] and res["skipped"]["seen_in_pretraining"] == 1
    assert len(evaluate(refs, ConfgenConfig(), log=None)["molecules"]) == 1


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
    assert len(ids) == 5 and res["skipped"]["seen_in_pretraining"] + res["skipped"]["duplicate"] >= 20
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


# ------------------------------------------------------------------- with a conformer task model

METHODS = {"etkdg", "etkdg_mmff", "flexmol", "finetuned", "two_d_only"}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """A tiny pre-trained export, and a conformer task model fine-tuned from it for two steps on
    QM9 rows 0-5 (some for validation) through ``flexmol finetune-confgen``'s own code."""
    import torch

    from flexmol.finetune.confgen_train import ConfgenTaskConfig, run_finetune_confgen, validate

    root = tmp_path_factory.mktemp("confgen_task")
    torch.manual_seed(0)
    export = save_pretrained(FlexMol(model_config("tiny")), root / "export")
    cfg = config.build(ConfgenTaskConfig, {
        "checkpoint": str(export), "out": str(root / "task"),
        "data": {"source": "qm9", "start": 0, "stop": 6, "stride": 1, "val_fraction": 0.34, "workers": 0},
        "input": {"num_confs": 2}, "train": {"steps": 2, "eval_every": 2, "log_every": 1, "threads": 1}})
    validate(cfg)
    run_finetune_confgen(cfg, log=lambda m: None)
    return export, root / "task"


def test_evaluation_never_scores_a_molecule_the_task_model_was_fine_tuned_on(qm9_rows, exports):
    """The task model trained and validated on QM9 rows 0-5; scoring from row 0 skips exactly those
    molecules (counted), scores the next ones, and every method scores the same molecules."""
    task = load_task_model(exports[1])
    trained = task.trained
    assert len(trained) == 6 and task.meta["counts"]["val_molecules"] >= 1
    res = evaluate_qm9(ConfgenConfig(), None, task, count=3, start=0, stride=1, log=None)
    scored = {m["inchikey"] for m in res["molecules"]}
    assert res["skipped"] == {"seen_in_pretraining": 0, "seen_in_finetuning": 6, "duplicate": 0}
    assert res["skipped_ids"]["seen_in_finetuning"] == [r.id for r in qm9_rows[:6]]
    assert not scored & trained and len(scored) == 3
    assert [m["id"] for m in res["molecules"]] == [r.id for r in qm9_rows[6:9]]
    assert set(res["scores"]) == METHODS - {"flexmol"}
    assert all(s["molecules"] == 3 for s in res["scores"].values())
    assert "skipped" in res["held_out"] and "not GEOM-QM9" in res["note"]


def test_two_conformers_per_reference_from_an_sdf_of_references(tmp_path):
    """Records of one molecule (by InChIKey) are its references, whatever their atom order; each
    RDKit-started method generates twice as many conformers, the 2D-only path one; a record with
    no 3D coordinates is rejected with its reason."""
    path = tmp_path / "refs.sdf"
    with Chem.SDWriter(str(path)) as w:
        for smiles, seeds in (("OCC(C)(C)C#N", (1, 2)), ("CC(C)CO", (3,))):
            for seed in seeds:
                mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
                AllChem.EmbedMolecule(mol, randomSeed=seed)
                mol.SetProp("_Name", f"{smiles}_{seed}")
                w.write(mol)
        same = Chem.AddHs(Chem.MolFromSmiles("OCC(C)(C)C#N"))
        AllChem.EmbedMolecule(same, randomSeed=1)
        same = Chem.RenumberAtoms(same, list(range(same.GetNumAtoms()))[::-1])  # reference 1, atoms reversed
        same.SetProp("_Name", "reversed")
        w.write(same)
        flat = Chem.MolFromSmiles("CCN")
        AllChem.Compute2DCoords(flat)
        flat.SetProp("_Name", "flat")
        w.write(flat)
    rejects = []
    refs = sdf_references(path, rejects)
    assert [len(r.refs) for r in refs] == [3, 1] and refs[0].records == ("OCC(C)(C)C#N_1", "OCC(C)(C)C#N_2", "reversed")
    assert rmsd_matrix(refs[0].mol, refs[0].refs[:1], refs[0].refs[2:])[0, 0] == pytest.approx(0, abs=1e-4)
    assert [(r["id"], r["code"]) for r in rejects] == [("flat", "no_reference")]

    res = evaluate_sdf(path, ConfgenConfig(), FlexMol(model_config("tiny")).eval(), log=None)
    assert [m["references"] for m in res["molecules"]] == [3, 1]
    for m in res["molecules"]:
        assert {m[k]["conformers"] for k in ("etkdg", "etkdg_mmff", "flexmol")} == {2 * m["references"]}
    assert evaluate_sdf(path, ConfgenConfig(num_confs=5), log=None)["molecules"][1]["etkdg"]["conformers"] == 5


def test_the_finetuned_row_refines_the_baseline_rows_conformers_and_never_sees_the_reference(
        exports, qm9_rows, monkeypatch):
    """With a model that returns its inputs, ``finetuned`` scores exactly as the baseline of its
    input generator (ETKDG + MMFF here): the same seeded conformers. The generators get the graph,
    never the reference coordinates."""
    import flexmol.finetune.confgen as task_api
    from flexmol.chem.featurizer import Featurizer

    seen = []

    def echo(model, record, inputs, mol=None):
        seen.append((set(record), mol.GetNumConformers()))
        return np.asarray(inputs) if inputs is not None else np.zeros((1, len(record["z"]), 3), np.float32)

    monkeypatch.setattr(task_api, "predict", echo)
    task = load_task_model(exports[1])
    assert task.mmff
    record, mol = Featurizer(config.FeaturizerConfig(), "paired").with_molecule(qm9_rows[20])
    out = Generator(ConfgenConfig(), task=task)(record, mol, 2)
    assert np.array_equal(out["finetuned"], out["etkdg_mmff"]) and not np.allclose(out["etkdg"], out["etkdg_mmff"])
    assert out["two_d_only"].shape == (1, mol.GetNumAtoms(), 3)
    assert len(seen) == 2 and all("pos" not in keys and not conformers for keys, conformers in seen)


def test_confgen_command_says_when_etkdg_embeds_fewer_conformers_than_asked(tmp_path, capsys):
    """This caged molecule gets 1 of 2 ETKDG conformers with seed 0: said on stderr and counted."""
    out = tmp_path / "few.sdf"
    assert cli(["confgen", "--smiles", "OC[C@@]12CCN3C[C@@H]1[C@H]32", "CCO", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert len(list(Chem.SDMolSupplier(str(out)))) == 3 and "3 written" in captured.out
    assert "'smiles1': 1 of 2 conformers embedded" in captured.err and "smiles2" not in captured.err


def test_confgen_command_with_a_task_model_writes_k_conformers_with_their_properties(exports, tmp_path, capsys):
    task = exports[1]
    out = tmp_path / "confs.sdf"
    assert cli(["confgen", "CC(O)C#N", "--smiles", "C1CC(", "c1ccccc1O", "--num-confs", "3",
                "--checkpoint", str(task), "--out", str(out)]) == 0
    mols = list(Chem.SDMolSupplier(str(out), removeHs=False))
    assert [m.GetProp("id") for m in mols] == ["smiles1"] * 3 + ["smiles3"] * 3
    assert [m.GetIntProp("conformer") for m in mols] == [0, 1, 2] * 2
    assert {m.GetProp("method") for m in mols} == {"finetuned"}
    assert {m.GetProp("checkpoint") for m in mols} == {str(task)}
    assert mols[0].GetProp("input") == "CC(O)C#N" and mols[0].GetProp("seed").isdigit()
    assert all(m.GetNumAtoms() > m.GetNumHeavyAtoms() for m in mols)  # hydrogens placed back
    first = [m.GetConformer().GetPositions() for m in mols[:3]]
    assert not np.allclose(first[0], first[1])  # K different conformers, not one written K times
    captured = capsys.readouterr()
    assert "'C1CC('" in captured.err and "invalid_smiles" in captured.err and "1 rejected" in captured.out
    assert "6 written" in captured.out
    rejects = [json.loads(line) for line in (tmp_path / "confs.rejects.jsonl").read_text().splitlines()]
    assert [(r["id"], r["code"]) for r in rejects] == [("smiles2", "invalid_smiles")]

    flat = tmp_path / "two_d.sdf"
    assert cli(["confgen", "--smiles", "CC(O)C#N", "c1ccccc1O", "--method", "two_d_only", "--no-hydrogens",
                "--checkpoint", str(task), "--out", str(flat)]) == 0
    mols = list(Chem.SDMolSupplier(str(flat), removeHs=False))
    assert len(mols) == 2 and {m.GetProp("method") for m in mols} == {"two_d_only"}
    assert {m.GetProp("seed") for m in mols} == {"none"} and all(m.GetNumAtoms() == m.GetNumHeavyAtoms() for m in mols)
    capsys.readouterr()
    for argv, needle in ((["--method", "two_d_only", "--num-confs", "2"], "deterministic"),
                         (["--refine-steps", "2"], "its own passes")):
        assert cli(["confgen", "CCO", "--checkpoint", str(task), "--out", str(tmp_path / "x.sdf"), *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err and "Traceback" not in err
    assert cli(["confgen", "CCO", "--method", "finetuned", "--out", str(tmp_path / "x.sdf")]) == 2
    assert "conformer task model" in capsys.readouterr().err
    assert not (tmp_path / "x.sdf").exists()


def test_evaluate_confgen_with_a_task_model_writes_every_row(exports, qm9_rows, tmp_path, capsys):
    export, task = exports
    out = tmp_path / "ev"
    assert cli(["evaluate", "confgen", "--task-model", str(task), "--checkpoint", str(export), "--count", "2",
                "--start", "4", "--stride", "1", "--out", str(out)]) == 0
    res = json.loads((out / "confgen.json").read_text())
    assert set(res["scores"]) == set(res["methods"]) == METHODS
    assert all(s["molecules"] == 2 for s in res["scores"].values())
    assert [m["id"] for m in res["molecules"]] == [r.id for r in qm9_rows[6:8]]  # rows 4, 5: fine-tuned on
    for m in res["molecules"]:
        assert {k: m[k]["conformers"] for k in METHODS} == {**{k: 2 for k in METHODS}, "two_d_only": 1}
    assert res["skipped"]["seen_in_finetuning"] == 2 and res["task_model"] == str(task)
    assert res["task"]["input"]["mmff"] is True and set(res["seconds"]) == METHODS | {"scoring"}
    printed = capsys.readouterr().out
    assert all(name in printed for name in METHODS) and "not GEOM-QM9" in printed
    assert cli(["evaluate", "confgen", "--checkpoint", str(task), "--out", str(tmp_path / "ev2")]) == 2
    assert "--task-model" in capsys.readouterr().err
    assert all(0 <= s["stereo_mean"] <= 1 for s in res["scores"].values()) and "stereo" in printed
    assert cli(["evaluate", "confgen", "--references", str(tmp_path / "none.sdf"), "--start", "3",
                "--out", str(tmp_path / "ev2")]) == 2
    assert "--start" in capsys.readouterr().err and not (tmp_path / "ev2").exists()
