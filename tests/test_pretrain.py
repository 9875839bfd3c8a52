"""The DeepSpeed pre-training loop on CPU, on real QM9 paired shards with the tiny model."""
import os

import pytest

from flexmol import config
from flexmol.featurize import run_featurize

os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture(scope="module")
def qm9_paired(tmp_path_factory, qm9_rows):
    out = tmp_path_factory.mktemp("pretrain") / "qm9"
    cfg = config.build(config.FeaturizeConfig, {"source": "qm9", "out": str(out), "modality": "paired", "limit": 200,
                                                "job": {"executor": "serial", "shard_size": 50, "progress": False}})
    run_featurize(cfg, log=lambda m: None)
    return out


@pytest.mark.slow
def test_n_steps_resume_n_steps_equals_2n_steps_straight(qm9_paired, tmp_path):
    from flexmol.train import config as tc
    from flexmol.train.trainer import Pretrainer

    base = [f"data.paired=[{qm9_paired}]", "data.num_workers=0", "data.max_atoms=256", "train.warmup_steps=2",
            "train.max_steps=6", "train.log_every=1", "train.save_every=100"]
    stage1 = os.path.join(os.path.dirname(__file__), "..", "configs", "pretrain", "stage1.yaml")
    straight = Pretrainer(tc.load(stage1, base + [f"output_dir={tmp_path / 'a'}"])).run()
    first = Pretrainer(tc.load(stage1, base + [f"output_dir={tmp_path / 'b'}"])).run(stop_after=3)
    assert (tmp_path / "b" / "checkpoints" / "latest").read_text().strip() == "step-00000003"
    second = Pretrainer(tc.load(stage1, base + [f"output_dir={tmp_path / 'b'}", "resume=auto"])).run()
    assert [r["step"] for r in first + second] == [1, 2, 3, 4, 5, 6]
    assert [r["loss/total"] for r in first + second] == [r["loss/total"] for r in straight]
    assert [r["lr"] for r in first + second] == [r["lr"] for r in straight]
    assert straight[-1]["loss/total"] < straight[0]["loss/total"]


def _launch(config_path, overrides, port):
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    cmd = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", "2", "--master_port", str(port),
           str(repo / "launch" / "pretrain.py"), "--config", str(config_path), *overrides]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=repo)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _losses(out):
    import json

    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_rank_zero2_run_through_the_deepspeed_launcher_resumes_exactly(qm9_paired, tmp_path):
    stage1 = os.path.join(os.path.dirname(__file__), "..", "configs", "pretrain", "stage1.yaml")
    base = [f"data.paired=[{qm9_paired}]", "data.num_workers=1", "data.max_atoms=256", "train.warmup_steps=1",
            "train.max_steps=4", "train.log_every=1", "train.save_every=100", "deepspeed=configs/deepspeed/zero2.json"]
    _launch(stage1, base + [f"output_dir={tmp_path / 'a'}"], 29621)
    _launch(stage1, base + [f"output_dir={tmp_path / 'b'}", "train.stop_after=2"], 29622)
    _launch(stage1, base + [f"output_dir={tmp_path / 'b'}", "resume=auto"], 29623)
    straight, cut = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert [r["step"] for r in cut] == [1, 2, 3, 4]
    assert [r["loss/total"] for r in cut] == [r["loss/total"] for r in straight]
    assert all(r["molecules"]["paired"] > 0 for r in straight)
