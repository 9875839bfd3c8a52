"""Records through msgpack and WebDataset tars, and the inspector catching damaged datasets."""
import json
import subprocess
import sys

import msgpack
import numpy as np
import pytest
import webdataset as wds

from flexmol import config
from flexmol.chem import Featurizer, RawInput
from flexmol.config import FeaturizerConfig
from flexmol.data import schema
from flexmol.data.shards import inspect, read_shard, write_shard
from flexmol.featurize import run_featurize


def records():
    feat = Featurizer(FeaturizerConfig(num_conformers=2), "paired")
    smiles = ["CC(=O)Oc1ccccc1C(=O)O", "C[C@@H](C(=O)O)N", "c1ccc2ccccc2c1", "CC(=O)[O-].[Na+]"]
    out = []
    for i, s in enumerate(smiles):
        raw = RawInput(i, f"mol.{i}", "smiles", s, labels={"y": float(i), "missing": None})
        out.append(feat(raw))
    return out


def assert_same(a, b):
    assert set(a) == set(b)
    for k in a:
        if isinstance(a[k], np.ndarray):
            assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


def test_record_survives_encode_decode_exactly():
    for rec in records():
        back = schema.decode(schema.encode(rec))
        schema.validate(back)
        assert_same(rec, back)


def test_record_shard_record_round_trip(tmp_path):
    recs = records()
    n, size, digest = write_shard(tmp_path / "shard-000000.tar", recs)
    assert n == 4 and size == (tmp_path / "shard-000000.tar").stat().st_size
    for a, b in zip(recs, read_shard(tmp_path / "shard-000000.tar", validate=True)):
        assert_same(a, b)
    # the same tar through WebDataset itself: keys without dots, one msgpack member per sample
    samples = list(wds.WebDataset(str(tmp_path / "shard-000000.tar"), shardshuffle=False))
    assert [s["__key__"] for s in samples] == ["m000000000", "m000000001", "m000000002", "m000000003"]
    assert all("." not in s["__key__"] for s in samples)
    assert_same(recs[2], schema.decode(samples[2]["msgpack"]))


def test_decoding_never_executes_code_and_refuses_foreign_types():
    evil = msgpack.packb({"v": 1, "x": msgpack.ExtType(42, b"cos\nsystem\n")})
    with pytest.raises(schema.SchemaError, match="extension type 42"):
        schema.decode(evil)
    obj_array = msgpack.packb({"x": msgpack.ExtType(1, msgpack.packb(["|O", [1], b"\x00" * 8]))})
    with pytest.raises(schema.SchemaError, match="not allowed"):
        schema.decode(obj_array)
    with pytest.raises(TypeError):
        schema.encode({"x": np.array([object()], dtype=object)})


def test_validate_catches_inconsistent_records():
    rec = schema.decode(schema.encode(records()[0]))
    bad = dict(rec, pos=rec["pos"][:, :-1])
    with pytest.raises(schema.SchemaError, match="pos shape"):
        schema.validate(bad)
    with pytest.raises(schema.SchemaError, match="lacks"):
        schema.validate({k: v for k, v in rec.items() if k != "bond_feat"})


@pytest.fixture()
def dataset(tmp_path, nci_smi):
    cfg = config.build(config.FeaturizeConfig, {"source": str(nci_smi), "out": str(tmp_path / "ds"), "modality": "2d",
                                                "limit": 300, "job": {"executor": "serial", "shard_size": 100, "progress": False}})
    run_featurize(cfg, log=lambda m: None)
    return tmp_path / "ds"


def test_shard_names_past_a_million_shards_are_names_inspect_accepts(dataset):
    from flexmol.data.shards import _SHARD_NAME, shard_name

    assert [shard_name(i) for i in (0, 999_999, 1_000_000)] == ["shard-000000.tar", "shard-999999.tar", "shard-1000000.tar"]
    for i in (0, 42, 999_999, 1_000_000, 123_456_789):
        assert _SHARD_NAME.fullmatch(shard_name(i)), shard_name(i)
    assert not any(_SHARD_NAME.fullmatch(n) for n in ("shard-12345.tar", "shard-0000001.tar", "shard-../x.tar"))
    # a dataset whose last shard is number 1,000,000 passes its check
    m = json.loads((dataset / "manifest.json").read_text())
    (dataset / m["shards"][-1]["name"]).rename(dataset / shard_name(1_000_000))
    m["shards"][-1]["name"] = shard_name(1_000_000)
    (dataset / "manifest.json").write_text(json.dumps(m))
    report = inspect(dataset)
    assert report.ok, report.problems


def cli_inspect(path):
    return subprocess.run([sys.executable, "-m", "flexmol.cli", "shards", "inspect", str(path)], capture_output=True, text=True)


def test_inspect_passes_a_good_dataset(dataset):
    report = inspect(dataset)
    assert report.ok, report.problems
    assert report.records_checked == report.manifest["counts"]["written"]
    proc = cli_inspect(dataset)
    assert proc.returncode == 0 and "counts: input 300" in proc.stdout


def test_inspect_catches_a_corrupted_shard(dataset):
    shard = dataset / "shard-000001.tar"
    data = bytearray(shard.read_bytes())
    data[2000] ^= 0xFF
    shard.write_bytes(bytes(data))
    proc = cli_inspect(dataset)
    assert proc.returncode != 0 and "shard-000001.tar: sha256 differs" in proc.stdout


def test_inspect_catches_a_truncated_shard(dataset):
    shard = dataset / "shard-000002.tar"
    shard.write_bytes(shard.read_bytes()[:5000])
    proc = cli_inspect(dataset)
    assert proc.returncode != 0 and "truncated" in proc.stdout


def test_inspect_catches_a_missing_shard_and_unreconciled_counts(dataset):
    (dataset / "shard-000000.tar").unlink()
    m = json.loads((dataset / "manifest.json").read_text())
    m["counts"]["input"] += 1
    (dataset / "manifest.json").write_text(json.dumps(m))
    proc = cli_inspect(dataset)
    assert proc.returncode != 0
    assert "shard-000000.tar: missing" in proc.stdout and "do not reconcile" in proc.stdout


def test_inspect_catches_a_shard_whose_records_do_not_decode(dataset, tmp_path):
    # A well-formed tar with the manifest's checksum but a record that is not msgpack: the
    # checksum alone cannot tell, decoding does.
    path = dataset / "shard-000000.tar"
    with wds.TarWriter(str(path)) as sink:
        sink.write({"__key__": "m000000000", "msgpack": b"\xc1not msgpack"})
    m = json.loads((dataset / "manifest.json").read_text())
    from flexmol.data.shards import file_sha256
    m["shards"][0].update(bytes=path.stat().st_size, sha256=file_sha256(path))
    (dataset / "manifest.json").write_text(json.dumps(m))
    report = inspect(dataset)
    assert not report.ok and any("unreadable" in p for p in report.problems)


def test_loader_reads_every_record_once_with_batches_collated_in_two_workers(dataset):
    from flexmol.data.loader import batch_loader
    from flexmol.data.shards import read_shard, shard_paths

    paths = shard_paths(dataset)
    expected = sorted(len(r["z"]) for p in paths for r in read_shard(p))
    seen = []
    for batch in batch_loader([str(p) for p in paths], max_atoms=512, num_workers=2):
        b, n = batch["z"].shape
        assert b * n <= 512 or b == 1
        assert batch["spd"].shape == (b, n, n) and batch["atom_feat"].shape == (b, n, 9)
        assert (batch["mask"].sum(1) == batch["num_atoms"]).all()
        seen += batch["num_atoms"].tolist()
    assert sorted(seen) == expected
