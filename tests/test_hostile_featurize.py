"""Hostile inputs to `flexmol featurize` and `flexmol shards inspect`: every one ends in a dataset
that passes its own check, or in one line naming the problem and exit 2; never a traceback, never a
molecule silently changed or lost."""
import gzip
import json
import os
from pathlib import Path

import msgpack
import numpy as np
import pytest
from rdkit import Chem

from flexmol.chem import Featurizer, RawInput, Rejected
from flexmol.cli import main
from flexmol.config import FeaturizerConfig
from flexmol.data import schema
from flexmol.data.shards import file_sha256, read_shard


def featurize(capsys, source, out, *args):
    rc = main(["featurize", str(source), "--out", str(out), "--executor", "serial", "--no-progress", *map(str, args)])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def inspect_rc(capsys, directory):
    rc = main(["shards", "inspect", str(directory)])
    return rc, capsys.readouterr().out


def one_line_error(err):
    """The single `flexmol featurize:` line of ``err`` (and no traceback)."""
    lines = [l for l in err.splitlines() if l.startswith("flexmol featurize:")]
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


def rejects(out):
    return [json.loads(l) for l in (Path(out) / "rejects.jsonl").read_text(encoding="utf-8").split("\n") if l]


def written(out):
    return [r for p in sorted(Path(out).glob("shard-*.tar")) for r in read_shard(p)]


# ----------------------------------------------------------------------- SMILES never cut short

def test_whitespace_inside_a_smiles_field_is_rejected_not_truncated(tmp_path, capsys):
    # A quoted CSV cell holding a newline, two SMILES in one cell: RDKit alone reads ethane and benzene.
    src = tmp_path / "in.csv"
    src.write_text('smiles,name\n"CC\nO",cut-at-newline\nc1ccccc1 CCCl,cut-at-space\nCCN,ethylamine\n'
                   "CC\u00a0O,nbsp\nCCO\x00,nul\n", encoding="utf-8")
    rc, _, _ = featurize(capsys, src, tmp_path / "out", "--modality", "2d", "--id-column", "name")
    assert rc == 0
    assert [r["smiles"] for r in written(tmp_path / "out")] == ["CCN"]
    by_id = {r["id"]: r for r in rejects(tmp_path / "out")}
    assert set(by_id) == {"cut-at-newline", "cut-at-space", "nbsp", "nul"}
    assert all(r["code"] == "invalid_smiles" for r in by_id.values())
    assert "whitespace ('\\n'" in by_id["cut-at-newline"]["reason"] and by_id["cut-at-newline"]["smiles"] == "CC\nO"
    assert "whitespace (' ' at position 8)" in by_id["cut-at-space"]["reason"]
    assert "control character" in by_id["nul"]["reason"]


def test_a_smiles_with_a_trailing_cxsmiles_block_is_read_other_whitespace_still_rejected(tmp_path, capsys):
    src = tmp_path / "in.csv"
    src.write_text("smiles,name\n"
                   "C[C@H](F)Cl |&1:1|,cx-and\n"          # enhanced stereo: RDKit parses the block
                   "C[C@@H](O)CC |o1:1|,cx-or\n"
                   "C[C@@H](N)CC\t|o1:1|,tab\n"
                   "C[C@H](Br)Cl  |&1:1|,two-spaces\n"     # anything else with whitespace is still cut short
                   "c1ccccc1 CCCl |&1:1|,two-smiles\n"
                   "CCCO |&1:1| x,text-after\n"
                   "CCCN |not cx|,space-in-block\n"
                   "CCCCO |garbage|,bad-block\n", encoding="utf-8")
    rc, _, err = featurize(capsys, src, tmp_path / "out", "--modality", "2d", "--id-column", "name")
    assert rc == 0, err
    assert sorted(r["id"] for r in written(tmp_path / "out")) == ["cx-and", "cx-or"]
    by_id = {r["id"]: r for r in rejects(tmp_path / "out")}
    assert set(by_id) == {"tab", "two-spaces", "two-smiles", "text-after", "space-in-block", "bad-block"}
    assert all(r["code"] == "invalid_smiles" for r in by_id.values())
    assert all("whitespace" in r["reason"] for k, r in by_id.items() if k != "bad-block")
    assert "does not parse" in by_id["bad-block"]["reason"]


def test_smi_lines_split_at_space_or_tab_only_other_whitespace_stays_in_the_smiles(tmp_path):
    from flexmol.data.sources import open_source

    p = tmp_path / "a.smi"
    # Daylight's format: SMILES, a space or a tab, the name. A vertical tab or a no-break space is
    # not a separator: the field keeps it and the parser rejects it.
    p.write_text("CCO\tethanol\nCC\x0bO vt\nc1ccccc1\u00a0CCCl nbsp\n  CCN   two words  \n", encoding="utf-8")
    items = [(r.id, r.text) for r in open_source(str(p))]
    assert items == [("ethanol", "CCO"), ("vt", "CC\x0bO"), ("nbsp", "c1ccccc1\u00a0CCCl"), ("two words", "CCN")]
    feat = Featurizer(FeaturizerConfig(), "2d")
    for ident, text in items[1:3]:
        with pytest.raises(Rejected, match="whitespace") as exc:
            feat(RawInput(0, ident, "smiles", text))
        assert exc.value.code == "invalid_smiles"


# ---------------------------------------------------------- a dataset that passes its own check

def _smi_inputs(data: bytes) -> int:
    """Inputs of a .smi file as its documented format counts them: every line (ended by \\n, \\r or
    \\r\\n) but # comments and a first-line ``smiles`` header."""
    lines = data.removeprefix(b"\xef\xbb\xbf").splitlines()  # bytes.splitlines: \n, \r, \r\n only
    heads = [l.strip(b" \t").split(None, 1)[0] if l.strip(b" \t") else b"" for l in lines]
    return sum(1 for i, h in enumerate(heads) if not h.startswith(b"#") and not (i == 0 and h.lower() == b"smiles"))


def test_a_file_with_line_separators_inside_its_lines_gives_a_dataset_that_passes_inspect(tmp_path, capsys):
    # in ids and in SMILES: U+2028, U+2029, U+0085, form feed, vertical tab (all valid UTF-8 text)
    data = ("CCO eth\u2028anol\nCCN amine\u0085x\nC1CC bad\u2029ring\nCC\u2028O in-smiles\n"
            "c1ccccc1 benzene\x0cff\nCCCl chloro\x0bvt\n").encode()
    src = tmp_path / "in.smi"
    src.write_bytes(data)
    out = tmp_path / "out"
    rc, _, err = featurize(capsys, src, out, "--modality", "2d")
    assert rc == 0, err
    assert inspect_rc(capsys, out)[0] == 0
    m = json.loads((out / "manifest.json").read_text())
    c = m["counts"]
    assert c["input"] == _smi_inputs(data) == c["written"] + c["rejected"] == len(written(out)) + len(rejects(out))
    assert {r["id"] for r in rejects(out)} == {"bad\u2029ring", "in-smiles"}
    assert sorted(r["id"] for r in written(out)) == sorted(["eth\u2028anol", "amine\u0085x", "benzene\x0cff", "chloro\x0bvt"])


def test_rejects_jsonl_has_one_entry_per_line_however_lines_are_split(tmp_path, capsys):
    # Rejected inputs whose ids and SMILES hold U+2028 and U+0085, which str.splitlines() breaks at.
    src = tmp_path / "in.smi"
    src.write_bytes("C1CC ring\u2028one\nC(( paren\u0085two\nCC\u2028O sep-in-smiles\nCC\u0085N nel-in-smiles\n"
                    "CCO ok\n".encode())
    out = tmp_path / "out"
    rc, _, err = featurize(capsys, src, out, "--modality", "2d")
    assert rc == 0, err
    text = (out / "rejects.jsonl").read_text(encoding="utf-8")
    entries = [json.loads(line) for line in text.splitlines()]
    assert len(entries) == json.loads((out / "manifest.json").read_text())["counts"]["rejected"] == 4
    assert {e["id"] for e in entries} == {"ring\u2028one", "paren\u0085two", "sep-in-smiles", "nel-in-smiles"}
    assert text.isascii()


@pytest.mark.parametrize("kind", ["gzip_bytes", "random_bytes", "utf16"])
def test_a_binary_file_given_as_smi_is_refused_in_one_line_and_no_dataset_is_made(tmp_path, capsys, nci_smi, kind):
    import random

    data = {"gzip_bytes": lambda: gzip.compress(nci_smi.read_bytes(), mtime=0),  # a compressed file without .gz
            "random_bytes": lambda: random.Random(0).randbytes(20000),
            "utf16": lambda: nci_smi.read_text().encode("utf-16")}[kind]()
    src = tmp_path / "in.smi"
    src.write_bytes(data)
    out = tmp_path / "out"
    rc, _, err = featurize(capsys, src, out, "--modality", "2d")
    line = one_line_error(err)
    assert rc == 2 and str(src) in line and "binary data, not a text file" in line, line
    assert ("gzip without .gz?" in line) == (kind == "gzip_bytes")
    assert not out.exists()


def test_a_dataset_failing_its_end_of_job_check_fails_the_job_in_one_line(tmp_path, capsys, monkeypatch):
    from flexmol.featurize import job

    real = job.encode_rejects
    monkeypatch.setattr(job, "encode_rejects", lambda rs: real(rs[:-1]))  # a writer that loses a line
    src = tmp_path / "in.smi"
    src.write_text("CCO a\nC1CC b\nC(( c\n")
    rc, _, err = featurize(capsys, src, tmp_path / "out", "--modality", "2d")
    line = one_line_error(err)
    assert rc == 2 and str(tmp_path / "out") in line and "rejects.jsonl has 1 entries" in line


# ----------------------------------------------------------------------- other hostile inputs

def test_out_that_is_an_existing_file_is_refused_in_one_line(tmp_path, capsys):
    src = tmp_path / "in.smi"
    src.write_text("CCO a\n")
    rc, _, err = featurize(capsys, src, src, "--modality", "2d")  # --out names the input itself
    assert rc == 2 and "exists and is not a directory" in one_line_error(err)
    assert src.read_text() == "CCO a\n"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only directory: chmod cannot block it")
def test_out_in_a_read_only_directory_is_refused_in_one_line(tmp_path, capsys):
    src = tmp_path / "in.smi"
    src.write_text("CCO a\n")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        rc, _, err = featurize(capsys, src, locked / "out", "--modality", "2d")
    finally:
        locked.chmod(0o755)
    assert rc == 2 and "not writable" in one_line_error(err)


def test_a_source_with_no_molecules_is_refused_and_no_dataset_is_made(tmp_path, capsys):
    for name, text in [("empty.smi", ""), ("comments.smi", "# nothing here\n"), ("header.csv", "smiles,id\n")]:
        src = tmp_path / name
        src.write_text(text)
        rc, _, err = featurize(capsys, src, tmp_path / f"out-{name}", "--modality", "2d")
        assert rc == 2 and "holds no molecules" in one_line_error(err)
        assert not (tmp_path / f"out-{name}").exists()


def test_unreadable_sources_are_one_line_errors(tmp_path, capsys, nci_smi):
    as_dir = tmp_path / "folder.smi"
    as_dir.mkdir()
    not_gzip = tmp_path / "plain.smi.gz"
    not_gzip.write_text("CCO a\n")
    truncated = tmp_path / "cut.smi.gz"
    truncated.write_bytes(gzip.compress(nci_smi.read_bytes())[:3000])
    for src, why in [(as_dir, "not a regular file"), (not_gzip, "Not a gzipped file"),
                     (truncated, "record(s): the compressed data ends early")]:
        rc, _, err = featurize(capsys, src, tmp_path / f"out-{src.name}", "--modality", "2d")
        line = one_line_error(err)
        assert rc == 2 and why in line and src.name in line, line
        assert not (tmp_path / f"out-{src.name}").exists()


@pytest.mark.parametrize("override, key", [
    ("featurizer.num_conformers=100000000000", "featurizer.num_conformers"),
    ("featurizer.embed_timeout_s=1e30", "featurizer.embed_timeout_s"),
    ("featurizer.embed_timeout_s=nan", "featurizer.embed_timeout_s"),
    ("featurizer.hard_timeout_s=inf", "featurizer.hard_timeout_s"),
    ("featurizer.embed_max_attempts=100000000000", "featurizer.embed_max_attempts"),
    ("featurizer.mmff_max_iters=-1", "featurizer.mmff_max_iters"),
    ("featurizer.elements=[]", "featurizer.elements"),
    ("job.num_cpus=0", "job.num_cpus"),
    ("limit=100000000000000000000000", "limit"),
    ("job.shard_size=100000000000000000000000", "job.shard_size"),
])
def test_config_values_the_job_cannot_take_are_refused_with_the_key(tmp_path, capsys, override, key):
    src = tmp_path / "in.smi"
    src.write_text("CCO a\n")
    rc, _, err = featurize(capsys, src, tmp_path / "out", "--modality", "paired", override)
    assert rc == 2 and f"'{key}'" in one_line_error(err)


def test_source_options_the_reader_ignores_are_refused(tmp_path, capsys):
    src = tmp_path / "in.smi"
    src.write_text("CCO a\n")
    rc, _, err = featurize(capsys, src, tmp_path / "out", "--modality", "2d", "--label-column", "y")
    assert rc == 2 and "source_options.label_columns" in one_line_error(err)


def test_csv_header_problems_are_one_line_errors(tmp_path, capsys):
    src = tmp_path / "in.csv"
    src.write_text("smiles,name\nCCO,a\n")
    rc, _, err = featurize(capsys, src, tmp_path / "out", "--modality", "2d", "--id-column", "id")
    assert rc == 2 and "no id column 'id'" in one_line_error(err)
    # a byte-order mark is not part of the first column's name
    bom = tmp_path / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbfsmiles,name\nCCO,a\n")
    rc, _, err = featurize(capsys, bom, tmp_path / "bom", "--modality", "2d")
    assert rc == 0, err


def test_csv_rows_the_csv_module_cannot_read_are_rejected_rows(tmp_path, capsys):
    src = tmp_path / "in.csv"
    src.write_text('smiles,name\nCCO,a\n"' + "C" * 200_000 + '",huge\nCCN,b\n"CCCl,unclosed\nCCBr,c\n')
    rc, _, err = featurize(capsys, src, tmp_path / "out", "--modality", "2d", "--id-column", "name")
    assert rc == 0, err
    assert [r["id"] for r in written(tmp_path / "out")] == ["a", "b"]
    reasons = {r["id"]: r["reason"] for r in rejects(tmp_path / "out")}
    assert "field larger than field limit" in reasons["row3"]
    assert "row 5 (lines 5-6: a quoted field spans lines)" in reasons["row5"]


def test_xyz_comment_with_a_line_separator_does_not_shift_the_frame(tmp_path, capsys):
    src = tmp_path / "in.xyz"
    water = "O 0.0 0.0 0.0\nH 0.96 0.0 0.0\nH -0.24 0.93 0.0\n"
    methane = ("C 0.0 0.0 0.0\nH 0.63 0.63 0.63\nH -0.63 -0.63 0.63\nH -0.63 0.63 -0.63\nH 0.63 -0.63 -0.63\n")
    src.write_text(f"3\nwater\u2028from a report\n{water}5\nmethane\x0cff\n{methane}", encoding="utf-8")
    rc, _, err = featurize(capsys, src, tmp_path / "out", "--modality", "3d")
    assert rc == 0, err
    assert sorted(r["smiles"] for r in written(tmp_path / "out")) == ["C", "O"]


def test_sdf_multi_line_and_numbered_properties_are_read_whole(tmp_path):
    from flexmol.config import SourceOptions
    from flexmol.data.sources import open_source

    block = Chem.MolToMolBlock(Chem.MolFromSmiles("CCO"))
    p = tmp_path / "a.sdf"
    p.write_text(block + ">  <note>\nfirst line\nsecond line\n\n> 25 <y>\n1.5\n\n$$$$\n")
    (item,) = open_source(str(p), SourceOptions(label_columns=["note", "y"]))
    reference = next(Chem.ForwardSDMolSupplier(str(p)))
    assert item.labels["note"] == reference.GetProp("note") == "first line\nsecond line"
    assert item.labels["y"] == 1.5


def test_a_damaged_plan_or_part_file_is_refused_or_redone_without_a_traceback(tmp_path, capsys):
    src = tmp_path / "in.smi"
    src.write_text("CCO a\nCCN b\n")
    out = tmp_path / "out"
    assert featurize(capsys, src, out, "--modality", "2d")[0] == 0
    (out / "parts" / "shard-000000.json").write_text("[]")  # damaged bookkeeping: the shard is made again
    rc, _, err = featurize(capsys, src, out, "--modality", "2d")
    assert rc == 0 and inspect_rc(capsys, out)[0] == 0, err
    (out / "plan.json").write_bytes(b"\x00\xff garbage")
    rc, _, err = featurize(capsys, src, out, "--modality", "2d")
    assert rc == 2 and "plan.json is unreadable" in one_line_error(err)


def test_an_executor_that_cannot_start_is_one_line(tmp_path, capsys, monkeypatch):
    from flexmol.featurize import job

    def no_ray(cfg):  # what ray.init raises for a cluster it cannot join
        raise RuntimeError("could not reach the cluster at 10.0.0.1:6379\n(details)")

    monkeypatch.setattr(job, "make_executor", no_ray)
    src = tmp_path / "in.smi"
    src.write_text("CCO a\n")
    rc, _, err = featurize(capsys, src, tmp_path / "out", "--modality", "2d")
    assert rc == 2 and "could not reach the cluster" in one_line_error(err) and "(details)" not in err


def test_a_molecule_too_large_for_uint16_bond_indices_is_rejected():
    from flexmol.chem.features import graph_features

    with pytest.raises(Rejected) as exc:
        graph_features(Chem.MolFromSmiles("C" * 65537))
    assert exc.value.code == "too_large"


# ------------------------------------------------------------------------- damaged datasets

@pytest.fixture
def dataset(tmp_path, capsys):
    src = tmp_path / "in.smi"
    src.write_text("CCO a\nCCN b\nC1CC c\n")
    assert featurize(capsys, src, tmp_path / "ds", "--modality", "2d")[0] == 0
    return tmp_path / "ds"


def _edit_manifest(ds, fn):
    m = json.loads((ds / "manifest.json").read_text())
    fn(m)
    (ds / "manifest.json").write_text(json.dumps(m))


def _forge_shard(ds, record: dict):
    """Replace shard 0 with one holding ``record`` (msgpack-encoded), the manifest updated to match."""
    from flexmol.data.shards import _write_members

    path = ds / "shard-000000.tar"
    _write_members(path, [("m000000000.msgpack", msgpack.packb(record, default=schema._default, use_bin_type=True))])
    _edit_manifest(ds, lambda m: m["shards"][0].update(bytes=path.stat().st_size, sha256=file_sha256(path)))


GOOD_2D = {"v": 1, "index": 0, "id": "a", "smiles": "CCO", "inchikey": "K", "modality": "2d",
           "z": np.array([6, 6, 8], np.uint8), "atom_feat": np.zeros((3, 9), np.uint8),
           "bond_index": np.array([[0, 1], [1, 2]], np.uint16), "bond_feat": np.zeros((2, 3), np.uint8)}

DAMAGES = {
    "binary manifest": (lambda ds: (ds / "manifest.json").write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256))),
                        "manifest.json: unreadable"),
    "manifest a JSON list": (lambda ds: (ds / "manifest.json").write_text("[1, 2]"), "not a JSON object"),
    "shards a number": (lambda ds: _edit_manifest(ds, lambda m: m.update(shards=5, source=[], totals=None)),
                        "'shards' is not a list"),
    "shard entry without a name": (lambda ds: _edit_manifest(ds, lambda m: m["shards"][0].pop("name")), "shard entry 0"),
    "shard entry outside the dataset": (lambda ds: _edit_manifest(ds, lambda m: m["shards"][0].update(name="../in.smi")),
                                        "shard entry 0"),
    "counts not numbers": (lambda ds: _edit_manifest(ds, lambda m: m.update(counts={"input": "3"})), "'counts'"),
    "binary rejects": (lambda ds: (ds / "rejects.jsonl").write_bytes(b"\xff\xfe\x00garbage\n"), "rejects.jsonl: not JSON lines"),
    "rejects entries not objects": (lambda ds: (ds / "rejects.jsonl").write_text("5\n"), "entries without a reason"),
    "record with a string index": (lambda ds: _forge_shard(ds, {**GOOD_2D, "index": "0"}), "index '0'"),
    "record whose z is a number": (lambda ds: _forge_shard(ds, {**GOOD_2D, "z": 3}), "z is not a 1-d array"),
    "record with negative bond indices": (
        lambda ds: _forge_shard(ds, {**GOOD_2D, "bond_index": np.array([[0, -1], [1, 2]], np.int16)}),
        "bond_index refers to an atom that does not exist"),
    "record of another modality": (lambda ds: _forge_shard(ds, {**GOOD_2D, "modality": "3d", "pos": np.zeros((1, 3, 3), np.float32)}),
                                   "a 3d record in a 2d dataset"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_inspect_reports_a_damaged_dataset_without_a_traceback(dataset, capsys, damage):
    apply, expected = DAMAGES[damage]
    apply(dataset)
    rc, out = inspect_rc(capsys, dataset)
    assert rc == 1 and expected in out, out


@pytest.mark.parametrize("error", [OSError(28, "No space left on device\n(while writing the shard)"), RuntimeError()])
def test_a_task_that_keeps_failing_ends_the_job_in_one_line(tmp_path, capsys, monkeypatch, error):
    from flexmol.featurize import executors

    def failing(*args, **kwargs):
        raise error

    monkeypatch.setattr(executors, "featurize_shard", failing)
    src = tmp_path / "in.smi"
    src.write_text("CCO a\n")
    rc, _, err = featurize(capsys, src, tmp_path / "out", "--modality", "2d", "job.task_retries=1")
    line = one_line_error(err)
    assert rc == 2 and "shard-000000.tar failed 2 time(s)" in line and type(error).__name__ in line
    assert "(while writing the shard)" not in err
