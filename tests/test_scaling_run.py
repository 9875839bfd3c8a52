"""Sweep specs, plans and runs: ``flexmol scaling plan|run`` on tiny real studies."""
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, child_env, nci_2d_dataset
from flexmol import config
from flexmol.cli import main
from flexmol.featurize import run_featurize


@pytest.fixture(scope="module")
def study_data(tmp_path_factory, qm9_rows, nci_smi):
    """Paired QM9 (240 molecules, shards of 40), NCI 2D (300, shards of 50) and a probe CSV of real
    NCI molecules labelled by RDKit (has a ring nitrogen)."""
    from rdkit import Chem

    base = tmp_path_factory.mktemp("scaling")
    qm9 = base / "qm9"
    run_featurize(config.build(config.FeaturizeConfig, {
        "source": "qm9", "out": str(qm9), "modality": "paired", "limit": 240,
        "job": {"executor": "serial", "shard_size": 40, "progress": False}}), log=lambda m: None)
    nci = nci_2d_dataset(base, nci_smi, 300)
    probe = base / "probe.csv"
    rows = []
    for line in open(nci_smi):
        smi = line.split()[0]
        mol = Chem.MolFromSmiles(smi)
        if mol is None or "." in smi:
            continue
        rows.append((smi, int(mol.HasSubstructMatch(Chem.MolFromSmarts("[n,N;R]")))))
        if len(rows) == 120:
            break
    with open(probe, "w") as f:
        f.write("smiles,ring_n\n" + "".join(f"{s},{y}\n" for s, y in rows))
    return {"qm9": qm9, "nci": nci, "probe": probe}


def _spec(path: Path, data, **changes) -> Path:
    spec = {
        "name": "tiny-ladder",
        "data": {"paired": [str(data["qm9"])]},
        "heldout": {"shards": 1, "max_molecules": 40, "loss": ["paired/total"]},
        "models": {"base": "tiny", "rungs": {"a": {"dim": 16, "heads": 2, "layers": 1, "num_kernels": 8},
                                             "b": {"dim": 32, "heads": 4, "layers": 1, "num_kernels": 8}}},
        "budgets": [60, 120],
        "seeds": [0],
        "train": {"max_atoms": 128},
        "probe": {"data": str(data["probe"]), "targets": ["ring_n"], "split": "random", "seeds": [0]},
        "run": {"parallel": 2, "cpus_per_run": 1},
    }
    for key, value in changes.items():
        node = spec
        *head, last = key.split(".")
        for k in head:
            node = node.setdefault(k, {})
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    path.write_text(yaml.safe_dump(spec))
    return path


def test_plan_prints_every_run_with_parameters_budget_steps_and_measured_flops(study_data, tmp_path, capsys):
    from flexmol.model.summary import model_config, parameter_count

    spec = _spec(tmp_path / "spec.yaml", study_data)
    assert main(["scaling", "plan", str(spec)]) == 0
    out = capsys.readouterr().out
    for rung, keys in (("a", ["dim=16", "heads=2", "layers=1", "num_kernels=8"]),
                       ("b", ["dim=32", "heads=4", "layers=1", "num_kernels=8"])):
        params = parameter_count(model_config("tiny", keys))
        assert f"{params:,} parameters" in out
        for budget in (60, 120):
            line = next(l for l in out.splitlines() if l.strip().startswith(f"{rung}-b{budget}-s0 "))
            fields = line.split()
            assert fields[1] == f"{params:,}" and fields[2] == f"{budget:,}" and fields[3] == str(budget)
            assert float(fields[5]) > 0  # the FLOPs estimate
    flops = {l.split()[0]: float(l.split()[5]) for l in out.splitlines() if l.strip().startswith(("a-", "b-"))}
    assert flops["b-b60-s0"] > flops["a-b60-s0"]  # a wider model costs more per molecule
    assert flops["a-b120-s0"] == pytest.approx(2 * flops["a-b60-s0"], rel=0.05)  # twice the molecules


@pytest.mark.parametrize("changes, key", [
    ({"budgets": [60, 100000]}, "budgets"),  # more unique molecules than the training shards hold
    ({"models.rungs.a": {"dim": 30, "heads": 4}}, "models.rungs.a"),  # width not divisible by heads
    ({"budgets": [60], "paired_size": 10}, "budgets"),  # two kinds of study in one spec
    ({"heldout.loss": ["single_2d/total"]}, "heldout.loss"),  # a source the study does not have
    ({"heldout.shards": 6}, "heldout.shards"),  # nothing left to train on
    ({"probe.metric": "rmse"}, "probe.metric"),  # a regression metric for a classification probe
    ({"passes": 0}, "passes"),
    ({"train.overrides": {"train.grad_accum": 4}}, "train.overrides.train.grad_accum"),  # would multiply the budget
    ({"train.overrides": {"recipe": "m2umol"}}, "train.overrides.recipe"),  # FLOP models and losses are FlexMol's
    ({"heldout.loss": ["paired/atom", "paired/atom"]}, "heldout.loss"),  # counted twice in val_loss
    ({"probe.split": "bogus"}, "probe.split"),
    ({"probe.targets": []}, "probe.targets"),
    ({"train.decay": "bogus"}, "train.decay"),
    ({"train.max_atoms": 5}, "train.max_atoms"),  # smaller than the data's molecules
    ({"budgets": None, "paired_size": 40, "ratios": [1], "schedules": ["mixed", "mixed"],
      "data.single_2d": ["-"]}, "schedules"),
])
def test_plan_refuses_an_axis_that_cannot_be_honoured_naming_the_key(study_data, tmp_path, capsys, changes, key):
    spec = _spec(tmp_path / "spec.yaml", study_data, **changes)
    assert main(["scaling", "plan", str(spec), "--no-flops"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flexmol scaling plan:") and f"'{key}'" in err and len(err.splitlines()) == 1


def test_runs_train_nested_subsets_with_a_schedule_scaled_to_their_length(study_data, tmp_path):
    from flexmol.scaling.runner import phase_config
    from flexmol.scaling.spec import load_spec, plan

    spec = load_spec(_spec(tmp_path / "spec.yaml", study_data, passes=2, **{"train.warmup_fraction": 0.2}))
    runs = {r.name: r for r in plan(spec)}
    small, large = phase_config(spec, runs["a-b60-s0"], 0, tmp_path), phase_config(spec, runs["a-b120-s0"], 0, tmp_path)
    assert small["data"]["subset"] == {"paired": 30} and large["data"]["subset"] == {"paired": 60}  # budget / passes
    assert small["data"]["subset_seed"] == large["data"]["subset_seed"]  # one permutation: 30 are among the 60
    for cfg in (small, large):
        assert cfg["train"]["warmup_steps"] == round(0.2 * cfg["train"]["max_steps"])
    assert large["train"]["max_steps"] == pytest.approx(2 * small["train"]["max_steps"], abs=1)
    other = phase_config(spec, runs["b-b60-s0"], 0, tmp_path)  # the same data order for every model size
    assert {k: v for k, v in other["data"].items()} == small["data"] and other["train"]["seed"] == small["train"]["seed"]


def test_paired_versus_single_plan_two_phase_and_mixed_see_the_same_molecules(study_data, tmp_path):
    from flexmol.scaling.runner import phase_config
    from flexmol.scaling.spec import load_spec, plan

    spec = load_spec(_spec(tmp_path / "spec.yaml", study_data, budgets=None, paired_size=40, ratios=[0, 2],
                           schedules=["mixed", "two_phase"], **{"data.single_2d": [str(study_data["nci"])]}))
    runs = {r.name: r for r in plan(spec)}
    assert sorted(runs) == ["a-mixed-r2-s0", "a-paired_only-r0-s0", "a-two_phase-r2-s0", "b-mixed-r2-s0",
                            "b-paired_only-r0-s0", "b-two_phase-r2-s0"]
    mixed, two = runs["a-mixed-r2-s0"], runs["a-two_phase-r2-s0"]
    assert [p.stage for p in mixed.phases] == [1] and [p.stage for p in two.phases] == [1, 2]
    assert mixed.phases[0].molecules == {"paired": 40, "single_2d": 80}
    assert [p.molecules for p in two.phases] == [{"paired": 40}, {"single_2d": 80}]
    second = phase_config(spec, two, 1, tmp_path)
    assert second["stage"] == 2 and second["init_from"].endswith("a-two_phase-r2-s0/phase1/export")


def _rows(path: Path) -> dict[str, dict]:
    with open(path) as f:
        return {r["run"]: r for r in csv.DictReader(f)}


def test_a_sweep_runs_every_run_and_a_second_call_repeats_none(study_data, tmp_path, capsys, monkeypatch):
    spec = _spec(tmp_path / "spec.yaml", study_data)
    out = tmp_path / "study"
    # the rendezvous of a process that ran a training itself (or of a launcher): runs side by side must not share it
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29533")
    assert main(["scaling", "run", str(spec), "--out", str(out)]) == 0
    rows = _rows(out / "runs.csv")
    assert sorted(rows) == ["a-b120-s0", "a-b60-s0", "b-b120-s0", "b-b60-s0"]
    for name, r in rows.items():
        assert r["status"] == "done"
        assert int(r["molecules"]) >= int(r["budget"]) * 0.8 and int(r["unique_molecules"]) <= int(r["budget"])
        assert float(r["flops"]) > 0 and float(r["flops_padded"]) >= float(r["flops"])
        assert float(r["val_loss"]) == pytest.approx(float(r["val/paired/total"]))
        assert {"val/paired/contrastive", "val/paired/coord", "val/paired/atom"} <= set(r)
        assert 0 <= float(r["probe_probe_roc_auc"]) <= 1
        assert 0 < float(r["train_seconds"]) < float(r["wall_seconds"])
    # measured compute follows the molecules and the model
    assert float(rows["a-b120-s0"]["flops"]) > 1.5 * float(rows["a-b60-s0"]["flops"])
    assert float(rows["b-b60-s0"]["flops"]) > float(rows["a-b60-s0"]["flops"])
    results = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/result.json")}
    capsys.readouterr()
    assert main(["scaling", "run", str(spec), "--out", str(out)]) == 0
    assert "4 done before, 0 to run" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/result.json")} == results
    # --only runs a part of the study; the table keeps every run
    assert main(["scaling", "run", str(spec), "--out", str(out), "--only", "a-b60-s0"]) == 0
    assert "1 done before, 0 to run" in capsys.readouterr().out and len(_rows(out / "runs.csv")) == 4
    # a new yardstick (val_loss from other held-out losses) re-evaluates the exports, trains nothing again
    exports = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/phase1/export/model.safetensors")}
    spec = _spec(tmp_path / "spec.yaml", study_data, **{"heldout.loss": ["paired/atom", "paired/contrastive"]})
    assert main(["scaling", "run", str(spec), "--out", str(out)]) == 0
    assert "0 done before, 4 to run" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/phase1/export/model.safetensors")} == exports
    for name, r in _rows(out / "runs.csv").items():
        assert float(r["val_loss"]) == pytest.approx(float(r["val/paired/atom"]) + float(r["val/paired/contrastive"]))
        assert float(r["val/paired/total"]) == pytest.approx(float(rows[name]["val/paired/total"]))
        log = (out / "runs" / name / "phase1" / "log.txt").read_text()
        assert log.count("flexmol.train.cli") == 1  # trained once


def test_a_changed_run_definition_is_refused_in_a_used_study_directory(study_data, tmp_path, capsys):
    from flexmol.scaling.spec import load_spec, plan

    out = tmp_path / "study"
    spec = _spec(tmp_path / "spec.yaml", study_data, budgets=[60], **{"models.rungs": {"a": {"dim": 16, "heads": 2}}})
    (run,) = plan(load_spec(spec))
    before = load_spec(_spec(tmp_path / "before.yaml", study_data, budgets=[60],
                             **{"models.rungs": {"a": {"dim": 16, "heads": 2}}, "train.lr": 1e-3}))
    (out / "runs" / run.name).mkdir(parents=True)
    (out / "runs" / run.name / "run.json").write_text(json.dumps({"digest": run.digest(before),
                                                                    "definition": run.definition(before)}))
    assert main(["scaling", "run", str(spec), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "a-b60-s0" in err and "changed: train" in err and "another --out" in err
    assert not (out / "study.json").exists()  # refused before anything was written
    (out / "runs" / run.name / "run.json").write_text("{not json")
    assert main(["scaling", "run", str(spec), "--out", str(out)]) == 2
    assert "run.json: not a run definition" in capsys.readouterr().err


def test_a_killed_sweep_resumes_its_unfinished_runs_from_their_checkpoints(study_data, tmp_path):
    """The sweep's process is killed (SIGKILL) while a run trains; the next call finishes it from
    its checkpoint (finished runs are never repeated: the test above)."""
    spec = _spec(tmp_path / "spec.yaml", study_data, budgets=[12000], passes=80,
                 **{"models.rungs": {"a": {"dim": 16, "heads": 2, "layers": 1}}, "run.parallel": 1})
    out = tmp_path / "study"
    # the Ray job's entry point first, the CLI after: one code path
    job = [sys.executable, str(REPO / "ray_jobs" / "scaling.py"), str(spec), "--out", str(out)]
    cmd = [sys.executable, "-m", "flexmol.cli", "scaling", "run", str(spec), "--out", str(out)]
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(job, cwd=REPO, env=child_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    ckpt = out / "runs" / "a-b12000-s0" / "phase1" / "checkpoints" / "latest"
    deadline = time.time() + 300
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    assert ckpt.exists(), "the long run never checkpointed: " + (tmp_path / "first.log").read_text()[-2000:]
    os.killpg(proc.pid, signal.SIGKILL)  # the driver, its Ray and the training process: nothing closes cleanly
    proc.wait()
    result = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "0 done before, 1 to run" in result.stdout
    log = (out / "runs" / "a-b12000-s0" / "phase1" / "log.txt").read_text()
    assert "[pretrain] resumed from" in log
    steps = [json.loads(l)["step"] for l in open(out / "runs" / "a-b12000-s0" / "phase1" / "metrics.jsonl")
             if json.loads(l)["split"] == "train"]
    assert steps == sorted(set(steps))  # each logged step once across the kill
    assert _rows(out / "runs.csv")["a-b12000-s0"]["status"] == "done"


def test_a_paired_versus_single_study_runs_mixed_and_two_phase_schedules(study_data, tmp_path, capsys):
    spec = _spec(tmp_path / "spec.yaml", study_data, budgets=None, paired_size=40, ratios=[0, 2], passes=2,
                 schedules=["mixed", "two_phase"], probe=None,
                 **{"data.single_2d": [str(study_data["nci"])], "models.rungs": {"a": {"dim": 16, "heads": 2}},
                    "heldout.loss": ["paired/total", "single_2d/atom"]})
    out = tmp_path / "study"
    # one run cannot train (a checkpoint tag whose files are missing): reported with its log, the others finish
    broken = out / "runs" / "a-paired_only-r0-s0" / "phase1" / "checkpoints"
    broken.mkdir(parents=True)
    (broken / "latest").write_text("step-00000009")
    assert main(["scaling", "run", str(spec), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "a-paired_only-r0-s0 FAILED" in err and "log.txt" in err
    rows = _rows(out / "runs.csv")
    assert rows["a-paired_only-r0-s0"]["status"] == "failed" and rows["a-paired_only-r0-s0"]["error"]
    assert rows["a-mixed-r2-s0"]["status"] == rows["a-two_phase-r2-s0"]["status"] == "done"
    (broken / "latest").unlink()  # the same command retries it, and only it
    assert main(["scaling", "run", str(spec), "--out", str(out)]) == 0
    assert "2 done before, 1 to run" in capsys.readouterr().out
    rows = _rows(out / "runs.csv")
    assert sorted(rows) == ["a-mixed-r2-s0", "a-paired_only-r0-s0", "a-two_phase-r2-s0"]
    assert all(r["status"] == "done" for r in rows.values())
    base, mixed, two = rows["a-paired_only-r0-s0"], rows["a-mixed-r2-s0"], rows["a-two_phase-r2-s0"]
    assert base["molecules_single_2d"] == "0" and base["unique_single_2d"] == "0"
    assert int(two["molecules_paired"]) > 0 and int(two["molecules_single_2d"]) > 0
    assert 0 < int(two["unique_single_2d"]) <= 160 and 0 < int(mixed["unique_single_2d"]) <= 160
    for r in rows.values():  # every run scored on both held-out sets, by one yardstick
        assert float(r["val_loss"]) == pytest.approx(float(r["val/paired/total"]) + float(r["val/single_2d/atom"]))
    # the second phase: stage 2 from the first phase's export
    second = yaml.safe_load((out / "runs" / "a-two_phase-r2-s0" / "phase2" / "pretrain.yaml").read_text())
    assert second["stage"] == 2 and second["init_from"] == str(out.resolve() / "runs" / "a-two_phase-r2-s0" / "phase1" / "export")
    assert "weights from" in (out / "runs" / "a-two_phase-r2-s0" / "phase2" / "log.txt").read_text()
    assert len(list((out / "flops").glob("*.json"))) == 2  # the FLOP models of stages 1 and 2
    assert float(two["flops"]) > float(base["flops"]) > 0


def test_multi_gpu_runs_go_through_the_deepspeed_launcher_on_the_gpus_ray_gave_them(tmp_path):
    from flexmol.scaling.runner import RunFailed, train_command

    cfg = tmp_path / "pretrain.yaml"
    assert train_command(1, cfg)[1:3] == ["-m", "flexmol.train.cli"]
    cmd = train_command(2, cfg, env={"CUDA_VISIBLE_DEVICES": "3,5"})
    assert cmd[:3] == [sys.executable, "-m", "deepspeed.launcher.runner"]
    assert cmd[cmd.index("--include") + 1] == "localhost:3,5" and int(cmd[cmd.index("--master_port") + 1]) > 0
    assert cmd[-3:] == [str(REPO / "launch" / "pretrain.py"), "--config", str(cfg)]
    with pytest.raises(RunFailed, match="CUDA_VISIBLE_DEVICES"):
        train_command(2, cfg, env={"CUDA_VISIBLE_DEVICES": "0"})


def test_steps_are_per_global_batch_when_a_run_has_several_gpus(study_data, tmp_path):
    from flexmol.scaling.spec import load_spec, plan

    one = {r.name: r for r in plan(load_spec(_spec(tmp_path / "a.yaml", study_data)))}
    two = {r.name: r for r in plan(load_spec(_spec(tmp_path / "b.yaml", study_data, **{"run.gpus_per_run": 2})))}
    for name, run in one.items():
        assert two[name].phases[0].steps == -(-run.phases[0].steps // 2) or \
            abs(two[name].phases[0].steps * 2 - run.phases[0].steps) <= 2
        assert two[name].digest(load_spec(tmp_path / "b.yaml")) != run.digest(load_spec(tmp_path / "a.yaml"))


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU to give")
def test_a_run_asking_for_gpus_a_local_ray_does_not_have_is_refused(study_data, tmp_path, capsys):
    spec = _spec(tmp_path / "spec.yaml", study_data, budgets=[60], probe=None,
                 **{"models.rungs": {"a": {"dim": 16, "heads": 2}}, "run.gpus_per_run": 1})
    assert main(["scaling", "run", str(spec), "--out", str(tmp_path / "study")]) == 2
    assert "GPU per run" in capsys.readouterr().err
    assert not list((tmp_path / "study").glob("runs/*/run.json"))  # the corrected spec can use the directory


def test_rows_scored_under_another_yardstick_are_marked_stale_in_the_table(study_data, tmp_path):
    from flexmol.scaling.runner import write_table
    from flexmol.scaling.spec import Run, load_spec, plan

    spec = load_spec(_spec(tmp_path / "spec.yaml", study_data))
    runs = plan(spec)
    other = load_spec(_spec(tmp_path / "other.yaml", study_data, **{"heldout.loss": ["paired/atom"]}))
    for run, yardstick in zip(runs[:2], (spec, other)):
        (tmp_path / "runs" / run.name).mkdir(parents=True)
        (tmp_path / "runs" / run.name / "result.json").write_text(json.dumps(
            {"run": run.name, "status": "done", "val_loss": 1.0, "digest": run.digest(spec),
             "evaluation_digest": Run.evaluation_digest(yardstick)}))
    rows = _rows(write_table(tmp_path, spec, runs))
    assert rows[runs[0].name]["status"] == "done" and rows[runs[1].name]["status"] == "stale"
