"""The main job (``flexmol demo``) end to end on a very small subset of its default data."""
import json
import subprocess
import sys

import pytest
from conftest import child_env


@pytest.mark.slow
def test_demo_runs_the_whole_pipeline(tmp_path, qm9_rows):
    cmd = [sys.executable, "-m", "flexmol.cli", "demo", "--out", str(tmp_path), "--qm9-limit", "60",
           "--moses-limit", "300", "--stage1-steps", "6", "--stage2-steps", "6", "--b3db-sample", "150",
           "--epochs", "1", "--confgen-count", "4"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=child_env())
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    out = proc.stdout
    # featurised and checked
    assert "counts: input 60," in out and "counts: input 300," in out and out.count("  OK") == 2
    # pre-trained, stage 2 from stage 1
    for stage in ("stage1", "stage2"):
        assert (tmp_path / stage / "export" / "model.safetensors").is_file()
        steps = [json.loads(line)["step"] for line in open(tmp_path / stage / "metrics.jsonl")]
        assert steps[-1] == 6
    # fine-tuned: the table and its results
    res = json.loads((tmp_path / "finetune_b3db" / "results.json").read_text())
    assert res["metric"] == "roc_auc" and len(res["per_seed"]) == 3 and res["split"]["kind"] == "scaffold"
    assert set(res["models"]) == {"flexmol", "flexmol_full", "scratch", "probe_flexmol", "probe_scratch", "ecfp_rf"}
    assert res["checkpoint"] == str(tmp_path / "stage2" / "export")
    assert "flexmol" in out and "ecfp_rf" in out and "± " in out
    # conformers scored on QM9 molecules held out of the pre-training data: the demo excludes its
    # own shards, and no scored molecule is in them (by InChIKey, the featuriser's identity)
    conf = json.loads((tmp_path / "confgen" / "confgen.json").read_text())
    assert conf["scores"]["etkdg"]["molecules"] == 4 and conf["scores"]["flexmol"]["molecules"] == 4
    assert str(tmp_path / "shards" / "qm9_paired") in conf["excluded_datasets"]
    from rdkit import Chem

    from flexmol.data.shards import read_shard, shard_paths

    def key(smiles):
        return Chem.MolToInchiKey(Chem.MolFromSmiles(smiles))

    pretrained, counts = set(), {}
    for name in ("qm9_paired", "moses_2d"):
        records = [r for p in shard_paths(tmp_path / "shards" / name) for r in read_shard(p)]
        counts[name] = len(records)
        pretrained.update(k for r in records for k in (r["inchikey"], key(r["smiles"])))
    assert counts["qm9_paired"] >= 40 and counts["moses_2d"] >= 250
    held_out = {key(m["smiles"]) for m in conf["molecules"]}
    assert len(held_out) == 4 and not held_out & pretrained
