"""``flexmol shards bench``: the training loader's molecules/s and atoms/s on a dataset, and one line
for whatever keeps it from measuring."""
import json
import re

import numpy as np
import pytest
import webdataset as wds

from flexmol.cli import main as cli
from flexmol.data import schema
from flexmol.data.integrity import members
from conftest import nci_2d_dataset


@pytest.fixture(scope="module")
def nci_2d(tmp_path_factory, nci_smi):
    return nci_2d_dataset(tmp_path_factory.mktemp("bench"), nci_smi, 200)


def _rewrite(dataset, tmp_path, change):
    """A copy of ``dataset`` whose records went through ``change`` (manifest sizes updated, so
    that only reading the records can tell)."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(dataset, copy)
    m = json.loads((copy / "manifest.json").read_text())
    for shard in m["shards"]:
        records = [(key, schema.decode(data)) for key, data in members(str(dataset / shard["name"]))]
        with wds.TarWriter(str(copy / shard["name"])) as sink:
            for i, (key, rec) in enumerate(records):
                sink.write({"__key__": key, "msgpack": schema.encode(change(i, rec))})
        shard["bytes"] = (copy / shard["name"]).stat().st_size
    (copy / "manifest.json").write_text(json.dumps(m))
    return copy


def _figures(out):
    found = re.search(r"([\d,]+) molecules/s.*?, ([\d,]+) atoms/s", out)
    assert found, out
    return [int(x.replace(",", "")) for x in found.groups()]


def test_bench_prints_molecules_and_atoms_per_second_of_the_training_loader(nci_2d, capsys):
    assert cli(["shards", "bench", str(nci_2d), "--workers", "1", "--seconds", "1", "--warmup", "0.2"]) == 0
    out = capsys.readouterr().out
    molecules, atoms = _figures(out)
    assert 0 < molecules < atoms  # NCI molecules have more than one atom each
    assert "1 worker," in out and "max_spd 8, max_path 5" in out and "pair tables stored" in out


def test_bench_says_when_the_records_carry_no_pair_tables(nci_2d, tmp_path, capsys):
    old = _rewrite(nci_2d, tmp_path, lambda i, r: {k: v for k, v in r.items() if k not in ("dist", "path_bond")})
    assert cli(["shards", "bench", str(old), "--workers", "0", "--seconds", "0.5", "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    assert "pair tables computed while batching" in out and _figures(out)[0] > 0


def _one_line(capsys, *needles):
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("flexmol shards bench: ") and all(n in err for n in needles), err


@pytest.mark.parametrize("target,needle", [
    ("{tmp}/nowhere", "no such directory"),
    ("{tmp}/file.txt", "not a directory"),
    ("{tmp}", "no manifest.json"),
])
def test_bench_refuses_what_is_not_a_dataset_in_one_line(tmp_path, capsys, target, needle):
    (tmp_path / "file.txt").write_text("x")
    path = target.format(tmp=tmp_path)
    assert cli(["shards", "bench", path]) == 2
    _one_line(capsys, path, needle)


def test_bench_refuses_datasets_of_two_modalities_and_bad_numbers(nci_2d, tmp_path, capsys):
    paired = tmp_path / "paired"
    paired.mkdir()
    m = json.loads((nci_2d / "manifest.json").read_text())
    (paired / "manifest.json").write_text(json.dumps({**m, "modality": "paired", "shards": []}))
    assert cli(["shards", "bench", str(nci_2d), str(paired)]) == 2
    _one_line(capsys, str(paired), "holds paired data")
    for flag, value in (("--workers", "-1"), ("--seconds", "0"), ("--seconds", "nan"), ("--max-atoms", "0")):
        assert cli(["shards", "bench", str(nci_2d), flag, value]) == 2
        _one_line(capsys, flag)


def test_bench_stops_at_a_bad_record_with_one_line_naming_it(nci_2d, tmp_path, capsys):
    bad = _rewrite(nci_2d, tmp_path, lambda i, r: {**r, "z": r["z"].astype(np.float32)} if i == 7 else r)
    assert cli(["shards", "bench", str(bad), "--workers", "0", "--seconds", "1", "--warmup", "0"]) == 1
    _one_line(capsys, "shard-00000", "not integers")


def _wrong_path_bond(rec):
    pb = rec["path_bond"].copy()
    i, j = np.argwhere(rec["dist"] == 2)[0]
    pb[i, j] = (int(pb[i, j]) + 1) % len(rec["bond_index"])
    return {**rec, "path_bond": pb}


def test_bench_stops_at_a_record_whose_pair_tables_do_not_follow_its_bonds_naming_it(nci_2d, tmp_path, capsys):
    bad = _rewrite(nci_2d, tmp_path, lambda i, r: _wrong_path_bond(r) if i == 7 else r)
    assert cli(["shards", "bench", str(bad), "--workers", "0", "--seconds", "1", "--warmup", "0"]) == 1
    _one_line(capsys, "record m0", ".tar: its path_bond table does not follow its bonds")
