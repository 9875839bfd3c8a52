"""`flexmol embed`, the Embedder and the tools' input readers, on real molecules (RDKit's NCI set and
EGFR ligands) and a tiny seeded model exported here."""
import csv
import json

import numpy as np
import pytest
import torch
from rdkit import Chem

from conftest import nci_2d_dataset
from flexmol.cli import main
from flexmol.config import ConfigError
from flexmol.data.collate import collate
from flexmol.data.shards import read_shard, shard_paths
from flexmol.model.heads import masked_mean
from flexmol.model.network import FlexMol, ModelConfig
from flexmol.tools import Embedder, read_molecules
from flexmol.tools.inputs import InputError

SMALL = ModelConfig(dim=32, heads=4, layers=1, decoder_layers=1, mm_layers=1, num_kernels=16, proj_dim=16)


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    import flexmol

    torch.manual_seed(0)
    return flexmol.save_pretrained(FlexMol(SMALL).eval(), tmp_path_factory.mktemp("embed") / "export")


@pytest.fixture(scope="module")
def embedder(export):
    return Embedder(export, batch_size=16, max_atoms=300, workers=1)


@pytest.fixture(scope="module")
def nci(nci_smi):
    """The first 120 NCI inputs read for 2D: (molecules, rejects)."""
    return read_molecules(nci_smi, limit=120, workers=1)


@pytest.fixture(scope="module")
def egfr_3d(egfr_sdf):
    return read_molecules(egfr_sdf, modality="both", limit=6, workers=1)


def _forward(model, records, modality="2d"):
    batch = collate([{**r, "modality": modality} for r in records], model.cfg.max_spd, model.cfg.max_path)
    with torch.no_grad():
        return model(batch, decode=False), batch


# ------------------------------------------------------------------------------------- inputs

def test_smiles_file_rejects_come_back_in_order_with_reasons(nci, nci_smi):
    molecules, rejects = nci
    lines = [ln.split() for ln in open(nci_smi)][:120]
    # every input is either a molecule or a reject, each list in input order
    assert sorted([m.record["index"] for m in molecules] + [r.index for r in rejects]) == list(range(120))
    assert [r.index for r in rejects] == sorted(r.index for r in rejects)
    assert [m.record["index"] for m in molecules] == sorted(m.record["index"] for m in molecules)
    # NCI's copper complexes are refused for their element, naming it, with their input and id
    cu = [r for r in rejects if "Cu" in r.input]
    assert cu and all(r.code == "element" and "Cu" in r.reason for r in cu)
    assert all(r.input == lines[r.index][0] and r.id == lines[r.index][1] for r in rejects)
    assert molecules[0].id == lines[0][1] and molecules[0].smiles == Chem.MolToSmiles(Chem.MolFromSmiles(lines[0][0]))


def test_smiles_list_rejects_unparsable_and_oversized_molecules():
    from flexmol.config import FeaturizerConfig

    smiles = ["CCO", "C1CC", "c1ccccc1" + "C" * 40, "[Pu]", "OC(=O)c1ccccc1"]
    molecules, rejects = read_molecules(smiles, workers=1, featurizer=FeaturizerConfig(max_heavy_atoms=30))
    assert [m.id for m in molecules] == ["0", "4"]
    assert [(r.index, r.code) for r in rejects] == [(1, "invalid_smiles"), (2, "too_large"), (3, "element")]
    assert "46 heavy atoms" in rejects[1].reason and "Pu" in rejects[2].reason
    with pytest.raises(InputError, match="input 1"):
        read_molecules(["CCO", 3])


def test_worker_pool_gives_the_same_molecules_in_the_same_order(nci, nci_smi):
    molecules, rejects = read_molecules(nci_smi, limit=120, workers=2)
    assert [m.smiles for m in molecules] == [m.smiles for m in nci[0]]
    assert [r.index for r in rejects] == [r.index for r in nci[1]]


def test_csv_columns_found_or_named(tmp_path, nci_smi):
    rows = [ln.split() for ln in open(nci_smi)][:30]
    found, named = tmp_path / "found.csv", tmp_path / "named.tsv"
    with open(found, "w", newline="") as f:
        csv.writer(f).writerows([["nsc", "SMILES"]] + [[i, s] for s, i in rows])
    with open(named, "w", newline="") as f:
        csv.writer(f, delimiter="\t").writerows([["structure", "nsc"]] + [[s, i] for s, i in rows])
    by_name, _ = read_molecules(found, id_column="nsc", workers=1)
    assert [m.id for m in by_name][:3] == [rows[0][1], rows[1][1], rows[2][1]]
    with pytest.raises(InputError, match="no SMILES column"):
        read_molecules(named, workers=1)
    given, _ = read_molecules(named, smiles_column="structure", id_column="nsc", workers=1)
    assert [m.smiles for m in given] == [m.smiles for m in by_name]
    with pytest.raises(InputError, match="no id column 'name'"):
        read_molecules(found, id_column="name")


def test_sdf_coordinates_are_the_3d_input(egfr_3d, egfr_sdf, tmp_path):
    molecules, rejects = egfr_3d
    assert len(molecules) == 6 and not rejects
    supplier = Chem.SDMolSupplier(str(egfr_sdf), removeHs=False)
    for m in molecules:
        rec, mol = m.record, supplier[m.record["index"]]
        assert rec["modality"] == "paired" and rec["conf_method"] == "input" and m.id == mol.GetProp("_Name")
        heavy = [a.GetIdx() for a in mol.GetAtoms() if a.GetAtomicNum() > 1]
        # the same coordinates, in some atom order: compare the sorted interatomic distances
        given = mol.GetConformer().GetPositions()[heavy]
        dist = lambda x: np.sort(np.linalg.norm(x[:, None] - x[None], axis=-1).ravel())  # noqa: E731
        np.testing.assert_allclose(dist(rec["pos"][0]), dist(given), atol=1e-3)
    # an SDF record with 2D coordinates has no conformer: a reject, unless one is generated
    flat = Chem.MolFromSmiles("OC(=O)c1ccccc1")
    flat.SetProp("_Name", "benzoic")
    sdf = tmp_path / "flat.sdf"
    with Chem.SDWriter(str(sdf)) as w:
        w.write(flat)
    _, rejects = read_molecules(sdf, modality="3d", workers=1)
    assert [(r.id, r.code) for r in rejects] == [("benzoic", "no_conformer")]
    assert "conformers=etkdg" in rejects[0].reason
    made, _ = read_molecules(sdf, modality="3d", conformers="etkdg", workers=1)
    assert made[0].record["conf_method"].startswith("etkdg") and made[0].record["pos"].shape == (1, 9, 3)
    _, rejects = read_molecules(["CCO"], modality="3d", workers=1)
    assert rejects[0].code == "no_conformer"


def test_dataset_directory_is_read_as_stored(tmp_path, nci_smi, monkeypatch):
    directory = nci_2d_dataset(tmp_path, nci_smi, 70)
    stored = [r for p in shard_paths(directory) for r in read_shard(p)]
    import flexmol.chem.featurizer as featurizer

    monkeypatch.setattr(featurizer.Featurizer, "__call__", lambda *a: pytest.fail("featurised again"))
    molecules, rejects = read_molecules(directory, limit=60)
    assert not rejects and len(molecules) == 60
    assert [m.id for m in molecules] == [r["id"] for r in stored[:60]]
    assert all(np.array_equal(m.record["atom_feat"], r["atom_feat"]) for m, r in zip(molecules, stored))
    with pytest.raises(InputError, match="holds 2d records; modality 3d needs a conformer"):
        read_molecules(directory, modality="3d")


# ----------------------------------------------------------------------------------- embedder

def test_embeddings_equal_the_forward_pass_in_input_order(embedder, nci):
    molecules = nci[0][:40]
    records = [m.record for m in molecules]
    assert len(embedder.batches(np.array([len(r["z"]) for r in records]))) > 2  # several size-sorted batches
    got = embedder.embed(molecules, spaces=["fused", "2d", "3d_generated"])
    out, batch = _forward(embedder.model, records)
    np.testing.assert_allclose(got["fused"], out["embedding"].numpy(), atol=1e-5)
    np.testing.assert_allclose(got["2d"], masked_mean(out["x_f"], batch["mask"]).numpy(), atol=1e-5)
    np.testing.assert_allclose(got["3d_generated"], masked_mean(out["y_f"], batch["mask"]).numpy(), atol=1e-5)
    assert {k: v.dtype for k, v in got.items()} == {k: np.float32 for k in got}


def test_batches_hold_the_atom_budget(embedder):
    sizes = np.array([3, 40, 7, 350, 12, 12, 5, 29, 18, 2] * 5)
    batches = embedder.batches(sizes)
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(sizes)))
    for idx in batches:
        assert len(idx) <= embedder.batch_size
        assert len(idx) == 1 or len(idx) * sizes[idx].max() <= embedder.max_atoms
    assert [len(b) for b in batches if sizes[b].max() == 350] == [1] * 5


def test_per_atom_embeddings(embedder, nci):
    molecules = nci[0][:12]
    got = embedder.embed(molecules, spaces=["2d", "fused"], atoms=True)
    for i, m in enumerate(molecules):
        for space in ("2d", "fused"):
            atoms = got["atoms"][space][i]
            assert atoms.shape == (len(m.record["z"]), SMALL.dim)
            np.testing.assert_allclose(atoms.mean(0), got[space][i], atol=1e-5)


def test_spaces_of_each_modality(embedder, egfr_3d):
    model, records = embedder.model, [m.record for m in egfr_3d[0]]
    for modality, names in (("2d", ("2d", "3d_generated", "fused")), ("3d", ("3d", "2d_generated", "fused")),
                            ("both", ("2d", "3d", "fused"))):
        assert embedder.spaces(modality) == names
        got = embedder.embed(egfr_3d[0], modality, spaces=names)
        batch_modality = {"2d": "2d", "3d": "3d", "both": "paired"}[modality]
        out, batch = _forward(model, records, batch_modality)
        np.testing.assert_allclose(got["fused"], out["embedding"].numpy(), atol=1e-5)
        encoder_2d = masked_mean(out["x_f"], batch["mask"]).numpy()
        np.testing.assert_allclose(got["2d" if modality != "3d" else "2d_generated"], encoder_2d, atol=1e-5)
    with pytest.raises(ConfigError, match="has the spaces 2d, 3d_generated, fused"):
        embedder.embed(egfr_3d[0], "2d", spaces=["3d"])


@pytest.fixture(scope="module")
def m2umol_export(tmp_path_factory):
    """A small M2UMol network with one vector modality and no conformer modality: 2D input only."""
    import flexmol
    from flexmol.model.m2umol import M2UMol, M2UMolModelConfig, ModalitySpec

    torch.manual_seed(0)
    cfg = M2UMolModelConfig(**{k: getattr(SMALL, k) for k in SMALL.__dataclass_fields__},
                            modalities={"props": ModalitySpec(kind="vector", dim=2, labels=["mu", "gap"])})
    return flexmol.save_pretrained(M2UMol(cfg).eval(), tmp_path_factory.mktemp("m2umol") / "export")


def test_m2umol_checkpoint_and_its_refusals(m2umol_export, nci, nci_smi, tmp_path, capsys):
    embedder = Embedder(m2umol_export, batch_size=16, max_atoms=300, workers=1)
    assert (embedder.recipe, embedder.modalities) == ("m2umol", ("2d",))
    assert embedder.spaces("2d") == ("2d", "fused", "adapter_props")
    with pytest.raises(ConfigError, match="embeds 2d input only"):
        embedder.spaces("3d")
    molecules = nci[0][:20]
    got = embedder.embed(molecules, spaces=["fused", "adapter_props"], atoms=True)
    out, _ = _forward(embedder.model, [m.record for m in molecules])
    np.testing.assert_allclose(got["fused"], out["embedding"].numpy(), atol=1e-5)
    assert got["atoms"] == {}  # neither space has a per-atom form
    rep = embedder.get_repr(["OC(=O)c1ccccc1"], return_atomic_reprs=True)
    assert rep["atomic_space"] == "2d" and rep["atomic_reprs"][0].shape == (9, SMALL.dim)
    args = (nci_smi, "--checkpoint", m2umol_export, "--out", tmp_path / "m.npy", "--limit", 10)
    for extra, message in ((("--modality", "3d", "--conformers", "etkdg"), "embeds 2d input only"),
                           (("--atoms",), "--atoms: the space fused of")):
        assert _embed(*args, *extra) == 2 and message in capsys.readouterr().err
    assert _embed(*args, "--atoms", "--space", "all") == 0
    assert json.loads((tmp_path / "m.json").read_text())["atom_spaces"] == ["2d"]


def test_get_repr(embedder):
    smiles = ["OC(=O)c1ccccc1", "not a smiles", "CC[Hg]C", "CCN"]
    got = embedder.get_repr(smiles, return_atomic_reprs=True)
    assert got["cls_repr"].shape == (2, SMALL.dim) and got["index"] == [0, 3]
    assert got["smiles"] == ["O=C(O)c1ccccc1", "CCN"]
    assert [(r.index, r.code) for r in got["rejects"]] == [(1, "invalid_smiles"), (2, "element")]
    # the atoms of each molecule in the order of the SMILES as given
    assert got["atomic_symbol"] == [[a.GetSymbol() for a in Chem.MolFromSmiles(smiles[i]).GetAtoms()]
                                    for i in got["index"]]
    assert [a.shape for a in got["atomic_reprs"]] == [(9, SMALL.dim), (3, SMALL.dim)]
    alone = embedder.get_repr("CCN")
    np.testing.assert_allclose(alone["cls_repr"][0], got["cls_repr"][1], atol=1e-5)


# ------------------------------------------------------------------------------------------ CLI

def _embed(*args):
    return main(["embed", *map(str, args), "--workers", "1", "--no-progress"])


def test_cli_parquet_with_atoms(tmp_path, export, embedder, nci, nci_smi, capsys):
    out = tmp_path / "emb.parquet"
    assert _embed(nci_smi, "--checkpoint", export, "--out", out, "--limit", 50, "--space", "all", "--atoms") == 0
    molecules = [m for m in nci[0] if m.record["index"] < 50]
    rejects = [r for r in nci[1] if r.index < 50]
    assert rejects  # NCI's 48th input holds copper
    summary = capsys.readouterr().out
    assert f"{len(molecules)} molecules embedded" in summary and f"{len(rejects)} rejected" in summary
    import pyarrow.parquet as pq

    table = pq.read_table(out)
    assert table.column_names == ["id", "smiles", "2d", "3d_generated", "fused", "atom_symbols", "2d_atoms",
                                  "3d_generated_atoms", "fused_atoms"]
    assert table.column("id").to_pylist() == [m.id for m in molecules]
    assert table.column("smiles").to_pylist() == [m.smiles for m in molecules]
    want = embedder.embed(molecules, spaces=["fused"], atoms=True)
    np.testing.assert_allclose(np.array(table.column("fused").to_pylist(), dtype=np.float32), want["fused"], atol=1e-5)
    atoms = table.column("fused_atoms").to_pylist()
    np.testing.assert_allclose(np.array(atoms[5], dtype=np.float32), want["atoms"]["fused"][5], atol=1e-5)
    # the atoms in the record's order (the input's), named by their symbols
    symbols = [Chem.GetPeriodicTable().GetElementSymbol(int(z)) for z in molecules[5].record["z"]]
    assert table.column("atom_symbols").to_pylist()[5] == symbols and "Br" in symbols
    assert json.loads(table.schema.metadata[b"flexmol"])["modality"] == "2d"
    lines = [json.loads(x) for x in open(f"{out}.rejects.jsonl")]
    assert [(r["index"], r["reason"]) for r in lines] == [(r.index, r.reason) for r in rejects]


def test_cli_npy_sidecars(tmp_path, export, embedder, egfr_sdf, egfr_3d):
    out = tmp_path / "emb.npy"
    assert _embed(egfr_sdf, "--checkpoint", export, "--out", out, "--limit", 6, "--modality", "both",
                  "--space", "fused", "--space", "3d", "--atoms") == 0
    description = json.loads((tmp_path / "emb.json").read_text())
    assert description["files"] == {"fused": "emb.npy", "3d": "emb.3d.npy"} and description["rows"] == 6
    loaded = {p.name: np.load(p, allow_pickle=False) for p in tmp_path.glob("*.npy")}
    want = embedder.embed(egfr_3d[0], "both", spaces=["fused", "3d"], atoms=True)
    np.testing.assert_allclose(loaded["emb.npy"], want["fused"], atol=1e-5)
    np.testing.assert_allclose(loaded["emb.3d.npy"], want["3d"], atol=1e-5)
    offsets = loaded["emb.offsets.npy"]
    assert offsets[0] == 0 and offsets[-1] == len(loaded["emb.atoms.npy"]) == len(loaded["emb.symbols.npy"])
    np.testing.assert_allclose(loaded["emb.3d.atoms.npy"][offsets[2]:offsets[3]], want["atoms"]["3d"][2], atol=1e-5)
    with open(tmp_path / "emb.ids.tsv", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    assert rows[0] == ["id", "smiles"] and [r[0] for r in rows[1:]] == [m.id for m in egfr_3d[0]]


def test_cli_refusals(tmp_path, export, nci_smi, capsys):
    out = tmp_path / "emb.parquet"
    assert _embed(nci_smi, "--checkpoint", export, "--out", out, "--limit", 3) == 0
    capsys.readouterr()
    cases = [
        (("--out", out), "exists (and 1 more output file(s)); add --overwrite"),
        (("--out", tmp_path / "emb.h5"), "must end in .parquet or .npy"),
        (("--out", out, "--overwrite", "--modality", "3d"), "needs coordinates"),
        (("--out", out, "--overwrite", "--space", "3d"), "--space 3d: 2d input"),
        (("--out", out / "x.npy"), "emb.parquet"),  # a file where the output's folder should be
        (("--out", out, "--overwrite", "--device", "gpu0"), "device 'gpu0': not a device"),
        (("--out", out, "--overwrite", "--device", "cuda:99"), "device cuda:99: "),
    ]
    for extra, message in cases:
        assert _embed(nci_smi, "--checkpoint", export, "--limit", 3, *extra) == 2
        err = capsys.readouterr().err
        assert err.startswith("flexmol embed: ") and message in err and len(err.strip().splitlines()) == 1
    assert _embed(tmp_path / "missing.smi", "--checkpoint", export, "--out", tmp_path / "m.npy") == 2
    assert "missing.smi" in capsys.readouterr().err
    assert _embed(nci_smi, "--checkpoint", tmp_path, "--out", tmp_path / "m.npy") == 2
    assert "holds no model.safetensors" in capsys.readouterr().err
    assert _embed(nci_smi, "--checkpoint", export, "--out", out, "--overwrite", "--limit", 2) == 0
    import pyarrow.parquet as pq

    assert pq.read_table(out).num_rows == 2
