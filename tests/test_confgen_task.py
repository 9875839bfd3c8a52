"""The conformer-generation task: its loss, the model's equivariance and 2D-only path, fine-tuning,
save/load, the held-out guarantee of the trained InChIKeys and ``flexmol finetune-confgen``."""
import json

import numpy as np
import pytest
import torch
from rdkit import Chem

from flexmol.chem.featurizer import Featurizer
from flexmol.config import ConfigError, FeaturizerConfig
from flexmol.finetune.confgen import (ConformerModel, aligned_rmsd, batch_of, confgen_loss, load_conformer_model,
                                      match_chirality, mds, predict, save_conformer_model, trained_inchikeys)
from flexmol.model.network import FlexMol, ModelConfig

TINY = dict(dim=32, heads=4, layers=1, decoder_layers=1, mm_layers=1, num_kernels=16, proj_dim=16)
ROWS = (340, 380)  # QM9 rows of 6 heavy atoms: rotatable bonds, stereocentres


def _rotation(seed: int) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    return q if torch.det(q) > 0 else -q


@pytest.fixture(scope="module")
def molecules(qm9_rows):
    """(record, heavy-atom molecule) of QM9 rows 340-380, DFT geometry as ``pos``."""
    feat = Featurizer(FeaturizerConfig(), "paired")
    out = []
    for raw in qm9_rows[ROWS[0]:ROWS[1]]:
        try:
            out.append(feat.with_molecule(raw))
        except Exception:  # noqa: BLE001 -- a row whose geometry does not match its SMILES
            continue
    return out


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    from flexmol.model.export import save_pretrained

    torch.manual_seed(0)
    return save_pretrained(FlexMol(ModelConfig(**TINY)), tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, export, molecules, qm9_rows):
    """A task model fine-tuned through the API on QM9 rows 340-380 (a few steps), three of its
    molecules excluded by an InChIKey file."""
    from flexmol.finetune.confgen_train import DEFAULT_CONFIG, load, run_finetune_confgen

    out = tmp_path_factory.mktemp("task")
    excluded = sorted({r["inchikey"] for r, _ in molecules[:3]})
    keyfile = out.parent / "held_out.txt"
    keyfile.write_text("# evaluation molecules\n" + "\n".join(excluded) + "\n")
    cfg = load(DEFAULT_CONFIG, {"checkpoint": str(export), "out": str(out)}, overrides=[
        f"data.start={ROWS[0]}", f"data.stop={ROWS[1]}", "data.stride=1", f"data.exclude=[{keyfile}]", "data.workers=1",
        "data.val_fraction=0.2", "input.num_confs=2", "train.steps=4", "train.eval_every=2", "train.warmup_steps=1",
        "train.max_atoms=96", "train.threads=1"])
    meta = run_finetune_confgen(cfg, log=lambda m: None)
    return out, meta, excluded


# ---------------------------------------------------------------------------------------- the data

def test_sdf_references_of_one_molecule_are_grouped_in_one_atom_order(molecules, tmp_path):
    """Several SDF records of one molecule (atoms in another order) are its references; a record
    without 3D coordinates is rejected with its reason."""
    from flexmol.data.sources import open_source
    from flexmol.evaluate.confgen import with_coords
    from flexmol.finetune.confgen_data import read_references

    record, mol = next((r, m) for r, m in molecules if Chem.FindMolChiralCenters(m, useLegacyImplementation=False))
    ref = record["pos"][0]
    moved = ref + np.random.default_rng(0).normal(scale=0.05, size=ref.shape)
    reordered = Chem.RenumberAtoms(with_coords(mol, moved[None]), list(range(len(ref)))[::-1])
    flat = Chem.Mol(mol)
    flat.RemoveAllConformers()
    sdf = tmp_path / "refs.sdf"
    with Chem.SDWriter(str(sdf)) as w:
        for m in (with_coords(mol, ref[None]), reordered, flat):
            w.write(m)
    grouped, rejects, counts = read_references(iter(open_source(str(sdf))), set(), workers=1, log=None)
    assert counts == {"rows_read": 3, "rejected": 1, "excluded": 0, "molecules": 1, "references": 2}
    assert [r["code"] for r in rejects] == ["no_reference_geometry"] and rejects[0]["index"] == 2
    (got, _), = grouped
    assert got["inchikey"] == record["inchikey"] and got["pos"].shape == (2, len(ref), 3)
    assert aligned_rmsd(got["pos"][0], ref) < 1e-4
    assert aligned_rmsd(got["pos"][1], ref) < 0.1  # the reordered record's atoms mapped back


def test_input_conformer_cache_is_keyed_on_the_generator_and_the_atom_order(molecules, tmp_path):
    """A shared cache gives a molecule read in another atom order its own conformers (rows that are
    its atoms: bonded atoms at bond lengths), and a cache made with another generator is rebuilt."""
    from flexmol.finetune.confgen_data import CACHE, input_conformers

    record, mol = molecules[4]
    gen = {"generator": "etkdg", "mmff": False, "num_confs": 1, "seed": 0, "embed_timeout_s": 10.0, "rdkit": "x"}
    first, _ = input_conformers([(record, mol)], gen, tmp_path, workers=1, log=None)
    assert (tmp_path / CACHE).is_file() and first[record["inchikey"]].shape == (1, mol.GetNumAtoms(), 3)
    order = list(range(mol.GetNumAtoms()))[::-1]
    reordered = Chem.RenumberAtoms(mol, order)
    lines = []
    got, _ = input_conformers([(record, reordered)], gen, tmp_path, workers=1, log=lines.append)
    xyz = got[record["inchikey"]][0]
    bonds = [np.linalg.norm(xyz[b.GetBeginAtomIdx()] - xyz[b.GetEndAtomIdx()]) for b in reordered.GetBonds()]
    assert max(bonds) < 1.8 and not any("from" in ln for ln in lines), (bonds, lines)
    again, _ = input_conformers([(record, mol)], gen, tmp_path, workers=1, log=lines.append)
    np.testing.assert_array_equal(again[record["inchikey"]], first[record["inchikey"]])
    assert any("input conformers from" in ln for ln in lines), lines
    lines = []
    input_conformers([(record, mol)], {**gen, "num_confs": 2}, tmp_path, workers=1, log=lines.append)
    assert any("rebuilding" in ln for ln in lines), lines


def test_an_exclusion_file_that_is_not_inchikeys_is_refused(tmp_path):
    """A SMILES list given as data.exclude would exclude nothing: it is refused, the line named."""
    from flexmol.finetune.confgen_data import excluded_inchikeys

    good = tmp_path / "keys.txt"
    good.write_text("# held out\n\nBSYNRYMUTXBXSQ-UHFFFAOYSA-N  aspirin\n")
    assert excluded_inchikeys([good]) == {"BSYNRYMUTXBXSQ-UHFFFAOYSA-N"}
    bad = tmp_path / "smiles.txt"
    bad.write_text("BSYNRYMUTXBXSQ-UHFFFAOYSA-N\nCC(=O)Oc1ccccc1C(=O)O\n")
    with pytest.raises(ConfigError, match=r"smiles.txt:2: .* is not an InChIKey"):
        excluded_inchikeys([bad])


def test_targets_match_the_inputs_symmetric_atoms(qm9_rows):
    """An input whose symmetric atoms (a tert-butyl's methyls) carry each other's labels is the
    reference itself: its target is the reference relabelled, at RMSD 0 (GetBestRMS agrees)."""
    from flexmol.evaluate.confgen import rmsd_matrix
    from flexmol.finetune.confgen_data import nearest_references, symmetries

    record, mol = Featurizer(FeaturizerConfig(), "paired").with_molecule(qm9_rows[214])  # CC(C)(C)C#N
    perms = symmetries(mol)
    assert len(perms) == 6 and (perms[0] == np.arange(len(record["z"]))).all()
    naive = [aligned_rmsd(record["pos"][0][p], record["pos"][0]) for p in perms]
    relabelled = record["pos"][:, perms[int(np.argmax(naive))]]
    assert max(naive) > 1.0  # the labels' RMSD; the geometry is the same
    target = nearest_references(relabelled, record["pos"], mol)
    np.testing.assert_allclose(target, relabelled, atol=1e-6)
    assert rmsd_matrix(mol, record["pos"], relabelled)[0, 0] < 1e-4


# ---------------------------------------------------------------------------------------- the loss

def test_loss_is_invariant_to_rotating_and_translating_the_reference(molecules):
    ref = torch.as_tensor(np.stack([r["pos"][0] for r, _ in molecules[:2]]), dtype=torch.float64)
    mask = torch.ones(ref.shape[:2], dtype=torch.bool)
    pred = ref + 0.3 * torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    moved = ref @ _rotation(2).T + torch.tensor([3.0, -1.0, 7.0], dtype=torch.float64)
    rot, shift = _rotation(5), torch.tensor([-2.0, 0.5, 1.0], dtype=torch.float64)
    for kind in ("l1", "mse"):
        base, rotated = confgen_loss(pred, ref, mask, kind), confgen_loss(pred, moved, mask, kind)
        # both rotated (the model's output turns with its input conformer): the same loss in any frame
        both = confgen_loss(pred @ rot.T + shift, ref @ rot.T, mask, kind)
        for key in ("loss", "distance", "coord", "rmsd"):
            assert float(rotated[key]) == pytest.approx(float(base[key]), abs=1e-9), (kind, key)
            assert float(both[key]) == pytest.approx(float(base[key]), abs=1e-9), (kind, key)
        assert float(base["coord"]) > 0.05
    # the same coordinate term without the superposition is not invariant
    naive = lambda r: float(((pred - r).abs().sum(-1) / 3).mean())  # noqa: E731
    assert abs(naive(moved) - naive(ref)) > 1.0


def test_loss_is_zero_for_a_perfect_prediction_in_any_frame(molecules):
    record, _ = molecules[5]
    ref = torch.as_tensor(record["pos"][:1], dtype=torch.float64)
    mask = torch.ones(ref.shape[:2], dtype=torch.bool)
    for kind in ("l1", "mse"):
        out = confgen_loss(ref @ _rotation(3).T - 2.0, ref, mask, kind)
        assert float(out["loss"]) < 1e-6 and float(out["rmsd"]) < 1e-6
    # a mirror image has the same distances but is not superposable: the coordinate term sees it
    record, _ = next((r, m) for r, m in molecules if Chem.FindMolChiralCenters(m, useLegacyImplementation=False))
    ref = torch.as_tensor(record["pos"][:1], dtype=torch.float64)
    out = confgen_loss(ref * ref.new_tensor([-1.0, 1.0, 1.0]), ref, torch.ones(ref.shape[:2], dtype=torch.bool))
    assert float(out["distance"]) < 1e-6 and float(out["coord"]) > 1e-2 and float(out["rmsd"]) > 0.1


def test_loss_ignores_padding_atoms(molecules):
    record, _ = molecules[0]
    n = len(record["z"])
    ref = torch.zeros(1, n + 2, 3, dtype=torch.float64)
    ref[0, :n] = torch.as_tensor(record["pos"][0], dtype=torch.float64)
    pred = ref.clone()
    pred[0, n:] = 5.0  # padding rows hold anything
    mask = torch.arange(n + 2)[None] < n
    assert float(confgen_loss(pred, ref, mask)["loss"]) < 1e-6


# ---------------------------------------------------------------------------------------- the model

def test_refinement_is_se3_equivariant(molecules):
    from flexmol.evaluate.confgen import ConfgenConfig, etkdg

    torch.manual_seed(0)
    model = ConformerModel(FlexMol(ModelConfig(**TINY)).double(), passes=2)
    record, mol = molecules[6]
    inputs = etkdg(mol, ConfgenConfig(num_confs=1, mmff=True), record["inchikey"]).astype(np.float64)
    rot, shift = _rotation(4).numpy(), np.array([1.5, -4.0, 2.0])
    out = predict(model, record, inputs)
    out_moved = predict(model, record, inputs @ rot.T + shift)
    assert np.abs(out - inputs).max() > 1e-3  # the head moved the atoms
    np.testing.assert_allclose(out_moved, out @ rot.T + shift, atol=1e-4)


def test_mds_recovers_a_geometry_from_its_distances(molecules):
    record, _ = molecules[7]
    ref = record["pos"][0].astype(np.float64)
    dist = torch.as_tensor(np.linalg.norm(ref[:, None] - ref[None], axis=-1))
    xyz = mds(dist).numpy()
    assert min(aligned_rmsd(xyz, ref), aligned_rmsd(xyz * [-1, 1, 1], ref)) < 1e-6


def test_two_d_path_picks_the_mirror_image_of_the_chiral_tags(qm9_rows):
    feat = Featurizer(FeaturizerConfig(), "paired")
    for raw in qm9_rows[ROWS[0]:]:
        record, mol = feat.with_molecule(raw)
        if Chem.FindMolChiralCenters(mol, useLegacyImplementation=False):
            break
    else:
        pytest.fail("no chiral molecule among the QM9 rows")
    ref = torch.as_tensor(record["pos"][0], dtype=torch.float64)
    mirror = ref * ref.new_tensor([-1.0, 1.0, 1.0])
    assert aligned_rmsd(mirror.numpy(), ref.numpy()) > 0.1  # a mirror image does not superpose
    assert aligned_rmsd(match_chirality(mol, mirror).numpy(), ref.numpy()) < 1e-6
    assert torch.equal(match_chirality(mol, ref), ref)


def test_two_d_path_is_deterministic_and_needs_no_conformer(molecules):
    torch.manual_seed(0)
    model = ConformerModel(FlexMol(ModelConfig(**TINY)))
    record, mol = molecules[8]
    graph_only = {k: v for k, v in record.items() if k != "pos"}
    a, b = predict(model, graph_only, None, mol), predict(model, graph_only, None)
    assert a.shape == (1, len(record["z"]), 3) and np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)
    # a record that carries its reference geometry gives the same: no coordinate of it reaches the path
    np.testing.assert_array_equal(predict(model, record, None, mol), a)
    assert "pos" not in batch_of(model, [record])


# ------------------------------------------------------------------------------------- fine-tuning

def test_fine_tuning_lowers_the_rmsd_of_the_molecules_it_trains_on(export, molecules):
    """Overfit: a few molecules, their refined and 2D-only RMSDs after training below those before."""
    from flexmol.evaluate.confgen import ConfgenConfig, etkdg
    from flexmol.finetune.confgen_data import Molecule, nearest_references
    from flexmol.finetune.confgen_train import ConfgenTaskConfig, step_loss, validate_rmsd
    from flexmol.model.export import load_pretrained

    torch.manual_seed(0)
    mols = []
    for record, mol in molecules[10:14]:
        inputs = etkdg(mol, ConfgenConfig(num_confs=2, mmff=True), record["inchikey"])
        mols.append(Molecule(record, mol, inputs, nearest_references(inputs, record["pos"], mol)))
    model = ConformerModel(load_pretrained(export)).train()
    cfg = ConfgenTaskConfig()
    cfg.loss.kind = "l1"
    before = validate_rmsd(model, mols, 512)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    items = [(m, k) for m in range(len(mols)) for k in range(2)]
    for _ in range(40):
        opt.zero_grad()
        step_loss(model, mols, items, cfg)["loss"].backward()
        opt.step()
    after = validate_rmsd(model, mols, 512)
    assert after["inputs"] == pytest.approx(before["inputs"])
    assert after["refined"] < 0.8 * before["refined"], (before, after)
    assert after["two_d"] < 0.8 * before["two_d"], (before, after)


def test_trained_inchikeys_are_the_train_and_validation_molecules_never_an_excluded_one(trained, molecules):
    out, meta, excluded = trained
    keys = trained_inchikeys(out)
    train = set((out / "train_inchikeys.txt").read_text().split())
    val = set((out / "val_inchikeys.txt").read_text().split())
    assert train and val and not train & val and keys == train | val
    assert not keys & set(excluded)
    assert meta["counts"]["excluded"] == 3
    assert keys == {r["inchikey"] for r, _ in molecules} - set(excluded)
    assert meta["counts"]["train_molecules"] == len(train) and meta["counts"]["val_molecules"] == len(val)
    metrics = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "val_refined" in m] == [0, 2, 4]


def test_an_altered_trained_inchikeys_file_is_refused(trained, tmp_path):
    import shutil

    out, _, _ = trained
    copy = shutil.copytree(out, tmp_path / "copy")
    with open(copy / "train_inchikeys.txt", "a") as f:
        f.write("AAAAAAAAAAAAAA-BBBBBBBBBB-N\n")
    with pytest.raises(ConfigError, match="train_inchikeys.txt: sha256 differs"):
        trained_inchikeys(copy)


def test_save_and_load_give_identical_predictions(tmp_path, molecules):
    torch.manual_seed(1)
    model = ConformerModel(FlexMol(ModelConfig(**TINY)), passes=2).eval()
    record, mol = molecules[9]
    inputs = record["pos"] + 0.1
    path = save_conformer_model(model, tmp_path / "m", {"input": {"mmff": True}}, ["K1"], ["K2"])
    loaded, meta = load_conformer_model(path)
    assert meta["task"] == "confgen" and meta["passes"] == 2 and loaded.passes == 2
    np.testing.assert_array_equal(predict(loaded, record, inputs), predict(model, record, inputs))
    np.testing.assert_array_equal(predict(loaded, record, None, mol), predict(model, record, None, mol))
    assert trained_inchikeys(path) == {"K1", "K2"}


def test_loading_refuses_what_is_not_a_conformer_task_model(export, tmp_path):
    with pytest.raises(ConfigError, match="no task.json"):
        load_conformer_model(export)
    other = tmp_path / "other"
    other.mkdir()
    (other / "task.json").write_text(json.dumps({"task": "regression"}))
    with pytest.raises(ConfigError, match="task 'regression', not 'confgen'"):
        load_conformer_model(other)


# ------------------------------------------------------------------------------------------- the CLI

def test_cli_fine_tunes_and_refuses_bad_keys(export, tmp_path, capsys, qm9_rows):
    from flexmol.cli import main

    out = tmp_path / "run"
    common = ["finetune-confgen", "--checkpoint", str(export), "--out", str(out), "data.start=340",
              "data.stop=352", "data.stride=1", "data.workers=1", "input.num_confs=1", "train.steps=2", "train.threads=1"]
    assert main(common) == 0
    captured = capsys.readouterr()
    assert "validation RMSD" in captured.out and "step 2/2" in captured.err
    _, meta = load_conformer_model(out)
    assert meta["input"]["num_confs"] == 1 and meta["input"]["mmff"] is True
    again = main(common)  # the input conformers come from the cache
    assert again == 0 and "input conformers from" in capsys.readouterr().err
    for bad, key in (("train.steps=0", "train.steps"), ("loss.kind=huber", "loss.kind"),
                     ("data.val_fraction=1.5", "data.val_fraction"), ("train.stepz=3", "train.stepz")):
        assert main(common + [bad]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"config key '{key}'" in err[0], err
    assert main(["finetune-confgen", "--out", str(tmp_path / "x")]) == 2
    assert "config key 'checkpoint'" in capsys.readouterr().err


def test_an_interrupted_run_keeps_its_best_validated_weights_and_a_new_run_drops_the_old_model(export, tmp_path,
                                                                                              monkeypatch, capsys):
    """Ctrl-C during training: the best validated weights are saved with ``interrupted_at_step``
    and the command exits 130; a later run into the same directory removes the earlier task.json
    before it writes anything (a damaged new run cannot pass for the old model)."""
    from flexmol.cli import main
    from flexmol.finetune import confgen_train

    out = tmp_path / "run"
    common = ["finetune-confgen", "--checkpoint", str(export), "--out", str(out), "data.start=340",
              "data.stop=352", "data.stride=1", "data.workers=1", "input.num_confs=1", "train.steps=2",
              "train.threads=1", "data.val_fraction=0.3"]

    def stopped(model, opt, train, examples, cfg, rng, write, evaluate, log):
        write({"step": 1, "loss": 1.0})
        raise KeyboardInterrupt

    monkeypatch.setattr(confgen_train, "train_loop", stopped)
    assert main(common) == 130
    _, meta = load_conformer_model(out)
    assert meta["interrupted_at_step"] == 1 and meta["train"]["best_step"] == 0
    assert "interrupted after step 1" in capsys.readouterr().err

    def broken(*args, **kwargs):
        raise ValueError("a failure in training")

    monkeypatch.setattr(confgen_train, "train_loop", broken)
    assert main(common) == 2
    assert not (out / "task.json").exists()
    with pytest.raises(ConfigError, match="no task.json"):
        load_conformer_model(out)
