"""The DeepSpeed pre-training loop on CPU, on real QM9 paired shards with the tiny model."""
import json
import os

import pytest

from flexmol import config
from flexmol.featurize import run_featurize

from conftest import child_env, nci_2d_dataset

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
    assert [(r["seen"], r["unique"], r["passes"]) for r in first + second] == \
        [(r["seen"], r["unique"], r["passes"]) for r in straight]
    assert straight[-1]["loss/total"] < straight[0]["loss/total"]
    # the work counters (a run's compute, flexmol.scaling.flops) carry across the resume and sum the steps'
    assert [r["work"] for r in first + second] == [r["work"] for r in straight]
    work = straight[-1]["work"]["paired"]
    assert work["atoms"] == sum(r["atoms"] for r in straight) > 0
    assert work["padded_atoms"] > work["atoms"] and work["atom_pairs"] > work["atoms"]
    assert work["padded_pairs"] > work["atom_pairs"] and work["batch_pairs"] >= straight[-1]["seen"]["paired"]


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

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["split"] == "train"]


@pytest.mark.slow
def test_two_ranks_train_a_one_shard_dataset_resume_exactly_and_count_every_rank(qm9_one_shard, qm9_paired,
                                                                                tmp_path, monkeypatch):
    from flexmol.data.streams import dataset_urls

    stage1 = os.path.join(os.path.dirname(__file__), "..", "configs", "pretrain", "stage1.yaml")
    base = [f"data.paired=[{qm9_one_shard}]", "data.num_workers=1", "data.max_atoms=256", "train.warmup_steps=1",
            "train.max_steps=4", "train.log_every=1", "train.save_every=100", "deepspeed=configs/deepspeed/zero2.json",
            "validation.holdout_shards=0", "wandb.mode=disabled", f"validation.paired=[{qm9_paired}]",
            "validation.every=2", "validation.max_molecules=70", "validation.alignment_count=30"]
    _launch(stage1, base + [f"output_dir={tmp_path / 'a'}"], 29621)
    _launch(stage1, base + [f"output_dir={tmp_path / 'b'}", "train.stop_after=2"], 29622)
    _launch(stage1, base + [f"output_dir={tmp_path / 'b'}", "resume=auto"], 29623)
    straight, cut = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert [r["step"] for r in cut] == [1, 2, 3, 4]
    assert [r["loss/total"] for r in cut] == [r["loss/total"] for r in straight]
    # molecules and atoms are the sums of what each rank took (atom-budget batches differ by rank)
    urls = dataset_urls([str(qm9_one_shard)])
    per_rank = [_rank_stream(urls, r, monkeypatch, max_atoms=256, seed=0, shuffle_buffer=1000) for r in (0, 1)]
    sizes = [[int(b["mask"].shape[0]) for b in batches] for batches in per_rank]
    atoms = [[int(b["num_atoms"].sum()) for b in batches] for batches in per_rank]
    assert atoms[0] != atoms[1]  # so one rank's count times two would differ from the sum
    assert [r["molecules"]["paired"] for r in straight] == [a + b for a, b in zip(*sizes)]
    assert [r["atoms"] for r in straight] == [a + b for a, b in zip(*atoms)]
    assert straight[-1]["seen"]["paired"] == sum(sizes[0]) + sum(sizes[1])
    # unique molecules: the union of what both ranks drew, merged when logged and checkpointed
    drawn = [set().union(*(b["records"].tolist() for b in batches)) for batches in per_rank]
    assert straight[-1]["unique"]["paired"] == len(drawn[0] | drawn[1]) > max(len(drawn[0]), len(drawn[1]))
    assert [(r["unique"], r["passes"]) for r in cut] == [(r["unique"], r["passes"]) for r in straight]
    # validation at two ranks: both ranks' held-out batches, the same figures as one process
    records = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    valid = [r for r in records if r["split"] == "valid"]
    assert [r["step"] for r in valid] == [2, 4] and all(r["valid/paired/molecules"] == 70 for r in valid)
    assert [r["split"] for r in records].count("alignment") == 1
    from flexmol.train import config as tc
    from flexmol.train.trainer import Pretrainer

    one = Pretrainer(tc.load(stage1, [f"data.paired=[{qm9_one_shard}]", f"validation.paired=[{qm9_paired}]",
                                      "validation.max_molecules=70", "data.max_atoms=256", "wandb.mode=disabled",
                                      f"init_from={tmp_path / 'a'}", f"output_dir={tmp_path / 'one'}"]))
    single = one.validate()
    assert single["valid/paired/total"] == pytest.approx(valid[-1]["valid/paired/total"], rel=1e-5)


@pytest.mark.slow
def test_a_stop_signal_to_one_rank_stops_every_rank_at_the_same_checkpointed_step(qm9_one_shard, tmp_path):
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "sig"
    cmd = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", "2", "--master_port", "29624",
           str(repo / "launch" / "pretrain.py"), "--config", STAGE[1], f"data.paired=[{qm9_one_shard}]",
           "data.num_workers=0", "data.max_atoms=256", "train.max_steps=100000", "train.log_every=1",
           "train.save_every=100000", "validation.holdout_shards=0", "wandb.mode=disabled", f"output_dir={out}"]
    proc = subprocess.Popen(cmd, cwd=repo, env=child_env(OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.2)

    def cmdline(p):
        try:
            return (p / "cmdline").read_bytes()
        except OSError:
            return b""

    ranks = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()
             and str(out).encode() in cmdline(p) and b"--local_rank=1" in cmdline(p)]
    assert len(ranks) == 1, ranks
    os.kill(ranks[0], signal.SIGTERM)  # rank 1 only
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log[-3000:]
    last = json.loads(metrics.read_text().splitlines()[-1])["step"]
    tag = (out / "checkpoints" / "latest").read_text().strip()
    assert tag == f"step-{last:08d}"
    saved = sorted(p.name for p in (out / "checkpoints" / tag).iterdir())
    assert any("rank_0" in n for n in saved) and any("rank_1" in n for n in saved), saved


@pytest.mark.slow
def test_a_bad_record_read_by_one_rank_stops_every_rank_with_the_same_line(qm9_one_shard, tmp_path):
    """Two ranks share the one shard by position (rank 1 keeps the odd records): a record of rank
    1's share that does not decode stops both ranks before the step's collectives, each with the
    same line, and the launcher with exit status 2."""
    import shutil
    import subprocess
    import sys
    import tarfile
    from pathlib import Path

    data = Path(shutil.copytree(qm9_one_shard, tmp_path / "data"))
    shard = data / "shard-000000.tar"
    with tarfile.open(shard) as tar:
        member = [m for m in tar.getmembers() if m.isfile()][5]
    with open(shard, "r+b") as f:
        f.seek(member.offset_data)
        f.write(b"\xc1\xc1\xc1\xc1")
    key = member.name.partition(".")[0]
    repo = Path(__file__).resolve().parents[1]
    cmd = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", "2", "--master_port", "29625",
           str(repo / "launch" / "pretrain.py"), "--config", STAGE[1], f"data.paired=[{data}]",
           "data.verify_checksums=false", "data.shuffle_buffer=0", "data.num_workers=0", "data.max_atoms=256",
           "train.max_steps=4", "validation.holdout_shards=0", "wandb.mode=disabled", f"output_dir={tmp_path / 'o'}"]
    proc = subprocess.run(cmd, cwd=repo, env=child_env(OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 2, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    # one per rank, the same (rank 0's progress bar may share its line)
    lines = [line[line.index("flexmol pretrain: "):] for line in log.splitlines() if "flexmol pretrain: " in line]
    assert len(lines) == 2 and lines[0] == lines[1], log[-3000:]
    assert f"shard shard-000000.tar: record {key}: " in lines[0] and "(stopped in step 1, read by rank 1)" in lines[0]


@pytest.mark.slow
def test_stage_one_exports_and_stage_two_continues_on_2d_mixed_with_paired(qm9_paired, nci_smi, tmp_path):
    import math

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
    assert all(math.isfinite(r["loss/total"]) for r in history)


def test_start_up_errors_name_the_problem(qm9_paired, tmp_path):
    from flexmol.config import ConfigError
    from flexmol.train import config as tc
    from flexmol.train.trainer import Pretrainer

    stage1 = os.path.join(os.path.dirname(__file__), "..", "configs", "pretrain", "stage1.yaml")
    with pytest.raises(ConfigError, match="not a finished dataset"):
        Pretrainer(tc.load(stage1, [f"data.paired=[{tmp_path}]", f"output_dir={tmp_path / 'o'}"]))
    with pytest.raises(ConfigError, match="'validation.paired'.*not a finished dataset"):
        Pretrainer(tc.load(stage1, [f"data.paired=[{qm9_paired}]", f"validation.paired=[{tmp_path}]",
                                    f"output_dir={tmp_path / 'o'}"]))
    with pytest.raises(ConfigError, match="'validation.paired'.*also in data.paired"):
        Pretrainer(tc.load(stage1, [f"data.paired=[{qm9_paired}]", f"validation.paired=[{qm9_paired}]",
                                    f"output_dir={tmp_path / 'o'}"]))
    with pytest.raises(ConfigError, match="'data.single_2d'.*holds paired data"):
        Pretrainer(tc.load(stage1, [f"data.paired=[{qm9_paired}]", f"data.single_2d=[{qm9_paired}]",
                                    f"output_dir={tmp_path / 'o'}"]))


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
    assert [r["step"] for r in _losses(out)] == [1, 2]


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


STAGE = {n: os.path.join(os.path.dirname(__file__), "..", "configs", "pretrain", f"stage{n}.yaml") for n in (1, 2)}
SMALL = ["data.num_workers=0", "data.max_atoms=256", "train.warmup_steps=1", "train.log_every=1", "wandb.mode=disabled",
         "validation.alignment_count=0"]


@pytest.fixture(scope="module")
def qm9_3d(tmp_path_factory, qm9_rows):
    out = tmp_path_factory.mktemp("pretrain") / "qm9_3d"
    run_featurize(config.build(config.FeaturizeConfig, {
        "source": "qm9", "out": str(out), "modality": "3d", "limit": 120,
        "job": {"executor": "serial", "shard_size": 40, "progress": False}}), log=lambda m: None)
    return out


@pytest.fixture(scope="module")
def nci_2d(tmp_path_factory, nci_smi):
    return nci_2d_dataset(tmp_path_factory.mktemp("pretrain"), nci_smi, 200)


def _state(path):
    from safetensors.torch import load_file

    return load_file(path / "export" / "model.safetensors")


@pytest.mark.slow
def test_main_job_stage_two_starts_from_stage_one_weights(qm9_paired, nci_2d, tmp_path):
    """The main job passes resume=auto to both stages: with no checkpoint yet, init_from applies."""
    import torch

    from flexmol import demo
    from flexmol.train import config as tc
    from flexmol.train.trainer import Pretrainer

    out = tmp_path / "demo"
    (out / "shards").mkdir(parents=True)
    (out / "shards" / "qm9_paired").symlink_to(qm9_paired)
    (out / "shards" / "moses_2d").symlink_to(nci_2d)
    stages = demo.pretrain_stages(out, demo.DemoConfig(out=str(out), stage1_steps=2, stage2_steps=2))
    (name1, dir1, over1), (name2, dir2, over2) = stages
    assert "resume=auto" in over1 and "resume=auto" in over2
    Pretrainer(tc.load(STAGE[1], over1 + SMALL + ["train.seed=1"])).run()  # not stage 2's initialisation
    over2 = over2 + ["train.lr=1e-7"]
    stage2 = Pretrainer(tc.load(STAGE[2], over2 + SMALL))
    start = stage2.engine.module.state_dict()
    stage1 = _state(dir1)
    assert stage1.keys() == start.keys()
    assert all(torch.equal(start[k], stage1[k]) for k in stage1)
    stage2.run()
    # the optimizer steps from stage 1's weights, not from copies made before they were loaded:
    # at a tiny learning rate the trained weights stay next to stage 1's
    final = _state(dir2)
    assert any(not torch.equal(final[k], stage1[k]) for k in final)
    assert max(float((final[k] - stage1[k]).abs().max()) for k in final) < 1e-4
    # a rerun resumes stage 2's own checkpoint rather than starting again from stage 1
    again = Pretrainer(tc.load(STAGE[2], over2 + SMALL))
    assert again.step == 2
    assert all(torch.equal(again.engine.module.state_dict()[k], final[k]) for k in final)


@pytest.mark.slow
@pytest.mark.parametrize("zero", [1, 2, 3])
def test_feature_learners_stay_bit_identical_through_stage_two(qm9_paired, qm9_3d, nci_2d, tmp_path, zero):
    import torch

    from flexmol.train import config as tc
    from flexmol.train.trainer import Pretrainer

    ds = f"deepspeed={os.path.join(os.path.dirname(__file__), '..', 'configs', 'deepspeed', f'zero{zero}.json')}"
    Pretrainer(tc.load(STAGE[1], SMALL + [ds, f"data.paired=[{qm9_paired}]", "train.max_steps=2",
                                          f"output_dir={tmp_path / 's1'}"])).run()
    s2 = Pretrainer(tc.load(STAGE[2], SMALL + [
        ds, f"data.paired=[{qm9_paired}]", f"data.single_2d=[{nci_2d}]", f"data.single_3d=[{qm9_3d}]",
        f"init_from={tmp_path / 's1'}", "train.max_steps=9", "train.lr=1e-2", "train.weight_decay=0.5",
        "data.mix=[{step: 0, weights: {paired: 1.0, single_2d: 1.0, single_3d: 1.0}}]", f"output_dir={tmp_path / 's2'}"]))
    history = s2.run()
    assert {k for r in history for k in r["molecules"]} == {"paired", "single_2d", "single_3d"}
    before, after = _state(tmp_path / "s1"), _state(tmp_path / "s2")
    fl = [k for k in before if k.startswith(("fl_2d.", "fl_3d."))]
    assert fl and all(torch.equal(before[k], after[k]) for k in fl)
    assert sum(not torch.equal(before[k], after[k]) for k in before if k not in fl) > len(before) // 2


@pytest.mark.slow
def test_validation_runs_every_n_steps_on_held_out_shards_and_alignment_at_the_end(qm9_paired, tmp_path):
    import math

    from pathlib import Path

    from flexmol.data.shards import read_shard
    from flexmol.train import config as tc
    from flexmol.train.trainer import Pretrainer

    out = tmp_path / "v"
    trainer = Pretrainer(tc.load(STAGE[1], SMALL + [
        f"data.paired=[{qm9_paired}]", "train.max_steps=4", "validation.every=2", "validation.alignment_count=40",
        f"output_dir={out}"]))
    held = trainer.valid_urls["paired"]
    assert len(held) == 1 and held[0] not in trainer.stream.sources["paired"].urls
    trainer.run()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    valid = [r for r in records if r["split"] == "valid"]
    assert [r["step"] for r in valid] == [2, 4]
    names = {"total", "contrastive", "consistency", "alignment", "atom", "coord", "spd", "dist"}
    for r in valid:
        assert {f"valid/paired/{k}" for k in names} <= set(r)
        assert all(math.isfinite(r[f"valid/paired/{k}"]) for k in names)
        assert r["valid/paired/molecules"] == len(list(read_shard(Path(held[0]))))  # the held-out shard, all of it
    assert valid[0]["valid/paired/total"] != valid[1]["valid/paired/total"]
    align = [r for r in records if r["split"] == "alignment"]
    assert len(align) == 1 and align[0]["step"] == 4
    report = json.loads((out / "alignment.json").read_text())
    assert report and any("top1" in k for k in align[0])


@pytest.fixture(scope="module")
def qm9_one_shard(tmp_path_factory, qm9_rows):
    """200 QM9 molecules featurised with the default shard size: a single shard."""
    out = tmp_path_factory.mktemp("pretrain") / "qm9_one"
    run_featurize(config.build(config.FeaturizeConfig, {
        "source": "qm9", "out": str(out), "modality": "paired", "limit": 200,
        "job": {"executor": "serial", "progress": False}}), log=lambda m: None)
    return out


def _rank_stream(urls, rank, monkeypatch, steps=4, **kw):
    """What rank ``rank`` of 2 draws (loader worker 0), replayed in this process."""
    from flexmol.data.streams import SourceStream

    with monkeypatch.context() as m:
        m.setenv("RANK", str(rank))
        m.setenv("WORLD_SIZE", "2")
        s = SourceStream("paired", urls, num_workers=0, **kw)
        return [next(s) for _ in range(steps)]


@pytest.mark.slow
def test_stage_two_starts_from_an_unfinished_stage_one_checkpoint(qm9_paired, nci_2d, tmp_path):
    """A stage 1 stopped before its end has no export: stage 2 takes its latest checkpoint's weights."""
    import torch

    from flexmol.train import config as tc
    from flexmol.train.trainer import Pretrainer

    s1 = Pretrainer(tc.load(STAGE[1], SMALL + [f"data.paired=[{qm9_paired}]", "train.max_steps=5", "train.seed=1",
                                               f"output_dir={tmp_path / 's1'}"]))
    s1.run(stop_after=2)
    assert not (tmp_path / "s1" / "export").exists()
    weights = {k: v.clone() for k, v in s1.engine.module.state_dict().items()}
    s2 = Pretrainer(tc.load(STAGE[2], SMALL + [f"data.paired=[{qm9_paired}]", f"data.single_2d=[{nci_2d}]",
                                               f"init_from={tmp_path / 's1'}", f"output_dir={tmp_path / 's2'}"]))
    start = s2.engine.module.state_dict()
    assert all(torch.equal(start[k], weights[k]) for k in weights)


@pytest.mark.slow
def test_a_run_cut_while_closing_closes_on_resume_and_a_finished_run_does_nothing(qm9_paired, tmp_path, monkeypatch):
    from flexmol.train import config as tc
    from flexmol.train.trainer import Pretrainer

    overrides = SMALL[:-1] + [f"data.paired=[{qm9_paired}]", "train.max_steps=2", "validation.alignment_count=20",
                              f"output_dir={tmp_path / 'r'}", "resume=auto"]

    def killed(self, directory=None):
        raise KeyboardInterrupt("killed while exporting")

    with monkeypatch.context() as m:
        m.setattr(Pretrainer, "export", killed)
        with pytest.raises(KeyboardInterrupt):
            Pretrainer(tc.load(STAGE[1], overrides)).run()
    assert (tmp_path / "r" / "checkpoints" / "latest").read_text().strip() == "step-00000002"
    assert not (tmp_path / "r" / "export").exists()
    again = Pretrainer(tc.load(STAGE[1], overrides))
    assert again.step == 2 and again.run() == []
    export = tmp_path / "r" / "export" / "model.safetensors"
    assert export.is_file() and (tmp_path / "r" / "alignment.json").is_file()
    stamp = export.stat().st_mtime_ns
    lines = (tmp_path / "r" / "metrics.jsonl").read_text()
    assert Pretrainer(tc.load(STAGE[1], overrides)).run() == []
    assert export.stat().st_mtime_ns == stamp and (tmp_path / "r" / "metrics.jsonl").read_text() == lines


def _records(out, split="train"):
    return [r for r in (json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines())
            if r["split"] == split]


@pytest.mark.slow
def test_a_run_stopped_at_an_odd_step_with_two_loader_workers_resumes_exactly(qm9_paired, tmp_path):
    """3 batches taken by 2 workers: the resumed loader's first batch must be worker 1's."""
    from flexmol.train import config as tc
    from flexmol.train.trainer import Pretrainer

    base = SMALL + [f"data.paired=[{qm9_paired}]", "data.num_workers=2", "train.max_steps=6", "train.save_every=100"]
    straight = Pretrainer(tc.load(STAGE[1], base + [f"output_dir={tmp_path / 'a'}"])).run()
    first = Pretrainer(tc.load(STAGE[1], base + [f"output_dir={tmp_path / 'b'}", "train.stop_after=3"])).run()
    second = Pretrainer(tc.load(STAGE[1], base + [f"output_dir={tmp_path / 'b'}", "resume=auto"])).run()
    assert [r["step"] for r in first + second] == [1, 2, 3, 4, 5, 6]
    assert [r["molecules"] for r in first + second] == [r["molecules"] for r in straight]
    assert [r["loss/total"] for r in first + second] == [r["loss/total"] for r in straight]


@pytest.mark.slow
def test_metrics_hold_each_step_once_after_a_kill_between_checkpoints(qm9_paired, tmp_path, monkeypatch):
    from flexmol.train import config as tc
    from flexmol.train.trainer import Pretrainer

    base = SMALL + [f"data.paired=[{qm9_paired}]", "train.max_steps=6", "train.save_every=2", "validation.every=2"]
    Pretrainer(tc.load(STAGE[1], base + [f"output_dir={tmp_path / 'a'}"])).run()
    log = Pretrainer._log

    def killed_after_step_5(self, record):
        log(self, record)
        if record["split"] == "train" and record["step"] == 5:
            raise KeyboardInterrupt("killed between the checkpoints of steps 4 and 6")

    cut = base + [f"output_dir={tmp_path / 'b'}", "resume=auto"]
    with monkeypatch.context() as m:
        m.setattr(Pretrainer, "_log", killed_after_step_5)
        with pytest.raises(KeyboardInterrupt):
            Pretrainer(tc.load(STAGE[1], cut)).run()
    assert (tmp_path / "b" / "checkpoints" / "latest").read_text().strip() == "step-00000004"
    assert [r["step"] for r in _records(tmp_path / "b")] == [1, 2, 3, 4, 5]
    Pretrainer(tc.load(STAGE[1], cut)).run()
    straight, resumed = _records(tmp_path / "a"), _records(tmp_path / "b")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    assert [r["loss/total"] for r in resumed] == [r["loss/total"] for r in straight]
    assert [r["step"] for r in _records(tmp_path / "b", "valid")] == [2, 4, 6]


@pytest.mark.slow
def test_a_run_stopped_by_a_signal_on_a_validation_step_validates_that_step_when_it_resumes(qm9_paired, tmp_path,
                                                                                          monkeypatch):
    import signal

    from flexmol.objectives import stages
    from flexmol.train import config as tc
    from flexmol.train import trainer as tr

    base = SMALL + [f"data.paired=[{qm9_paired}]", "train.max_steps=4", "train.save_every=100", "validation.every=2"]
    tr.Pretrainer(tc.load(STAGE[1], base + [f"output_dir={tmp_path / 'a'}"])).run()
    losses, steps = stages.pretraining_losses, []

    def signalled_in_step_2(model, *args, **kw):
        if model.training:
            steps.append(1)
            if len(steps) == 2:
                signal.raise_signal(signal.SIGTERM)  # the trainer's handler: stop after this step
        return losses(model, *args, **kw)

    cut = base + [f"output_dir={tmp_path / 'b'}", "resume=auto"]
    with monkeypatch.context() as m:
        m.setattr(stages, "pretraining_losses", signalled_in_step_2)
        assert [r["step"] for r in tr.Pretrainer(tc.load(STAGE[1], cut)).run()] == [1, 2]
    assert (tmp_path / "b" / "checkpoints" / "latest").read_text().strip() == "step-00000002"
    assert _records(tmp_path / "b", "valid") == []
    tr.Pretrainer(tc.load(STAGE[1], cut)).run()
    straight, resumed = _records(tmp_path / "a", "valid"), _records(tmp_path / "b", "valid")
    assert [r["step"] for r in resumed] == [2, 4]
    assert [r["valid/paired/total"] for r in resumed] == [r["valid/paired/total"] for r in straight]
    assert [r["step"] for r in _records(tmp_path / "b")] == [1, 2, 3, 4]


@pytest.mark.slow
def test_a_run_started_afresh_in_a_used_output_dir_sets_the_earlier_metrics_aside(qm9_paired, tmp_path):
    from flexmol.train import config as tc
    from flexmol.train.trainer import Pretrainer

    over = SMALL + [f"data.paired=[{qm9_paired}]", "train.max_steps=2", f"output_dir={tmp_path / 'r'}"]
    Pretrainer(tc.load(STAGE[1], over)).run()
    earlier = (tmp_path / "r" / "metrics.jsonl").read_text()
    Pretrainer(tc.load(STAGE[1], over + ["train.seed=3"])).run()  # resume=none: starts at step 0 again
    assert [r["step"] for r in _records(tmp_path / "r")] == [1, 2]
    aside = list((tmp_path / "r").glob("metrics.before-*.jsonl"))
    assert len(aside) == 1 and aside[0].read_text() == earlier


@pytest.mark.slow
def test_a_run_on_a_subset_logs_molecules_seen_unique_and_passes_exactly(qm9_paired, tmp_path):
    """data.subset.paired=20 of the 150 training molecules, 8 steps of about 10: every record's
    counts equal those of the stream replayed here, and no molecule outside the subset is drawn."""
    import numpy as np

    from flexmol.data.streams import SourceStream, permutation_rank
    from flexmol.train import config as tc
    from flexmol.train.trainer import Pretrainer

    base = SMALL + [f"data.paired=[{qm9_paired}]", "train.max_steps=8", "data.subset.paired=20",
                    "data.subset_seed=5", f"output_dir={tmp_path / 'a'}"]
    trainer = Pretrainer(tc.load(STAGE[1], base))
    urls = trainer.stream.sources["paired"].urls
    history = trainer.run()
    replay = SourceStream("paired", urls, max_atoms=256, seed=0, num_workers=0, subset=20, subset_seed=5)
    numbers = [next(replay)["records"].tolist() for _ in range(8)]
    seen = np.cumsum([len(n) for n in numbers]).tolist()
    unique = [len(set().union(*numbers[:i + 1])) for i in range(8)]
    assert [r["seen"]["paired"] for r in history] == seen
    assert [r["unique"]["paired"] for r in history] == unique and unique[-1] == 20 < seen[-1]
    assert [r["passes"]["paired"] for r in history] == [n / 20 for n in seen]
    ranks = permutation_rank(np.concatenate(numbers), 150, 5)
    assert (ranks < 20).all()


@pytest.mark.slow
def test_a_run_resumed_with_another_grad_accum_draws_its_sources_at_the_step_it_stands_at(qm9_paired, tmp_path):
    from flexmol.train import config as tc
    from flexmol.train.trainer import Pretrainer

    base = SMALL + [f"data.paired=[{qm9_paired}]", "data.num_workers=0", "train.max_steps=6", "train.save_every=100",
                    f"output_dir={tmp_path}"]
    Pretrainer(tc.load(STAGE[1], base + ["train.stop_after=2"])).run()
    resumed = Pretrainer(tc.load(STAGE[1], base + ["resume=auto", "train.grad_accum=3"]))
    assert resumed.step == 2
    assert resumed.stream.step == 2 * 3  # micro-batches: optimizer step 2, micro-batch 0
    assert divmod(resumed.stream.step, resumed.stream.grad_accum) == (2, 0)
