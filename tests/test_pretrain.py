"""The DeepSpeed pre-training loop on CPU, on real QM9 paired shards with the tiny model."""
import json
import os

import pytest

from flexmol import config
from flexmol.featurize import run_featurize

from conftest import child_env

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
            "train.max_steps=6", "train.log_every=1", "train.save_every=100", "train.grad_accum=2"]
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
    env = child_env(OMP_NUM_THREADS="1")
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


@pytest.mark.slow
def test_stage_one_exports_and_stage_two_continues_on_2d_mixed_with_paired(qm9_paired, nci_smi, tmp_path):
    import torch

    import flexmol
    from flexmol.data.collate import collate
    from flexmol.data.shards import read_shard, shard_paths
    from flexmol.train import config as tc
    from flexmol.train.trainer import Pretrainer

    moses_like = tmp_path / "nci2d"
    run_featurize(config.build(config.FeaturizeConfig, {"source": str(nci_smi), "out": str(moses_like), "modality": "2d",
                                                        "limit": 200, "job": {"executor": "serial", "shard_size": 50,
                                                                              "progress": False}}), log=lambda m: None)
    cfgs = os.path.join(os.path.dirname(__file__), "..", "configs", "pretrain")
    common = ["data.num_workers=0", "data.max_atoms=256", "train.warmup_steps=1", "train.log_every=1"]
    Pretrainer(tc.load(os.path.join(cfgs, "stage1.yaml"), common + [
        f"data.paired=[{qm9_paired}]", "train.max_steps=3", f"output_dir={tmp_path / 's1'}"])).run()
    model = flexmol.load_pretrained(tmp_path / "s1" / "export")
    rec = next(read_shard(shard_paths(qm9_paired)[0]))
    assert model.embed(collate([rec])).shape == (1, model.cfg.dim)

    s2 = Pretrainer(tc.load(os.path.join(cfgs, "stage2.yaml"), common + [
        f"data.paired=[{qm9_paired}]", f"data.single_2d=[{moses_like}]", f"init_from={tmp_path / 's1'}",
        "train.max_steps=12", "data.mix=[{step: 0, weights: {paired: 0.5, single_2d: 0.5}}]",
        f"output_dir={tmp_path / 's2'}"]))
    start = {k: v.clone() for k, v in s2.engine.module.state_dict().items()}
    exported = flexmol.load_pretrained(tmp_path / "s1" / "export").state_dict()
    assert all(torch.equal(start[k], exported[k]) for k in exported)  # stage 2 starts from stage 1
    history = s2.run()
    seen = {k for r in history for k in r["molecules"]}
    assert seen == {"paired", "single_2d"}
    assert all(r["loss/total"] == r["loss/total"] for r in history)  # finite


def test_start_up_errors_name_the_problem(qm9_paired, tmp_path):
    from flexmol.config import ConfigError
    from flexmol.train import config as tc
    from flexmol.train.trainer import Pretrainer

    stage1 = os.path.join(os.path.dirname(__file__), "..", "configs", "pretrain", "stage1.yaml")
    with pytest.raises(ConfigError, match="not a finished dataset"):
        Pretrainer(tc.load(stage1, [f"data.paired=[{tmp_path}]", f"output_dir={tmp_path / 'o'}"]))
    with pytest.raises(ConfigError, match="need at least 8"):
        Pretrainer(tc.load(stage1, [f"data.paired=[{qm9_paired}]", "data.num_workers=8", f"output_dir={tmp_path / 'o'}"]))


@pytest.mark.slow
@pytest.mark.parametrize("zero", [1, 3])
def test_zero_stage_configs_train_resume_and_export(qm9_paired, tmp_path, zero):
    import subprocess
    import sys

    out = tmp_path / f"z{zero}"
    cmd = [sys.executable, "-m", "flexmol.cli", "pretrain", "--config", "configs/pretrain/stage1.yaml",
           f"data.paired=[{qm9_paired}]", "data.num_workers=0", "data.max_atoms=256", "train.max_steps=2",
           "train.log_every=1", f"deepspeed=configs/deepspeed/zero{zero}.json", f"output_dir={out}"]
    run = lambda *extra: subprocess.run(cmd + list(extra), capture_output=True, text=True, timeout=600,
                                        cwd=os.path.join(os.path.dirname(__file__), ".."),
                                        env=child_env())
    first = run("train.stop_after=1", "train.precision=bf16")
    assert first.returncode == 0, first.stderr[-3000:]
    second = run("resume=auto", "train.precision=bf16")  # loads the checkpoint with weights_only=True
    assert second.returncode == 0, second.stderr[-3000:]
    import flexmol
    flexmol.load_pretrained(out / "export")
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]


@pytest.mark.slow
def test_sigterm_checkpoints_the_current_step_and_exits(qm9_paired, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "term"
    proc = subprocess.Popen([sys.executable, "launch/pretrain.py", "--config", "configs/pretrain/stage1.yaml",
                             f"data.paired=[{qm9_paired}]", "data.num_workers=0", "data.max_atoms=256",
                             "train.max_steps=100000", "train.log_every=1", f"output_dir={out}"],
                            cwd=os.path.join(os.path.dirname(__file__), ".."), env=child_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    last = json.loads(metrics.read_text().splitlines()[-1])["step"]
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step-{last:08d}"
