"""The modality-alignment report (flexmol.evaluate.alignment, `flexmol evaluate alignment`), on real
NCI molecules featurised as paired data with ETKDG conformers, with the tiny model."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import flexmol
from flexmol import config
from flexmol.cli import main
from flexmol.data.collate import collate
from flexmol.data.shards import read_shard, shard_paths
from flexmol.evaluate.alignment import AlignmentError, alignment_report, flat_metrics, format_report, retrieval
from flexmol.featurize import run_featurize
from flexmol.model import FlexMol, ModelConfig

from conftest import child_env

# the tiny preset (flexmol model summary --model tiny)
TINY = ModelConfig(dim=64, heads=4, layers=2, decoder_layers=1, mm_layers=1, num_kernels=32, proj_dim=64)
PAIRED = 120  # NCI inputs featurised; a few are rejected (metals), so the dataset holds slightly fewer


def _featurize(source, out, modality, limit):
    cfg = config.build(config.FeaturizeConfig, {
        "source": str(source), "out": str(out), "modality": modality, "limit": limit,
        "featurizer": {"mmff": False}, "job": {"executor": "serial", "shard_size": 40, "progress": False}})
    return run_featurize(cfg, log=lambda m: None)


@pytest.fixture(scope="module")
def paired(tmp_path_factory, nci_smi):
    out = tmp_path_factory.mktemp("align") / "nci_paired"
    manifest = _featurize(nci_smi, out, "paired", PAIRED)
    assert manifest["counts"]["written"] > 100 and len(manifest["shards"]) > 1
    return out


@pytest.fixture(scope="module")
def only_2d(tmp_path_factory, nci_smi):
    out = tmp_path_factory.mktemp("align") / "nci_2d"
    _featurize(nci_smi, out, "2d", 20)
    return out


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    torch.manual_seed(0)
    return flexmol.save_pretrained(tiny_model(), tmp_path_factory.mktemp("align") / "export")


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return FlexMol(TINY).eval()


def records(directory, n):
    out = []
    for path in shard_paths(directory):
        out += list(read_shard(path))
    return out[:n]


def mixed_3d_with_2d(monkeypatch, model, share):
    """Make the 3D branch's pooled output (1 - share) y^(F) + share x^(F) of the same molecule and the
    3D projection the 2D one: share = 1 aligns the two modalities exactly, per molecule, whatever
    the batching."""
    forward = model.forward

    def patched(batch, *args, **kwargs):
        out = forward(batch, *args, **kwargs)
        out["y_f"] = share * out["x_f"] + (1 - share) * out["y_f"]
        return out

    monkeypatch.setattr(model, "forward", patched)
    monkeypatch.setattr(model, "proj_3d", model.proj_2d)
    return model


# ------------------------------------------------------------------------------ the figures

def test_retrieval_is_perfect_when_the_3d_projection_is_the_2d_one_of_the_same_molecule(paired, monkeypatch):
    model = mixed_3d_with_2d(monkeypatch, tiny_model(), 1.0)
    rep = alignment_report(model, [paired], count=100, max_atoms=512)
    r, c = rep["retrieval"], rep["cosine"]
    assert rep["molecules"] == 100
    for direction in ("2d_to_3d", "3d_to_2d"):
        assert r[direction] == {"top1": 1.0, "top5": 1.0}
    assert r["chance_top1"] == pytest.approx(0.01) and r["chance_top5"] == pytest.approx(0.05)
    assert c["matched_mean"] == pytest.approx(1.0, abs=1e-6)
    assert c["matched_above_0_8"] is True and c["matched_fraction_above_0_8"] == 1.0
    assert c["gap"] == pytest.approx(1.0 - c["unmatched_mean"]) and c["gap"] > 0


def test_a_random_init_model_retrieves_near_chance_and_fails_the_0_8_check(paired):
    rep = alignment_report(tiny_model(), [paired], count=100)
    r, c = rep["retrieval"], rep["cosine"]
    assert r["2d_to_3d"]["top1"] < 0.2 and r["3d_to_2d"]["top1"] < 0.2
    assert c["matched_above_0_8"] is False and c["matched_mean"] < 0.8
    # an untrained feature learner or decoder is no better than predicting the target's mean
    assert rep["feature_learners"]["3d_fl"]["relative"] > 0.5
    assert rep["decoders"]["3to2"]["atom"]["relative"] > 0.5


def test_report_matches_a_brute_force_computation_one_molecule_at_a_time(paired, monkeypatch):
    from flexmol.model.heads import masked_mean

    n = 40
    model = mixed_3d_with_2d(monkeypatch, tiny_model(), 0.6)  # partly aligned: top-1 strictly between 0 and 1
    rep = alignment_report(model, [paired], count=n, max_atoms=300)

    z2, z3, err = [], [], {k: [] for k in ("fl3", "fl2", "y_hat", "x_hat", "Q_hat", "P_hat")}
    tgt = {k: [] for k in ("x", "y", "P", "Q")}
    with torch.no_grad():
        for rec in records(paired, n):
            b = collate([rec])
            out = model(b)
            z2.append(model.proj_2d(masked_mean(out["x_f"], b["mask"]))[0].double().numpy())
            z3.append(model.proj_3d(masked_mean(out["y_f"], b["mask"]))[0].double().numpy())
            x, y, P, Q = (out[k][0].double().numpy() for k in ("x", "y", "P", "Q"))
            err["fl3"] += list(((model.fl_3d(out["x"])[0].double().numpy() - y) ** 2).mean(-1))
            err["fl2"] += list(((model.fl_2d(out["y"])[0].double().numpy() - x) ** 2).mean(-1))
            for gen, real in (("y_hat", y), ("x_hat", x), ("Q_hat", Q), ("P_hat", P)):
                err[gen] += list(((out[gen][0].double().numpy() - real) ** 2).mean(-1).ravel())
            tgt["x"].append(x), tgt["y"].append(y)
            tgt["P"].append(P.reshape(-1, P.shape[-1])), tgt["Q"].append(Q.reshape(-1, Q.shape[-1]))
    a = np.array(z2) / np.linalg.norm(z2, axis=1, keepdims=True)
    b = np.array(z3) / np.linalg.norm(z3, axis=1, keepdims=True)
    sim = a @ b.T
    best23 = [list(np.argsort(-sim[i])) for i in range(n)]
    best32 = [list(np.argsort(-sim[:, j])) for j in range(n)]
    r = rep["retrieval"]
    assert r["2d_to_3d"]["top1"] == pytest.approx(np.mean([best23[i][0] == i for i in range(n)]))
    assert r["2d_to_3d"]["top5"] == pytest.approx(np.mean([i in best23[i][:5] for i in range(n)]))
    assert r["3d_to_2d"]["top1"] == pytest.approx(np.mean([best32[j][0] == j for j in range(n)]))
    assert r["3d_to_2d"]["top5"] == pytest.approx(np.mean([j in best32[j][:5] for j in range(n)]))
    assert 0 < r["2d_to_3d"]["top1"] < 1 and 0 < r["3d_to_2d"]["top1"] < 1
    assert r["chance_top1"] == pytest.approx(1 / n) and r["chance_top5"] == pytest.approx(5 / n)
    c = rep["cosine"]
    off = ~np.eye(n, dtype=bool)
    assert c["matched_mean"] == pytest.approx(np.diag(sim).mean(), abs=1e-5)
    assert c["unmatched_mean"] == pytest.approx(sim[off].mean(), abs=1e-5)
    assert c["gap"] == pytest.approx(np.diag(sim).mean() - sim[off].mean(), abs=1e-5)
    assert c["matched_above_0_8"] == bool(np.diag(sim).mean() > 0.8)

    def var(parts):
        return np.concatenate(parts).var(axis=0).mean()

    expect = {("feature_learners", "3d_fl"): (err["fl3"], var(tgt["y"])),
              ("feature_learners", "2d_fl"): (err["fl2"], var(tgt["x"])),
              ("decoders", "2to3", "atom"): (err["y_hat"], var(tgt["y"])),
              ("decoders", "2to3", "pair"): (err["Q_hat"], var(tgt["Q"])),
              ("decoders", "3to2", "atom"): (err["x_hat"], var(tgt["x"])),
              ("decoders", "3to2", "pair"): (err["P_hat"], var(tgt["P"]))}
    for path, (errors, variance) in expect.items():
        got = rep
        for key in path:
            got = got[key]
        assert got["mse"] == pytest.approx(np.mean(errors), rel=1e-4), path
        assert got["target_variance"] == pytest.approx(variance, rel=1e-4), path
        assert got["relative"] == pytest.approx(np.mean(errors) / variance, rel=1e-4), path


def test_ties_with_the_matched_molecule_count_against_it():
    same = torch.ones(6, 4)  # a collapsed model: every projection identical
    rep = retrieval(same, same)
    assert rep["retrieval"]["2d_to_3d"]["top1"] == 0.0 and rep["retrieval"]["3d_to_2d"]["top1"] == 0.0
    assert rep["retrieval"]["2d_to_3d"]["top5"] == 0.0  # five others tie with each matched pair
    assert rep["cosine"]["gap"] == pytest.approx(0.0)


def test_figures_do_not_depend_on_batching_and_model_state_and_rng_are_restored(paired):
    model = tiny_model().double().train()  # float64: what is left of batching is rounding, ~1e-8
    torch.manual_seed(123)
    state = torch.get_rng_state()
    small = alignment_report(model, [paired], count=60, max_atoms=64)
    assert model.training  # put back into train mode
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is untouched
    large = alignment_report(model, [paired], count=60, max_atoms=100000)
    flat_small, flat_large = flat_metrics(small), flat_metrics(large)
    assert flat_small.keys() == flat_large.keys() and len(flat_small) > 20
    for k in flat_small:
        assert flat_small[k] == pytest.approx(flat_large[k], rel=1e-6, abs=1e-9), k
    assert small["dtype"] == "float64"


def test_the_same_molecule_twice_is_counted_once(paired):
    model = tiny_model()
    once = alignment_report(model, [paired], count=50)
    twice = alignment_report(model, [paired, paired], count=50)
    assert twice["molecules"] == 50 and flat_metrics(twice) == pytest.approx(flat_metrics(once))
    held = json.loads((paired / "manifest.json").read_text())["counts"]["written"]
    with pytest.raises(AlignmentError, match=f"only {held} distinct"):
        alignment_report(model, [paired, paired], count=held + 1)


# ------------------------------------------------------------------------------------ the CLI

REPORT_KEYS = {
    "molecules", "atoms", "data", "seed", "device", "dtype", "seconds", "checkpoint",
    "retrieval", "cosine", "feature_learners", "decoders"}


def test_cli_on_an_export_writes_json_with_every_figure_and_exits_0(paired, export, tmp_path, capsys):
    out = tmp_path / "report" / "alignment.json"
    rc = main(["evaluate", "alignment", "--checkpoint", str(export), "--data", str(paired), "--count", "80",
               "--out", str(out), "--device", "cpu", "--max-atoms", "1024"])
    assert rc == 0
    rep = json.loads(out.read_text())
    assert REPORT_KEYS <= rep.keys() and rep["molecules"] == 80 and rep["data"] == [str(paired)]
    assert set(rep["retrieval"]) == {"2d_to_3d", "3d_to_2d", "chance_top1", "chance_top5"}
    for direction in ("2d_to_3d", "3d_to_2d"):
        assert set(rep["retrieval"][direction]) == {"top1", "top5"}
    assert {"matched_mean", "unmatched_mean", "gap", "matched_above_0_8"} <= rep["cosine"].keys()
    assert isinstance(rep["cosine"]["matched_above_0_8"], bool)
    errors = [rep["feature_learners"]["3d_fl"], rep["feature_learners"]["2d_fl"]]
    errors += [rep["decoders"][d][level] for d in ("2to3", "3to2") for level in ("atom", "pair")]
    for e in errors:
        assert set(e) == {"mse", "target_variance", "relative"}
        assert e["mse"] > 0 and e["target_variance"] > 0 and e["relative"] == pytest.approx(e["mse"] / e["target_variance"])
    printed = capsys.readouterr().out
    assert "2D -> 3D" in printed and "3D -> 2D" in printed and "D_3->2 pairs" in printed
    assert printed.strip() == (format_report(rep) + f"\ndetails: {out}").strip()
    # the same model from the API gives the same figures
    api = alignment_report(flexmol.load_pretrained(export), [paired], count=80, max_atoms=1024, device="cpu")
    assert flat_metrics(api) == pytest.approx(flat_metrics(rep))


@pytest.mark.parametrize("case, expect", [
    ("2d", "a 2d dataset"),
    ("missing", "no such dataset directory"),
    ("no_manifest", "no manifest.json"),
    ("count_1", "--count must be at least 2"),
    ("too_many", "molecules"),
    ("bad_checkpoint", "does not load"),
])
def test_cli_refuses_unusable_input_with_one_line_and_exit_2(case, expect, paired, only_2d, export, tmp_path, capsys):
    data, checkpoint, count = str(paired), str(export), "10"
    if case == "2d":
        data = str(only_2d)
    elif case == "missing":
        data = str(tmp_path / "nowhere")
    elif case == "no_manifest":
        (tmp_path / "empty").mkdir()
        data = str(tmp_path / "empty")
    elif case == "count_1":
        count = "1"
    elif case == "too_many":
        count = "100000"
    elif case == "bad_checkpoint":
        (tmp_path / "ckpt").mkdir()
        (tmp_path / "ckpt" / "model.yaml").write_text((Path(export) / "model.yaml").read_text())
        (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"not safetensors")
        checkpoint = str(tmp_path / "ckpt")
    rc = main(["evaluate", "alignment", "--checkpoint", checkpoint, "--data", data, "--count", count,
               "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("flexmol evaluate alignment: ")
    assert expect in err
    if case == "too_many":
        held = json.loads((paired / "manifest.json").read_text())["counts"]["written"]
        assert f"the {held} molecules" in err


def test_the_flexmol_command_exits_2_without_a_traceback_on_a_2d_dataset(only_2d, export):
    proc = subprocess.run([sys.executable, "-m", "flexmol.cli", "evaluate", "alignment", "--checkpoint", str(export),
                           "--data", str(only_2d)], capture_output=True, text=True, env=child_env(), timeout=300)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "paired" in proc.stderr and str(only_2d) in proc.stderr


def test_api_refuses_a_dataset_that_is_not_paired_and_a_count_below_2(paired, only_2d):
    model = tiny_model()
    with pytest.raises(AlignmentError, match="needs paired molecules"):
        alignment_report(model, [only_2d], count=5)
    with pytest.raises(ValueError, match="at least 2"):
        alignment_report(model, [paired], count=1)
