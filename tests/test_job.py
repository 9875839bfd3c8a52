"""The featurisation job: every input accounted for, resumable, refusing mixed configs, surviving workers that die."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flexmol import config
from flexmol.featurize import FeaturizeError, run_featurize

REPO = Path(__file__).resolve().parents[1]

BAD_SMILES = """\
smiles id
CCO ethanol
OCC ethanol-again
C1CC unclosed-ring
C((C syntax
   
C(C)(C)(C)(C)C pentavalent
c1cccc1 bad-aromatic
CC(=O)[O-].[Na+] sodium-acetate
CCO.c1ccccc1CCCC mixture
CC[Pt](Cl)Cl platinum
[Na+].[Cl-] table-salt
{huge} huge
CN1C=NC2=C1C(=O)N(C(=O)N2C)C caffeine
"""


def cfg_for(source, out, **extra):
    job = {"executor": "serial", "progress": False, **extra.pop("job", {})}
    return config.build(config.FeaturizeConfig, {"source": str(source), "out": str(out), "job": job, **extra})


def rejects(out):
    return [json.loads(l) for l in (Path(out) / "rejects.jsonl").read_text().splitlines()]


def test_bad_input_file_reconciles_with_a_reason_for_every_rejection(tmp_path):
    src = tmp_path / "bad.smi"
    src.write_text(BAD_SMILES.format(huge="C" * 200))
    m = run_featurize(cfg_for(src, tmp_path / "out", modality="2d"), log=lambda s: None)
    assert m["counts"] == {"input": 13, "written": 4, "rejected": 9}
    by_id = {r["id"]: r for r in rejects(tmp_path / "out")}
    expected = {
        "ethanol-again": "duplicate", "unclosed-ring": "invalid_smiles", "syntax": "invalid_smiles",
        "line6": "empty", "pentavalent": "sanitization", "bad-aromatic": "sanitization",
        "platinum": "element", "table-salt": "element", "huge": "too_large",
    }
    assert {k: v["code"] for k, v in by_id.items()} == expected
    assert "input 0 (ethanol)" in by_id["ethanol-again"]["reason"]
    assert all(r["reason"] for r in by_id.values())
    assert m["totals"]["fragments_stripped"] == 2  # the acetate salt and the mixture
    assert m["rejects_by_reason"]["invalid_smiles"] == 2


def test_a_record_that_breaks_the_schema_is_rejected_with_its_reason_not_written(tmp_path, monkeypatch):
    from flexmol.data.shards import inspect
    from flexmol.featurize import task

    breakages = {  # id -> how the featuriser gets the record wrong
        "short-feat": lambda r: {**r, "atom_feat": r["atom_feat"][:, :5]},
        "dangling-bond": lambda r: {**r, "bond_index": r["bond_index"] + 50},
        "string-index": lambda r: {**r, "index": str(r["index"])},
        "no-z": lambda r: {k: v for k, v in r.items() if k != "z"},
        "object-labels": lambda r: {**r, "labels": {"y": object()}},  # valid shape, cannot be encoded
    }

    class Faulty(task.Featurizer):
        def __call__(self, raw):
            rec = super().__call__(raw)
            return breakages.get(raw.id, lambda r: r)(rec)

    monkeypatch.setattr(task, "Featurizer", Faulty)
    src = tmp_path / "in.smi"
    src.write_text("CCO ok\nCCN short-feat\nCCC dangling-bond\nCCCl string-index\nCCBr no-z\n"
                   "CCCC object-labels\nc1ccccc1 also-ok\n")
    out = tmp_path / "out"
    m = run_featurize(cfg_for(src, out, modality="2d"), log=lambda s: None)
    assert m["counts"] == {"input": 7, "written": 2, "rejected": 5}
    by_id = {r["id"]: r for r in rejects(out)}
    assert set(by_id) == set(breakages) and {r["code"] for r in by_id.values()} == {"schema"}
    assert "atom_feat shape" in by_id["short-feat"]["reason"]
    assert "bond_index refers to an atom" in by_id["dangling-bond"]["reason"]
    assert "index '3'" in by_id["string-index"]["reason"]
    assert "lacks z" in by_id["no-z"]["reason"]
    assert "TypeError" in by_id["object-labels"]["reason"]
    report = inspect(out)  # every record decoded and validated
    assert report.ok and report.records_checked == 2, report.problems


def test_fragment_policy_reject_rejects_salts_and_mixtures(tmp_path):
    src = tmp_path / "bad.smi"
    src.write_text(BAD_SMILES.format(huge="C"))
    run_featurize(cfg_for(src, tmp_path / "out", modality="2d", featurizer={"fragments": "reject"}), log=lambda s: None)
    codes = {r["id"]: r["code"] for r in rejects(tmp_path / "out")}
    assert codes["sodium-acetate"] == "mixture" and codes["mixture"] == "mixture"


def test_malformed_csv_sdf_and_xyz_records_are_rejected_not_lost(tmp_path, egfr_sdf):
    csv = tmp_path / "in.csv"
    csv.write_text('name,smiles,y\na,CCO,1\nb,"CCN",0,extra\nc,c1ccccc1,\nd,CC(C)O,0.5\n')
    m = run_featurize(cfg_for(csv, tmp_path / "csv", modality="2d", source_options={"label_columns": ["y"], "id_column": "name"}),
                      log=lambda s: None)
    assert m["counts"] == {"input": 4, "written": 3, "rejected": 1}
    (r,) = rejects(tmp_path / "csv")
    assert r["id"] == "b" and r["code"] == "malformed_record" and "3 fields" not in r["reason"] and "4 fields" in r["reason"]
    from flexmol.data.shards import read_shard
    labels = [rec["labels"] for rec in read_shard(tmp_path / "csv" / "shard-000000.tar")]
    assert labels == [{"y": 1.0}, {"y": None}, {"y": 0.5}]

    blocks = egfr_sdf.read_text().split("$$$$\n")[:5]
    blocks[2] = "broken\n  nothing here\n\nM  END\n"
    sdf = tmp_path / "in.sdf"
    sdf.write_text("$$$$\n".join(blocks) + "$$$$\n")
    m = run_featurize(cfg_for(sdf, tmp_path / "sdf", modality="paired"), log=lambda s: None)
    assert m["counts"] == {"input": 5, "written": 4, "rejected": 1}
    assert rejects(tmp_path / "sdf")[0]["code"] == "malformed_record"
    from flexmol.data.shards import read_shard
    assert {rec["conf_method"] for rec in read_shard(tmp_path / "sdf" / "shard-000000.tar")} == {"input"}

    xyz = tmp_path / "in.xyz"
    xyz.write_text("3\nwater\nO 0 0 0\nH 0.96 0 0\nH -0.24 0.93 0\nnot-a-count\nC 0 0 0\n"
                   "5\nmethane\nC 0 0 0\nH 0.63 0.63 0.63\nH -0.63 -0.63 0.63\nH -0.63 0.63 -0.63\nH 0.63 -0.63 -0.63\n")
    with pytest.raises(FeaturizeError, match="only --modality 3d"):
        run_featurize(cfg_for(xyz, tmp_path / "xyz2d", modality="2d"), log=lambda s: None)
    m = run_featurize(cfg_for(xyz, tmp_path / "xyz", modality="3d", featurizer={"min_heavy_atoms": 1}), log=lambda s: None)
    assert m["counts"] == {"input": 3, "written": 2, "rejected": 1}
    assert "expected an atom count" in rejects(tmp_path / "xyz")[0]["reason"]


def test_duplicates_across_shards_are_removed_keeping_the_first(tmp_path):
    src = tmp_path / "dups.smi"
    src.write_text("CCO a\nc1ccccc1 b\nCCN c\nOCC d\nN(C)C e\nc1ccccc1 f\n")
    m = run_featurize(cfg_for(src, tmp_path / "out", modality="2d", job={"shard_size": 2}), log=lambda s: None)
    assert m["counts"] == {"input": 6, "written": 4, "rejected": 2}
    assert {r["id"]: r["reason"].split(" by")[0] for r in rejects(tmp_path / "out")} == {
        "d": "duplicate of input 0 (a)", "f": "duplicate of input 1 (b)"}
    assert [s["samples"] for s in m["shards"]] == [2, 1, 1]
    # a rerun finds every shard finished and changes nothing
    again = run_featurize(cfg_for(src, tmp_path / "out", modality="2d", job={"shard_size": 2}), log=lambda s: None)
    assert again["shards"] == m["shards"] and again["counts"] == m["counts"]


def test_a_directory_built_with_another_featuriser_config_is_refused(tmp_path, nci_smi):
    out = tmp_path / "out"
    run_featurize(cfg_for(nci_smi, out, modality="2d", limit=20), log=lambda s: None)
    with pytest.raises(FeaturizeError, match=r"featurizer.explicit_hydrogens: False -> True"):
        run_featurize(cfg_for(nci_smi, out, modality="2d", limit=20, featurizer={"explicit_hydrogens": True}), log=lambda s: None)
    with pytest.raises(FeaturizeError, match=r"limit: 20 -> 30"):
        run_featurize(cfg_for(nci_smi, out, modality="2d", limit=30), log=lambda s: None)
    proc = subprocess.run([sys.executable, "-m", "flexmol.cli", "featurize", str(nci_smi), "--out", str(out),
                           "--modality", "2d", "--limit", "20", "featurizer.num_conformers=3"], capture_output=True, text=True)
    assert proc.returncode == 2 and "featurizer.num_conformers: 1 -> 3" in proc.stderr


def _run_cli(args, env=None, **kw):
    return subprocess.Popen([sys.executable, str(REPO / "ray_jobs" / "featurize.py"), *args], cwd=REPO,
                            env={**os.environ, "FLEXMOL_RAY_TMPDIR": "/tmp/flexmol-ray-test", **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


@pytest.mark.slow
def test_killed_ray_job_resumes_to_the_same_dataset_as_an_uninterrupted_one(tmp_path, nci_smi):
    args = ["--modality", "paired", "--limit", "120", "--shard-size", "15", "--no-progress"]
    reference = run_featurize(cfg_for(nci_smi, tmp_path / "ref", modality="paired", limit=120, job={"shard_size": 15}),
                              log=lambda s: None)
    out = tmp_path / "killed"
    proc = _run_cli([str(nci_smi), "--out", str(out), *args], start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / "parts").glob("*.json"))) < 2:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver, Ray and its workers: a preempted machine
    proc.wait()
    done = len(list((out / "parts").glob("*.json")))
    assert 2 <= done < 8, "the job must be killed part-way"
    assert not (out / "manifest.json").exists()
    resumed = _run_cli([str(nci_smi), "--out", str(out), *args])
    log, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, log
    kept = int(log.split(" finished shard(s) found and kept")[0].rsplit("] ", 1)[1])
    assert kept >= done  # shards finished between the count and the kill are kept too
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["shards"] == reference["shards"]  # same names, counts, bytes and sha256
    assert manifest["counts"] == reference["counts"]
    assert (out / "rejects.jsonl").read_text() == (tmp_path / "ref" / "rejects.jsonl").read_text()


@pytest.mark.slow
def test_workers_that_crash_or_hang_are_retried_and_the_job_finishes(tmp_path, nci_smi):
    # NCI ids are line numbers: molecule "5" crashes its worker every time, "30" once, "50" hangs.
    env = {"FLEXMOL_FAULTS": "crash:5,crash-once:30,hang:50", "FLEXMOL_FAULTS_DIR": str(tmp_path)}
    out = tmp_path / "out"
    proc = _run_cli([str(nci_smi), "--out", str(out), "--modality", "2d", "--limit", "60", "--shard-size", "20",
                     "--no-progress", "featurizer.hard_timeout_s=2"], env=env)
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log
    m = json.loads((out / "manifest.json").read_text())
    assert m["counts"]["input"] == 60 == m["counts"]["written"] + m["counts"]["rejected"]
    died = {r["id"]: r for r in rejects(out) if r["code"] == "worker_died"}
    assert set(died) == {"5", "50"}
    assert "2 time(s)" in died["5"]["reason"] and "hard_timeout_s=2.0" in died["50"]["reason"]
    from flexmol.data.shards import read_shard
    ids = {rec["id"] for s in m["shards"] for rec in read_shard(out / s["name"])}
    assert "30" in ids  # crashed once, then featurised on the retry
    assert (tmp_path / "crashed-30").exists()
