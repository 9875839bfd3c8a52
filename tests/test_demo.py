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
    assert set(res["models"]) == {"flexmol", "scratch", "ecfp_rf"}
    assert res["checkpoint"] == str(tmp_path / "stage2" / "export")
    assert "flexmol" in out and "ecfp_rf" in out and "± " in out
    # conformers scored on molecules outside the pre-training data
    conf = json.loads((tmp_path / "confgen" / "confgen.json").read_text())
    assert conf["scores"]["etkdg"]["molecules"] == 4 and conf["scores"]["flexmol"]["molecules"] == 4
    seen = {r.id for r in qm9_rows[:60]}
    assert not seen & {m["id"] for m in conf["molecules"]}
