"""Fine-tuning: splits, LoRA, input modes, labels and rejects, the protocol's results and resume,
the arms beside the LoRA model (full fine-tuning from the checkpoint, linear probes)."""
import contextlib
import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from rdkit import Chem
from rdkit.Chem import Crippen

from conftest import nci_molecules

from flexmol import save_pretrained
from flexmol.chem.scaffold import murcko_scaffold
from flexmol.config import ConfigError
from flexmol.evaluate.metrics import mae, rmse, roc_auc
from flexmol.finetune import config as ftconfig
from flexmol.finetune.cli import main as finetune_main
from flexmol.finetune.data import load_task_data
from flexmol.finetune.model import build_task_model
from flexmol.finetune.split import make_split, random_split, scaffold_split
from flexmol.finetune.trainer import train_seed
from flexmol.model import FlexMol
from flexmol.model.summary import model_config

SHARED_BBBP = Path(__file__).resolve().parents[2] / "shared" / "data" / "moleculenet" / "BBBP.csv"




@pytest.fixture(scope="module")
def labelled_csv(nci_smi, tmp_path_factory):
    """Real NCI molecules with RDKit-computed targets (Crippen logP, and logP > 2 as a class), one
    unparseable SMILES, one non-numeric label and one row without labels."""
    path = tmp_path_factory.mktemp("ft") / "set.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["smiles", "logp", "lipophilic", "name"])
        for i, (smi, mol) in enumerate(nci_molecules(nci_smi, 160)):
            logp = Crippen.MolLogP(mol)
            cls = "" if i % 7 == 3 else int(logp > 2)  # missing labels in the classification column
            w.writerow([smi, f"{logp:.3f}", cls, f"m{i}"])
        w.writerow(["C1CC(", "1.0", "1", "broken"])
        w.writerow(["CCO", "n/a", "0", "badlabel"])
        w.writerow(["CCN", "", "", "unlabelled"])
    return path


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    torch.manual_seed(0)
    cfg = model_config("tiny")
    cfg.dim, cfg.heads, cfg.num_kernels = 32, 4, 16
    return save_pretrained(FlexMol(cfg), tmp_path_factory.mktemp("export"))


# ----------------------------------------------------------------------------------------- splits

def _bbbp_or_nci(nci_smi):
    if SHARED_BBBP.is_file():
        with open(SHARED_BBBP) as f:
            smiles = [r["smiles"] for r in csv.DictReader(f)]
        return [s for s in smiles if Chem.MolFromSmiles(s) is not None]
    return [s for s, _ in nci_molecules(nci_smi, 1500)]


def test_scaffold_split_is_deterministic_and_keeps_scaffolds_apart(nci_smi):
    smiles = _bbbp_or_nci(nci_smi)
    a = scaffold_split(smiles)
    b = make_split("scaffold", list(smiles), seed=7)  # seeds do not change a scaffold split
    for part in ("train", "valid", "test"):
        assert np.array_equal(getattr(a, part), getattr(b, part))
    idx = np.concatenate([a.train, a.valid, a.test])
    assert sorted(idx.tolist()) == list(range(len(smiles)))
    scaf = [murcko_scaffold(s) for s in smiles]
    parts = [{scaf[i] for i in getattr(a, p)} for p in ("train", "valid", "test")]
    assert not parts[0] & parts[2] and not parts[0] & parts[1] and not parts[1] & parts[2]
    n = len(smiles)
    assert 0.7 * n <= len(a.train) <= 0.8 * n and len(a.train) + len(a.valid) <= 0.9 * n
    assert len(a.valid) > 0 and len(a.test) > 0


def test_random_split_depends_on_seed():
    a, b, c = random_split(100, 0), random_split(100, 0), random_split(100, 1)
    assert np.array_equal(a.test, b.test) and not np.array_equal(a.test, c.test)
    assert a.sizes() == {"train": 80, "valid": 10, "test": 10}


def test_split_fraction_errors():
    with pytest.raises(ValueError, match="summing to 1"):
        scaffold_split(["CCO", "c1ccccc1"], (0.5, 0.2, 0.2))


# ---------------------------------------------------------------------------------------- metrics

def test_metrics_ignore_missing_labels():
    y = np.array([[1, np.nan], [0, 1], [1, 0], [0, np.nan]], dtype=float)
    s = np.array([[0.9, 0.0], [0.1, 0.8], [0.8, 0.3], [0.2, 0.9]])
    assert roc_auc(y, s) == pytest.approx(1.0)  # task 2's unlabelled rows would make it 0.5
    y1 = np.array([[1.0], [np.nan], [3.0]])
    p1 = np.array([[2.0], [100.0], [3.0]])
    assert rmse(y1, p1) == pytest.approx(math.sqrt(0.5)) and mae(y1, p1) == pytest.approx(0.5)


# -------------------------------------------------------------------------------------- data, LoRA

def test_labels_and_rejects_are_reported(labelled_csv):
    data = load_task_data(str(labelled_csv), ["logp", "lipophilic"], "regression", id_column="name", workers=1,
                          progress=False)
    codes = {r["id"]: r["code"] for r in data.rejects}
    assert codes["broken"] == "invalid_smiles"
    assert codes["badlabel"] == "bad_label" and codes["unlabelled"] == "no_label"
    assert len(data.records) + len(data.rejects) == data.read == 163
    assert np.isnan(data.labels[:, 1]).sum() > 0 and not np.isnan(data.labels[:, 0]).any()
    with pytest.raises(Exception, match="not in"):
        load_task_data(str(labelled_csv), ["nope"], "regression", workers=1, progress=False)
    cls = load_task_data(str(labelled_csv), ["logp"], "classification", workers=1, progress=False)
    assert {r["code"] for r in cls.rejects} >= {"bad_label"}  # logP values are not class labels


@pytest.fixture(scope="module")
def paired_data(labelled_csv):
    return load_task_data(str(labelled_csv), ["lipophilic"], "classification", modality="paired", workers=2,
                          progress=False, limit=60)


def _cfg(mode, **train):
    cfg = ftconfig.FinetuneConfig()
    cfg.mode = mode
    cfg.train.epochs, cfg.train.batch_size, cfg.train.patience = train.get("epochs", 2), 16, 5
    return cfg


def test_lora_trains_only_adapters_and_head(paired_data, tiny_export):
    from flexmol import load_pretrained

    base = load_pretrained(tiny_export)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = build_task_model(base.train(), 1, lora=True, r=8, alpha=16)
    head_before = {k: v.clone() for k, v in model.head.state_dict().items()}
    trainable = [k for k, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in k or k.startswith("head.") for k in trainable)
    assert any(".shared_attention.0.qkv.lora_A" in k for k in trainable)
    assert any("mm_encoder.body.layers.0.ffn.3.lora_B" in k for k in trainable)
    split = make_split("random", [r["smiles"] for r in paired_data.records], 0)
    train_seed(model, paired_data, split, 0, _cfg("2d"), "roc_auc", torch.device("cpu"))
    after = model.backbone.get_base_model().state_dict()
    for k, v in before.items():  # peft renames the wrapped linears' weights to base_layer.*
        k2 = k.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias") if k not in after else k
        assert torch.equal(after[k2], v), k
    assert any(not torch.equal(v, model.head.state_dict()[k]) for k, v in head_before.items())
    lora_b = [p for k, p in model.named_parameters() if "lora_B" in k]
    assert any(p.abs().sum() > 0 for p in lora_b)  # LoRA B starts at zero: the adapters did train


@pytest.mark.parametrize("mode", ["2d", "3d", "both"])
def test_input_modes_run(paired_data, tiny_export, mode):
    from flexmol import load_pretrained

    model = build_task_model(load_pretrained(tiny_export).train(), 1, lora=True, r=4, alpha=8)
    split = make_split("scaffold", [r["smiles"] for r in paired_data.records], 0)
    res = train_seed(model, paired_data, split, 0, _cfg(mode, epochs=1), "roc_auc", torch.device("cpu"))
    assert res["epochs_run"] == 1 and res["_test_pred"].shape == (len(split.test), 1)
    assert np.isfinite(res["history"][0]["loss"])


# -------------------------------------------------------------------------------------- protocol

def test_finetune_command_writes_results_and_resumes(labelled_csv, tiny_export, tmp_path, capsys):
    out = tmp_path / "ft"
    common = ["--data", str(labelled_csv), "--smiles-column", "smiles", "--target", "logp", "--task", "regression",
              "--split", "scaffold", "--seeds", "2", "--out", str(out), "train.epochs=2", "train.batch_size=32",
              "lora.r=4", "rf.n_estimators=20", "data.num_workers=1", "--baselines", "scratch,probe_scratch,ecfp_rf"]
    shape = [f"scratch_model={tiny_export / 'model.yaml'}"]
    # the baselines first, before any checkpoint exists ...
    assert finetune_main(common + shape) == 0
    baseline_only = json.loads((out / "results.json").read_text())
    assert baseline_only["model"] == "scratch"
    assert set(baseline_only["models"]) == {"scratch", "probe_scratch", "ecfp_rf"}
    capsys.readouterr()
    # ... are reused by the run with the checkpoint, which trains only the pre-trained model
    argv = ["--checkpoint", str(tiny_export)] + common
    assert finetune_main(argv) == 0
    err = capsys.readouterr().err
    assert "[scratch seed 1] done before" in err and "[ecfp_rf seed 0] done before" in err
    assert "[probe_scratch seed 1] done before" in err
    assert "[flexmol seed 0] epoch 1/2" in err
    res = json.loads((out / "results.json").read_text())
    assert res["metric"] == "rmse" and res["model"] == "flexmol" and len(res["per_seed"]) == 2
    assert res["mean"] == pytest.approx(np.mean(res["per_seed"]))
    assert res["std"] == pytest.approx(np.std(res["per_seed"]))
    assert set(res["models"]) == {"flexmol", "scratch", "probe_scratch", "ecfp_rf"}
    d = res["data"]
    assert d["rejected_by_reason"]["bad_label"] == 1 and d["rejected_by_reason"]["invalid_smiles"] == 1
    assert d["molecules"] + d["rejected"] == d["rows"] == 163
    assert res["split"]["train"] + res["split"]["valid"] + res["split"]["test"] == d["molecules"]
    rejects = [json.loads(line) for line in open(out / "rejects.jsonl")]
    assert len(rejects) == d["rejected"]
    for name in ("flexmol", "scratch"):
        assert (out / "runs" / name / "seed0" / "model").is_dir()
    assert (out / "runs" / "flexmol" / "seed0" / "model" / "adapter" / "adapter_model.safetensors").is_file()
    table = (out / "table.txt").read_text()
    assert "ecfp_rf" in table and "scratch" in table and "flexmol" in table
    # a second run finds every result and trains nothing
    assert finetune_main(argv) == 0
    assert capsys.readouterr().err.count("done before") == 8
    assert json.loads((out / "results.json").read_text())["per_seed"] == res["per_seed"]


def test_finetune_config_errors(labelled_csv, tmp_path, capsys):
    base = ["--data", str(labelled_csv), "--target", "logp", "--out", str(tmp_path)]
    with pytest.raises(ConfigError, match="data.metric"):
        ftconfig.load(overrides=["data.source=x", "data.targets=[a]", "data.task=regression", "data.metric=roc_auc"])
    with pytest.raises(ConfigError, match="checkpoint"):
        ftconfig.load(overrides=["data.source=x", "data.targets=[a]", f"checkpoint={tmp_path}"])
    assert finetune_main(base + ["--task", "regression", "mode=4d"]) == 2
    assert finetune_main(base + ["--task", "regression", "--target", "missing_column"]) == 2
    assert finetune_main(base + ["--task", "regression", "--baselines", "scratch,svm"]) == 2
    assert "svm" in capsys.readouterr().err
    assert finetune_main(base + ["--task", "regression", "--baselines", "none"]) == 2
    assert "nothing to run" in capsys.readouterr().err


def test_bucketed_epochs_cover_the_training_set_once():
    from flexmol.finetune.trainer import epoch_batches

    train = np.arange(5, 105)
    sizes = np.random.default_rng(0).integers(3, 60, size=120)
    for bucket in (1, 4):
        batches = epoch_batches(train, sizes, 16, bucket, np.random.default_rng(1))
        assert sorted(np.concatenate(batches).tolist()) == train.tolist()
        assert all(len(b) <= 16 for b in batches)
    sorted_runs = epoch_batches(train, sizes, 16, 4, np.random.default_rng(1))
    plain = epoch_batches(train, sizes, 16, 1, np.random.default_rng(1))
    width = lambda bs: sum(len(b) * sizes[b].max() for b in bs)  # noqa: E731  padded atoms
    assert width(sorted_runs) < width(plain)


def test_a_split_with_one_class_in_a_part_is_refused():
    from flexmol.finetune.protocol import check_classes
    from flexmol.finetune.split import Split

    y = np.array([[0], [1], [1], [1], [0], [np.nan]], dtype=float)
    good = Split(np.array([0, 1]), np.array([2, 4]), np.array([3, 4]))
    check_classes(y, good, ["t"], "x")  # the test part has both classes through row 4
    with pytest.raises(ValueError, match="valid part .* one class"):
        check_classes(y, Split(np.array([0, 1]), np.array([2, 3, 5]), np.array([0, 1])), ["t"], "x")


@pytest.mark.slow
def test_launcher_spreads_runs_over_ranks(labelled_csv, tiny_export, tmp_path):
    import socket
    import subprocess
    import sys

    from conftest import REPO, child_env

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ft"
    cmd = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", "2", "--master_port", str(port),
           str(REPO / "launch" / "finetune.py"), "--checkpoint", str(tiny_export), "--data", str(labelled_csv),
           "--target", "lipophilic", "--task", "classification", "--seeds", "2", "--baselines", "ecfp_rf",
           "--out", str(out), "train.epochs=1", "lora.r=4", "rf.n_estimators=10", "data.num_workers=1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=child_env(OMP_NUM_THREADS="1"),
                          cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert set(res["models"]) == {"flexmol", "ecfp_rf"} and len(res["per_seed"]) == 2
    ranks = {json.loads(p.read_text())["rank"] for p in (out / "runs").glob("*/seed*/result.json")}
    assert ranks == {0, 1}
    assert proc.stdout.count("results: ") == 1  # rank 0 alone writes and prints the summary


def test_too_few_molecules_for_a_split_is_an_error(tmp_path, capsys):
    path = tmp_path / "three.csv"
    path.write_text("smiles,y\nCCO,1.0\nc1ccccc1,2.0\nCCN,0.5\n")
    argv = ["--data", str(path), "--target", "y", "--task", "regression", "--out", str(tmp_path / "o"),
            "--baselines", "ecfp_rf", "data.num_workers=1"]
    assert finetune_main(argv) == 2
    assert "empty" in capsys.readouterr().err


# ------------------------------------------------------------- full fine-tuning and linear probes

@pytest.fixture(scope="module")
def trained_export(tmp_path_factory):
    """A checkpoint unlike the random initialisation of any seed the runs use (0 and 1)."""
    torch.manual_seed(1234)
    cfg = model_config("tiny")
    cfg.dim, cfg.heads, cfg.num_kernels = 32, 4, 16
    return save_pretrained(FlexMol(cfg), tmp_path_factory.mktemp("trained"))


@pytest.fixture(scope="module")
def arms_run(labelled_csv, trained_export, tmp_path_factory):
    """``flexmol finetune --baselines probe_flexmol,probe_scratch,flexmol_full`` on a small
    classification set with missing labels; returns the output folder and the log."""
    out = tmp_path_factory.mktemp("arms") / "ft"
    argv = ["--checkpoint", str(trained_export), "--data", str(labelled_csv), "--smiles-column", "smiles",
            "--target", "lipophilic", "--task", "classification", "--split", "random", "--seeds", "2",
            "--baselines", "probe_flexmol,probe_scratch,flexmol_full", "--out", str(out),
            "train.epochs=1", "train.batch_size=32", "lora.r=4", "data.num_workers=1"]
    log = io.StringIO()
    with contextlib.redirect_stderr(log):
        rc = finetune_main(argv)
    assert rc == 0, log.getvalue()[-3000:]
    return out, log.getvalue()


def _protocol_data(labelled_csv, out):
    """The molecules, in the order the protocol of ``arms_run`` holds them (from its cache)."""
    return load_task_data(str(labelled_csv), ["lipophilic"], "classification", smiles_column="smiles", workers=1,
                          progress=False, cache_dir=out / "cache")


def test_cli_runs_the_chosen_arms_into_results_and_a_labelled_table(arms_run):
    import re

    out, _ = arms_run
    res = json.loads((out / "results.json").read_text())
    expect = {"flexmol": ("LoRA r=4", True), "flexmol_full": ("full", True),
              "probe_flexmol": ("linear probe", True), "probe_scratch": ("linear probe", False)}
    assert list(res["models"]) == list(expect)
    for name, (how, pretrained) in expect.items():
        m = res["models"][name]
        assert (m["training"], m["pretrained"]) == (how, pretrained)
        assert len(m["per_seed"]) == 2 and np.isfinite(m["per_seed"]).all()
        for seed in (0, 1):
            run = out / "runs" / name / f"seed{seed}"
            r = json.loads((run / "result.json").read_text())
            assert r["digest"] == res["digests"][name] and r["test"] == m["per_seed"][seed]
            with open(run / "test_predictions.csv") as f:
                assert len(list(csv.DictReader(f))) == res["split"]["test"]
    assert len(set(res["digests"].values())) == 4
    lines = (out / "table.txt").read_text().splitlines()
    rows = {line.split()[0]: line for line in lines[2:]}
    assert set(rows) == set(expect)
    for name, (how, pretrained) in expect.items():
        assert re.match(rf"{name} +{re.escape(how)} +{'yes' if pretrained else 'no'} +\d\.\d{{3}} ± ", rows[name])
    assert "pre-trained" in lines[1] and "training" in lines[1]


def test_full_finetuning_trains_every_backbone_weight_from_the_checkpoint(arms_run, trained_export, labelled_csv):
    import re

    from safetensors.torch import load_file

    from flexmol import load_pretrained
    from flexmol.finetune.trainer import Batches

    out, log = arms_run
    # every parameter trainable, the run starting from the checkpoint
    assert re.search(r"\[flexmol_full seed 0\] all weights from the checkpoint: ([\d,]+) of \1 parameters", log)
    ckpt = load_file(trained_export / "model.safetensors")
    saved = load_file(out / "runs" / "flexmol_full" / "seed0" / "model" / "model.safetensors")
    body = {k[len("backbone."):]: v for k, v in saved.items() if k.startswith("backbone.")}
    assert body.keys() == ckpt.keys()
    changed = {k for k in ckpt if not torch.equal(ckpt[k], body[k])}
    # the parameters the 2D-input embedding depends on
    model = load_pretrained(trained_export).train()
    data = _protocol_data(labelled_csv, out)
    batch = Batches(data, "2d", model.cfg.max_spd, model.cfg.max_path)(np.arange(64))
    emb = model(batch, decode=False)["embedding"]
    (emb * torch.randn_like(emb)).sum().backward()
    used = {k for k, p in model.named_parameters() if p.grad is not None}
    assert {"atom_2d.tables.0.weight", "shared_attention.0.qkv.weight", "decoder_2to3.body.layers.0.ffn.0.weight",
            "encoder_3d.layers.0.ffn.3.weight", "mm_encoder.body.layers.0.attention.out.weight"} <= used
    # each of them trained; everything else (no gradient ever) still exactly the checkpoint's
    assert changed == used
    # the LoRA arm of the same run trained adapters only: nothing of the base model is in its save
    log_lora = re.search(r"\[flexmol seed 0\] LoRA r=4 from the checkpoint: ([\d,]+) of ([\d,]+) parameters", log)
    assert log_lora and int(log_lora[1].replace(",", "")) < int(log_lora[2].replace(",", ""))
    adapter = load_file(out / "runs" / "flexmol" / "seed0" / "model" / "adapter" / "adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter)
    assert not (out / "runs" / "flexmol" / "seed0" / "model" / "model.safetensors").exists()


def test_probe_run_predicts_with_a_linear_model_on_frozen_embeddings(arms_run, trained_export, labelled_csv):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from flexmol import load_pretrained
    from flexmol.finetune.probe import embeddings
    from flexmol.finetune.trainer import Batches

    out, _ = arms_run
    res = json.loads((out / "results.json").read_text())
    data = _protocol_data(labelled_csv, out)
    assert len(data.records) == res["data"]["molecules"]
    # the embeddings, computed without touching the backbone ...
    backbone = load_pretrained(trained_export).train()
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    x = embeddings(backbone, data, "2d", 64, torch.device("cpu"))
    assert backbone.training and all(torch.equal(v, backbone.state_dict()[k]) for k, v in before.items())
    # ... are the pooled embedding the task head sees, in eval mode
    with torch.no_grad():
        idx = np.array([5, 0, 17])
        ref = backbone.eval()(Batches(data, "2d", backbone.cfg.max_spd, backbone.cfg.max_path)(idx),
                              decode=False)["embedding"]
    np.testing.assert_allclose(x[idx], ref.numpy(), atol=1e-5)
    # the run kept the C with the best validation ROC-AUC and predicted test with it
    split = make_split("random", data.smiles, 0)
    run = json.loads((out / "runs" / "probe_flexmol" / "seed0" / "result.json").read_text())
    y = data.labels[:, 0]
    rows = split.train[~np.isnan(y[split.train])]
    scaler = StandardScaler().fit(x[split.train])
    grid = ftconfig.ProbeSection().c_grid
    fits = [LogisticRegression(C=c, max_iter=2000).fit(scaler.transform(x[rows]), y[rows].astype(int)) for c in grid]
    valid = [roc_auc(y[split.valid, None], f.predict_proba(scaler.transform(x[split.valid]))[:, 1:]) for f in fits]
    assert run["probe"]["grid"] == grid
    np.testing.assert_allclose(run["probe"]["valid_by_value"]["lipophilic"], valid, atol=1e-6)
    best = int(np.argmax(valid))
    assert run["probe"]["chosen"] == {"lipophilic": grid[best]}
    with open(out / "runs" / "probe_flexmol" / "seed0" / "test_predictions.csv") as f:
        pred = np.array([float(r["pred_lipophilic"]) for r in csv.DictReader(f)])
    np.testing.assert_allclose(pred, fits[best].predict_proba(scaler.transform(x[split.test]))[:, 1], atol=1e-5)
    assert run["test"] == pytest.approx(roc_auc(y[split.test, None], pred[:, None]), abs=1e-6)


def test_probe_scratch_is_seeded_and_differs_from_probe_flexmol(paired_data, trained_export):
    from flexmol.finetune.probe import linear_probe
    from flexmol.finetune.protocol import probe_features

    cfg = ftconfig.FinetuneConfig(checkpoint=str(trained_export))
    cpu = torch.device("cpu")
    a, _ = probe_features("probe_scratch", 0, paired_data, cfg, cpu)
    b, _ = probe_features("probe_scratch", 0, paired_data, cfg, cpu)
    c, _ = probe_features("probe_scratch", 1, paired_data, cfg, cpu)
    f, _ = probe_features("probe_flexmol", 0, paired_data, cfg, cpu)
    assert a.shape == f.shape == (len(paired_data.records), 32)
    assert np.array_equal(a, b) and not np.allclose(a, c, atol=1e-3) and not np.allclose(a, f, atol=1e-3)
    split = make_split("random", paired_data.smiles, 0)
    runs = [linear_probe(x, paired_data.labels, split, 0, "classification", "roc_auc", cfg.probe, ["lipophilic"])
            for x in (a, b, f)]
    assert np.array_equal(runs[0]["_test_pred"], runs[1]["_test_pred"]) and runs[0]["test"] == runs[1]["test"]
    assert not np.allclose(runs[0]["_test_pred"], runs[2]["_test_pred"])
    # probe_flexmol's embedding does not depend on the seed: computed once and reused
    cache: dict = {}
    probe_features("probe_flexmol", 0, paired_data, cfg, cpu, cache)
    again, took = probe_features("probe_flexmol", 1, paired_data, cfg, cpu, cache)
    assert took == 0.0 and np.array_equal(again, f)


def test_ridge_probe_keeps_the_alpha_with_the_best_validation_rmse(labelled_csv):
    from sklearn.linear_model import Ridge
    from sklearn.preprocessing import StandardScaler

    from flexmol.finetune.baselines import ecfp
    from flexmol.finetune.probe import linear_probe

    data = load_task_data(str(labelled_csv), ["logp"], "regression", workers=1, progress=False)
    x = ecfp(data.smiles, 2, 256).astype(np.float64)  # real molecules' features, no network needed
    split = make_split("random", data.smiles, 0)
    probe = ftconfig.ProbeSection()
    run = linear_probe(x, data.labels, split, 0, "regression", "rmse", probe, ["logp"])
    scaler = StandardScaler().fit(x[split.train])
    fits = [Ridge(alpha=a).fit(scaler.transform(x[split.train]), data.labels[split.train, 0]) for a in probe.alpha_grid]
    valid = [rmse(data.labels[split.valid], f.predict(scaler.transform(x[split.valid]))[:, None]) for f in fits]
    best = int(np.argmin(valid))
    assert run["probe"]["model"] == "Ridge" and run["probe"]["chosen"] == {"logp": probe.alpha_grid[best]}
    np.testing.assert_allclose(run["_test_pred"][:, 0], fits[best].predict(scaler.transform(x[split.test])))
    assert run["valid"] == pytest.approx(valid[best])


def test_probe_predicts_a_target_with_one_training_class_as_that_class(paired_data):
    from flexmol.finetune.baselines import ecfp
    from flexmol.finetune.probe import linear_probe

    x = ecfp(paired_data.smiles, 2, 256).astype(np.float64)
    n = len(paired_data.records)
    y = np.column_stack([paired_data.labels[:, 0], np.ones(n)])  # the second target: one class everywhere
    split = make_split("random", paired_data.smiles, 0)
    run = linear_probe(x, y, split, 0, "classification", "roc_auc", ftconfig.ProbeSection(), ["lipophilic", "one"])
    assert run["probe"]["constant"] == {"one": 1.0} and set(run["probe"]["chosen"]) == {"lipophilic"}
    assert (run["_test_pred"][:, 1] == 1.0).all()
    # scored by the shared metric, which leaves out a target with one class in the scored part
    assert run["test"] == roc_auc(y[split.test][:, :1], run["_test_pred"][:, :1])


@pytest.mark.parametrize("arm", ["flexmol_full", "probe_flexmol"])
def test_an_arm_needing_a_checkpoint_is_refused_without_one(labelled_csv, tmp_path, capsys, arm):
    argv = ["--data", str(labelled_csv), "--target", "logp", "--task", "regression", "--out", str(tmp_path / "o"),
            "--baselines", f"scratch,{arm}"]
    assert finetune_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and arm in err and "'baselines'" in err and "checkpoint" in err
    assert not (tmp_path / "o").exists()


def test_default_arms_are_every_arm_that_applies(tiny_export):
    from flexmol.finetune.cli import DEFAULT_CONFIG
    from flexmol.finetune.protocol import model_names

    base = ["data.source=x", "data.targets=[a]"]
    assert model_names(ftconfig.load(DEFAULT_CONFIG, overrides=base)) == ["scratch", "probe_scratch", "ecfp_rf"]
    full = ftconfig.load(DEFAULT_CONFIG, overrides=base + [f"checkpoint={tiny_export}"])
    assert model_names(full) == ["flexmol", "flexmol_full", "scratch", "probe_flexmol", "probe_scratch", "ecfp_rf"]
    assert model_names(ftconfig.load(overrides=base + ["baselines=[probe_scratch]"])) == ["probe_scratch"]


def test_digests_of_the_new_arms_follow_what_they_depend_on(tiny_export, trained_export, labelled_csv):
    from flexmol.finetune.protocol import run_digest

    base = [f"data.source={labelled_csv}", "data.targets=[logp]"]

    def digests(*more):
        cfg = ftconfig.load(overrides=base + list(more))
        return {arm: run_digest(cfg, arm) for arm in ("flexmol", "flexmol_full", "probe_flexmol", "probe_scratch")}

    a = digests(f"checkpoint={tiny_export}")
    other_checkpoint = digests(f"checkpoint={trained_export}")  # same architecture, other weights
    assert other_checkpoint["probe_scratch"] == a["probe_scratch"]
    assert all(other_checkpoint[k] != a[k] for k in ("flexmol", "flexmol_full", "probe_flexmol"))
    probe = digests(f"checkpoint={tiny_export}", "probe.c_grid=[1.0]")
    assert probe["flexmol_full"] == a["flexmol_full"] and probe["probe_flexmol"] != a["probe_flexmol"]
    lora = digests(f"checkpoint={tiny_export}", "lora.r=8")
    assert lora["flexmol_full"] == a["flexmol_full"] and lora["flexmol"] != a["flexmol"]
    lr = digests(f"checkpoint={tiny_export}", "train.lr=1e-3")
    assert lr["flexmol_full"] != a["flexmol_full"] and lr["probe_flexmol"] == a["probe_flexmol"]
