"""What a user can get wrong with ``flexmol finetune``, ``flexmol model summary`` and exports: each
mistake is one line naming the key or the file, exit 2, never a traceback; edited data and damaged
weights are never taken for the ones a result was computed from."""
import argparse
import csv
import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from rdkit.Chem import Crippen

from conftest import nci_molecules

import flexmol
import flexmol.cli
from flexmol import save_pretrained
from flexmol.config import ConfigError
from flexmol.finetune.cli import main as finetune_main
from flexmol.model import FlexMol, ModelConfig
from flexmol.model.export import ExportError, UnverifiedExportWarning

TINY = ModelConfig(dim=32, heads=4, layers=1, decoder_layers=1, mm_layers=1, num_kernels=16, proj_dim=16)




def _write(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


@pytest.fixture(scope="module")
def molecules(nci_smi):
    """120 real NCI molecules with a class from RDKit's Crippen logP (logP > 2)."""
    return [(smi, int(Crippen.MolLogP(mol) > 2), Crippen.MolLogP(mol)) for smi, mol in nci_molecules(nci_smi, 120)]


@pytest.fixture
def class_csv(molecules, tmp_path):
    return _write(tmp_path / "set.csv", ["smiles", "y"], [(s, c) for s, c, _ in molecules])


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    torch.manual_seed(0)
    return save_pretrained(FlexMol(TINY), tmp_path_factory.mktemp("export") / "export")


def _copy(export, tmp_path, name="copy"):
    dst = tmp_path / name
    shutil.copytree(export, dst)
    return dst


def _flip_byte(path: Path, offset: int = -100):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


FAST = ["--seeds", "1", "--split", "random", "--baselines", "ecfp_rf", "rf.n_estimators=10", "data.num_workers=1"]


def _one_line_error(capsys, rc, progress=False):
    """The error line of a refused command; with ``progress``, after the lines of a job that had
    started (``[...]`` progress lines)."""
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    lines = err.splitlines()
    assert "Traceback" not in err and lines and lines[-1].startswith("flexmol "), err
    assert len(lines) == 1 or (progress and all(line.startswith("[") for line in lines[:-1])), err
    return lines[-1]


# -------------------------------------------------------------------------------- stale results

def test_an_edited_data_file_is_run_again_and_an_untouched_one_is_not(class_csv, tmp_path, capsys):
    out = tmp_path / "ft"
    read = list(csv.reader(open(class_csv)))[1:]
    rows = [["name", "smiles", "y"]] + [[f"m{i}", s, y] for i, (s, y) in enumerate(read)]
    _write(class_csv, rows[0], rows[1:])
    argv = ["finetune", "--data", str(class_csv), "--target", "y", "--out", str(out), "data.id_column=name"] + FAST
    assert flexmol.cli.main(argv) == 0
    capsys.readouterr()
    # the same bytes again (a new modification time): the result stands
    os.utime(class_csv, ns=(10**18, 10**18))
    assert flexmol.cli.main(argv) == 0
    assert "[ecfp_rf seed 0] done before" in capsys.readouterr().err
    # every label flipped, size unchanged: a new run, on the new labels
    _write(class_csv, rows[0], [(n, s, 1 - int(y)) for n, s, y in rows[1:]])
    assert flexmol.cli.main(argv) == 0
    err = capsys.readouterr().err
    assert "done before" not in err and "from another configuration; running again" in err
    before = {n: int(y) for n, s, y in rows[1:]}
    with open(out / "runs" / "ecfp_rf" / "seed0" / "test_predictions.csv") as f:
        written = list(csv.DictReader(f))
    assert written and all(float(r["y"]) == 1 - before[r["id"]] for r in written)


# ---------------------------------------------------------------------------------------- exports

def test_an_export_carries_the_checksum_of_its_weights(export):
    from flexmol.data.shards import file_sha256

    sums = json.loads((export / "checksums.json").read_text())
    weights = export / "model.safetensors"
    assert sums["model.safetensors"] == {"bytes": weights.stat().st_size, "sha256": file_sha256(weights)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a verified export loads without a word
        model = flexmol.load_pretrained(export)
    assert not model.training


@pytest.mark.parametrize("damage, expect", [(_flip_byte, "checksum mismatch"), (_truncate, "truncated")])
def test_damaged_weights_are_refused_naming_the_file(export, tmp_path, damage, expect):
    bad = _copy(export, tmp_path)
    damage(bad / "model.safetensors")
    with pytest.raises(ExportError, match=expect) as info:
        flexmol.load_pretrained(bad)
    msg = str(info.value)
    assert str(bad / "model.safetensors") in msg and len(msg.splitlines()) == 1
    assert isinstance(info.value, ConfigError)


def test_a_truncated_export_without_checksums_is_refused_in_one_line(export, tmp_path):
    bad = _copy(export, tmp_path)
    (bad / "checksums.json").unlink()
    _truncate(bad / "model.safetensors")
    with pytest.raises(ExportError, match="not a readable safetensors file") as info:
        flexmol.load_pretrained(bad)
    assert str(bad / "model.safetensors") in str(info.value) and len(str(info.value).splitlines()) == 1


def test_an_export_written_before_checksums_loads_with_a_warning(export, tmp_path):
    old = _copy(export, tmp_path)
    (old / "checksums.json").unlink()
    with pytest.warns(UnverifiedExportWarning, match="no checksums.json"):
        model = flexmol.load_pretrained(old)
    ref = flexmol.load_pretrained(export)
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in model.state_dict().items())


def test_file_hashes_come_from_one_function_read_once_per_version_of_the_file(tmp_path, monkeypatch):
    import hashlib

    import flexmol.data.shards as shards
    from flexmol.model.export import cached_sha256

    calls = []
    real = shards.file_sha256
    monkeypatch.setattr(shards, "file_sha256", lambda path: calls.append(path) or real(path))
    path = tmp_path / "data.csv"
    path.write_text("smiles,y\nCCO,1\n")
    assert cached_sha256(path) == cached_sha256(str(path)) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert len(calls) == 1
    path.write_text("smiles,y\nCCO,0\n")  # same size, new content and modification time
    os.utime(path, ns=(10**18, 10**18))
    assert cached_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest() and len(calls) == 2
    import flexmol.model.export as export_module

    assert not hasattr(export_module, "file_sha256")  # one implementation, in flexmol.data.shards


def test_load_pretrained_reads_and_checks_each_file_once(export, monkeypatch):
    import flexmol.model.export as ex

    calls = {}
    for name in ("_read_header", "export_model_config", "_check_fit", "_expected"):
        real = getattr(ex, name)
        monkeypatch.setattr(ex, name, lambda *a, _real=real, _name=name: calls.update({_name: calls.get(_name, 0) + 1})
                            or _real(*a))
    flexmol.load_pretrained(export)
    assert calls == {"_read_header": 1, "export_model_config": 1, "_check_fit": 1, "_expected": 1}


def _state(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_an_export_cut_short_before_its_checksums_says_so_when_loaded(export, tmp_path, monkeypatch):
    import types

    import flexmol.model.export as ex

    def cut(*a, **k):
        raise KeyboardInterrupt

    path, model = tmp_path / "cut", flexmol.load_pretrained(export)
    monkeypatch.setattr(ex, "json", types.SimpleNamespace(dumps=cut))  # killed as the checksums are written
    with pytest.raises(KeyboardInterrupt):
        save_pretrained(model, path)
    monkeypatch.undo()
    assert sorted(p.name for p in path.iterdir()) == ["model.safetensors", "model.yaml"]
    with pytest.warns(UnverifiedExportWarning) as record:
        loaded = flexmol.load_pretrained(path)
    msg = str(record[0].message)
    assert "no checksums.json" in msg and "cut short" in msg and "written before exports carried checksums" in msg
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in _state(export).items())


def test_an_export_cut_short_while_writing_its_weights_keeps_the_old_weights_whole(export, tmp_path, monkeypatch):
    import safetensors.torch

    path, model = _copy(export, tmp_path), flexmol.load_pretrained(export)
    old = (path / "model.safetensors").read_bytes()

    def half_then_killed(state, filename, *a, **k):
        Path(filename).write_bytes(old[: len(old) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", half_then_killed)
    with pytest.raises(KeyboardInterrupt):
        save_pretrained(model, path)
    monkeypatch.undo()
    assert sorted(p.name for p in path.iterdir()) == ["model.safetensors", "model.yaml"]  # no partial file left
    assert (path / "model.safetensors").read_bytes() == old
    with pytest.warns(UnverifiedExportWarning, match="cut short"):
        flexmol.load_pretrained(path)


@pytest.mark.parametrize("damage", [_flip_byte, _truncate])
def test_finetune_refuses_a_damaged_checkpoint_in_one_line(export, class_csv, tmp_path, capsys, damage):
    bad = _copy(export, tmp_path)
    damage(bad / "model.safetensors")
    out = tmp_path / "ft"
    rc = flexmol.cli.main(["finetune", "--checkpoint", str(bad), "--data", str(class_csv), "--target", "y",
                           "--out", str(out)] + FAST)
    err = _one_line_error(capsys, rc)
    assert "'checkpoint'" in err and str(bad / "model.safetensors") in err
    assert not out.exists()  # refused before any molecule was featurised


def _garbage_export(kind, export, tmp_path):
    path = _copy(export, tmp_path, kind)
    if kind == "random_bytes":
        (path / "checksums.json").unlink()
        (path / "model.safetensors").write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "empty_weights":
        (path / "checksums.json").unlink()
        (path / "model.safetensors").write_bytes(b"")
    elif kind == "yaml_not_yaml":
        (path / "model.yaml").write_text("dim: [32\n")
    elif kind == "yaml_wrong_type":
        (path / "model.yaml").write_text("dim: wide\n")
    elif kind == "yaml_indivisible":
        (path / "model.yaml").write_text("dim: 30\nheads: 4\n")
    elif kind == "other_sizes":
        (path / "model.yaml").write_text("dim: 64\nheads: 4\nlayers: 1\nnum_kernels: 16\nproj_dim: 16\n")
    elif kind == "bad_checksum_file":
        (path / "checksums.json").write_text("{not json")
    elif kind == "nan_weights":
        from safetensors.torch import save_file

        model = flexmol.load_pretrained(export)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        next(v for v in state.values() if v.is_floating_point()).fill_(float("nan"))
        (path / "checksums.json").unlink()
        save_file(state, str(path / "model.safetensors"))
    elif kind == "no_weights":
        (path / "model.safetensors").unlink()
    return path


GARBAGE = {"random_bytes": ("model.safetensors", "not a readable safetensors file"),
           "empty_weights": ("model.safetensors", "not a readable safetensors file"),
           "yaml_not_yaml": ("model.yaml", "not valid YAML"),
           "yaml_wrong_type": ("model.yaml", "'dim'"),
           "yaml_indivisible": ("model.yaml", "'dim' and 'heads'"),
           "other_sizes": ("model.safetensors", "do not fit the sizes"),
           "bad_checksum_file": ("checksums.json", "not a readable checksum file"),
           "nan_weights": ("model.safetensors", "NaN"),
           "no_weights": ("", "no model.safetensors")}


@pytest.mark.parametrize("kind", sorted(GARBAGE))
def test_load_pretrained_on_garbage_says_which_file_is_wrong(kind, export, tmp_path):
    path = _garbage_export(kind, export, tmp_path)
    name, expect = GARBAGE[kind]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnverifiedExportWarning)
        with pytest.raises(ExportError, match=expect) as info:
            flexmol.load_pretrained(path)
    msg = str(info.value)
    assert str(path / name) in msg and len(msg.splitlines()) == 1


@pytest.mark.parametrize("where", ["missing", "a_file"])
def test_load_pretrained_on_a_path_that_is_no_directory(where, tmp_path):
    path = tmp_path / "x"
    if where == "a_file":
        path.write_text("x")
    with pytest.raises(ExportError, match="not a directory" if where == "a_file" else "no such directory"):
        flexmol.load_pretrained(path)


@pytest.mark.parametrize("kind", ["random_bytes", "yaml_indivisible", "other_sizes", "nan_weights"])
def test_finetune_refuses_a_garbage_checkpoint_in_one_line(kind, export, class_csv, tmp_path, capsys):
    path = _garbage_export(kind, export, tmp_path)
    name, expect = GARBAGE[kind]
    argv = ["--checkpoint", str(path), "--data", str(class_csv), "--target", "y", "--out", str(tmp_path / "o")] + FAST
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnverifiedExportWarning)
        rc = finetune_main(argv)
    # weights are read whole (and their values checked) when the first run loads them
    err = _one_line_error(capsys, rc, progress=kind == "nan_weights")
    assert expect in err and str(path / name) in err


# ---------------------------------------------------------------------------- configuration values

@pytest.mark.parametrize("override, key", [
    ("train.lr=-0.001", "train.lr"), ("train.lr=0", "train.lr"), ("train.head_lr=-1", "train.head_lr"),
    ("train.weight_decay=-0.1", "train.weight_decay"), ("train.grad_clip=-1", "train.grad_clip"),
    ("train.bucket=0", "train.bucket"), ("lora.alpha=0", "lora.alpha"), ("lora.dropout=1.0", "lora.dropout"),
    ("head.dropout=-0.1", "head.dropout"), ("head.hidden=-8", "head.hidden"), ("rf.n_estimators=0", "rf.n_estimators"),
    ("rf.bits=0", "rf.bits"), ("rf.radius=-1", "rf.radius"), ("rf.n_jobs=0", "rf.n_jobs"),
    ("seeds=[-1]", "seeds"), ("data.subsample_seed=-3", "data.subsample_seed"),
    ("data.num_workers=-2", "data.num_workers"), ("device=cuda:x", "device"),
])
def test_an_out_of_range_value_is_one_line_naming_its_key(override, key, class_csv, tmp_path, capsys):
    out = tmp_path / "o"
    rc = finetune_main(["--data", str(class_csv), "--target", "y", "--out", str(out)] + FAST + [override])
    err = _one_line_error(capsys, rc)
    assert f"config key '{key}'" in err
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_a_cuda_device_where_there_is_none_is_one_line(class_csv, tmp_path, capsys):
    rc = finetune_main(["--data", str(class_csv), "--target", "y", "--out", str(tmp_path / "o"), "device=cuda"] + FAST)
    assert "config key 'device'" in _one_line_error(capsys, rc)


@pytest.mark.parametrize("override, expect", [
    ("train.lr=[1", "override 'train.lr=[1'"),  # not YAML
    ("seeds=5", "config key 'seeds': expects a list"),
    ("data.targets=y", "config key 'data.targets': expects a list"),
])
def test_a_malformed_override_is_one_line(override, expect, class_csv, tmp_path, capsys):
    rc = finetune_main(["--data", str(class_csv), "--target", "y", "--out", str(tmp_path / "o")] + FAST + [override])
    assert expect in _one_line_error(capsys, rc)


@pytest.mark.parametrize("text, expect", [("lora: {r: [8\n", "not valid YAML at line 2"),
                                          ("- 1\n- 2\n", "not a mapping of config keys"),
                                          (b"\xff\xfe\x00garbage", "not a YAML text file")])
def test_a_config_file_that_is_not_a_yaml_mapping_is_one_line_naming_it(text, expect, class_csv, tmp_path, capsys):
    conf = tmp_path / "ft.yaml"
    conf.write_bytes(text if isinstance(text, bytes) else text.encode())
    rc = finetune_main(["--data", str(class_csv), "--target", "y", "--out", str(tmp_path / "o"),
                        "--config", str(conf)] + FAST)
    err = _one_line_error(capsys, rc)
    assert expect in err and str(conf) in err


# ------------------------------------------------------------------------------------------- --out

def test_an_existing_file_as_out_is_one_line(class_csv, tmp_path, capsys):
    out = tmp_path / "results.txt"
    out.write_text("keep me\n")
    rc = finetune_main(["--data", str(class_csv), "--target", "y", "--out", str(out)] + FAST)
    err = _one_line_error(capsys, rc)
    assert "config key 'out'" in err and str(out) in err and "is a file" in err
    assert out.read_text() == "keep me\n"
    rc = finetune_main(["--data", str(class_csv), "--target", "y", "--out", str(out / "sub")] + FAST)
    assert "config key 'out'" in _one_line_error(capsys, rc)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="running as root: directory permissions do not stop root from writing")
def test_an_unwritable_out_directory_is_one_line(class_csv, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        for out in (locked, locked / "ft"):
            rc = finetune_main(["--data", str(class_csv), "--target", "y", "--out", str(out)] + FAST)
            err = _one_line_error(capsys, rc)
            assert "config key 'out'" in err and "not writable" in err
    finally:
        locked.chmod(0o700)


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="no /proc here (a place where nobody can create files)")
def test_an_out_directory_that_cannot_be_created_is_one_line(class_csv, capsys):
    out = Path("/proc/self/flexmol-out")
    rc = finetune_main(["--data", str(class_csv), "--target", "y", "--out", str(out)] + FAST)
    err = _one_line_error(capsys, rc)
    assert "config key 'out'" in err and str(out) in err


# ----------------------------------------------------------------------------------------- labels

def test_infinite_labels_are_rejected_not_trained_on(molecules, tmp_path):
    from flexmol.finetune.data import load_task_data

    rows = [(s, "inf" if i % 10 == 0 else f"{logp:.3f}") for i, (s, _, logp) in enumerate(molecules)]
    path = _write(tmp_path / "inf.csv", ["smiles", "logp"], rows)
    data = load_task_data(str(path), ["logp"], "regression", workers=1, progress=False)
    assert np.isfinite(data.labels).all()
    bad = [r for r in data.rejects if r["code"] == "bad_label"]
    assert len(bad) == 12 and all("finite" in r["reason"] for r in bad)


@pytest.mark.parametrize("labels, expect", [("minus_one_and_one", "must be 0 or 1; see "),
                                            ("one_class", "the whole set holds one class")])
def test_a_classification_set_left_with_one_class_says_why(labels, expect, molecules, tmp_path, capsys):
    rows = [(s, (2 * c - 1) if labels == "minus_one_and_one" else 1) for s, c, _ in molecules]
    path = _write(tmp_path / "set.csv", ["smiles", "y"], rows)
    out = tmp_path / "o"
    rc = finetune_main(["--data", str(path), "--target", "y", "--out", str(out)] + FAST)
    err = _one_line_error(capsys, rc, progress=True)
    assert "one class only" in err and expect in err and "split.kind=random" not in err
    if labels == "minus_one_and_one":
        assert str(out / "rejects.jsonl") in err
        assert sum(json.loads(line)["code"] == "bad_label" for line in open(out / "rejects.jsonl")) > 30


# ----------------------------------------------------------------------------------------- models

@pytest.mark.parametrize("text, keys", [
    ("dim: 60\nheads: 7\n", ["'dim' and 'heads'"]), ("dim: 0\n", ["'dim'"]), ("heads: -4\n", ["'heads'"]),
    ("layers: 0\n", ["'layers'"]), ("num_kernels: 0\n", ["'num_kernels'"]), ("dropout: 1.5\n", ["'dropout'"]),
])
def test_model_summary_of_an_impossible_model_is_one_line_naming_the_keys(text, keys, tmp_path, capsys):
    path = tmp_path / "my.yaml"
    path.write_text(text)
    rc = flexmol.cli.main(["model", "summary", "--model", str(path)])
    err = _one_line_error(capsys, rc)
    assert str(path) in err and all(k in err for k in keys)


HUGE = {"dim": "dim: 1000000\nheads: 1\n", "ffn_mult": "ffn_mult: 100000000\n"}


@pytest.mark.parametrize("kind", sorted(HUGE))
def test_model_summary_counts_any_sizes_without_allocating_them(kind, tmp_path, capsys):
    from flexmol.model.summary import model_config_file, parameter_count

    path = tmp_path / "huge.yaml"
    path.write_text(HUGE[kind])
    assert flexmol.cli.main(["model", "summary", "--model", str(path)]) == 0
    total = int(capsys.readouterr().out.strip().splitlines()[-1].split(": ")[1])
    assert total == parameter_count(model_config_file(path)) > 10**12


@pytest.mark.parametrize("kind", sorted(HUGE))
def test_finetune_refuses_a_model_too_large_for_this_machine_in_one_line(kind, class_csv, tmp_path, capsys):
    path = tmp_path / "huge.yaml"
    path.write_text(HUGE[kind])
    out = tmp_path / "o"
    rc = finetune_main(["--data", str(class_csv), "--target", "y", "--out", str(out), "--seeds", "1",
                        "--baselines", "scratch", f"scratch_model={path}", "data.num_workers=1"])
    err = _one_line_error(capsys, rc)
    assert "'scratch_model'" in err and str(path) in err and f"{kind}=" in err and "parameters" in err
    assert "more than this machine's" in err
    assert not out.exists()  # refused before any molecule was featurised


def test_load_pretrained_and_finetune_refuse_a_checkpoint_too_large_for_this_machine(export, class_csv, tmp_path,
                                                                                      capsys, monkeypatch):
    import flexmol.model.summary

    monkeypatch.setattr(flexmol.model.summary, "physical_memory", lambda: 1 << 16)
    with pytest.raises(ExportError, match="more than this machine's") as info:
        flexmol.load_pretrained(export)
    assert str(export / "model.yaml") in str(info.value) and f"{flexmol.model.summary.parameter_count(TINY):,}" \
        in str(info.value)
    out = tmp_path / "o"
    rc = finetune_main(["--checkpoint", str(export), "--data", str(class_csv), "--target", "y", "--out", str(out)]
                       + FAST)
    err = _one_line_error(capsys, rc)
    assert "'checkpoint'" in err and str(export / "model.yaml") in err and not out.exists()


def _allocation_fails(monkeypatch):
    """Building a FlexMol anywhere but on the meta device fails as the CPU allocator does."""
    import flexmol.model.summary

    real = flexmol.model.summary.FlexMol

    def build(cfg):
        if torch.empty(0).device.type != "meta":
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                               "memory: you tried to allocate 12000000000000 bytes.\nError code 12")
        return real(cfg)

    monkeypatch.setattr(flexmol.model.summary, "FlexMol", build)


def test_a_model_whose_weights_cannot_be_allocated_is_one_line_naming_its_sizes(export, class_csv, tmp_path,
                                                                               capsys, monkeypatch):
    from flexmol.model.summary import parameter_count

    _allocation_fails(monkeypatch)
    with pytest.raises(ExportError, match="could not be allocated") as info:
        flexmol.load_pretrained(export)
    msg = str(info.value)
    assert str(export / "model.yaml") in msg and f"{parameter_count(TINY):,} parameters" in msg
    assert len(msg.splitlines()) == 1
    path = tmp_path / "my.yaml"
    path.write_text("dim: 32\nheads: 4\nlayers: 1\n")
    rc = finetune_main(["--data", str(class_csv), "--target", "y", "--out", str(tmp_path / "o"),
                        "--baselines", "scratch", f"scratch_model={path}"] + FAST[:4] + ["data.num_workers=1"])
    err = _one_line_error(capsys, rc, progress=True)
    assert "'scratch_model'" in err and str(path) in err and "could not be allocated" in err and "parameters" in err


def test_a_width_not_divisible_by_the_heads_is_a_config_error_wherever_a_model_is_built(class_csv, tmp_path, capsys):
    from flexmol.train import config as pretrain_config

    path = tmp_path / "my.yaml"
    path.write_text("dim: 60\nheads: 7\nlayers: 1\n")
    with pytest.raises(ConfigError, match="'dim' and 'heads'"):
        FlexMol(ModelConfig(dim=60, heads=7))
    with pytest.raises(ConfigError, match="'dim' and 'heads'"):  # pre-training, before any data is read
        pretrain_config.load(None, ["data.paired=[somewhere]", f"model.size={path}"])
    rc = finetune_main(["--data", str(class_csv), "--target", "y", "--out", str(tmp_path / "o"),
                        "--baselines", "scratch", f"scratch_model={path}", "data.num_workers=1"])
    err = _one_line_error(capsys, rc)
    assert "'scratch_model'" in err and "'dim' and 'heads'" in err and str(path) in err


@pytest.mark.parametrize("value, expect", [("huge", "no such preset"), ("nowhere/net.yaml", "no such file")])
def test_an_unknown_scratch_model_is_one_line_naming_the_key(value, expect, class_csv, tmp_path, capsys):
    rc = finetune_main(["--data", str(class_csv), "--target", "y", "--out", str(tmp_path / "o"),
                        "--baselines", "scratch", f"scratch_model={value}"])
    err = _one_line_error(capsys, rc)
    assert err.startswith("flexmol finetune: scratch_model") and expect in err


def test_model_summary_of_a_directory_says_so(tmp_path, capsys):
    rc = flexmol.cli.main(["model", "summary", "--model", str(tmp_path)])
    assert "a directory, not a file" in _one_line_error(capsys, rc)


# ------------------------------------------------------------------------------------------ --help

def test_finetune_help_describes_every_argument_with_its_default(capsys):
    from flexmol.finetune.cli import add_arguments

    parser = argparse.ArgumentParser(prog="flexmol finetune")
    add_arguments(parser)
    shown = [a for a in parser._actions if a.help != argparse.SUPPRESS and not isinstance(a, argparse._HelpAction)]
    assert {a.dest for a in shown} >= {"checkpoint", "data", "smiles_column", "targets", "task", "metric", "split",
                                       "seeds", "mode", "baselines", "out", "config"}
    for action in shown:
        assert action.help and "(default: " in action.help, action.option_strings
    with pytest.raises(SystemExit) as exit_:
        flexmol.cli.main(["finetune", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for phrase in ("config key split.kind (default: scaffold", "(default: 3: [0, 1, 2])", "(default: 2d)",
                   "(default: all)", "(default: outputs/finetune)", "(default: classification)",
                   "(default: roc_auc for classification, rmse for regression)"):
        assert phrase in text, phrase


def test_finetune_help_reads_no_config_and_shows_the_packaged_defaults(monkeypatch):
    from flexmol import config
    from flexmol.finetune import cli
    from flexmol.finetune.config import FinetuneConfig

    packaged = config.build(FinetuneConfig, cli.DEFAULT_CONFIG)
    shown = cli._defaults()
    for key in ("mode", "seeds", "baselines", "out", "scratch_model"):
        assert getattr(shown, key) == getattr(packaged, key), key
    assert shown.data.task == packaged.data.task and shown.split == packaged.split

    def no_build(*a, **k):
        raise AssertionError("the help text built a configuration")

    monkeypatch.setattr(config, "build", no_build)
    cli.add_arguments(argparse.ArgumentParser())  # building the parser (every command does) reads no file


@pytest.mark.parametrize("override, key", [
    ("featurizer.num_conformers=5000", "featurizer.num_conformers"),
    ("featurizer.hard_timeout_s=1e30", "featurizer.hard_timeout_s"),
    ("featurizer.elements=[]", "featurizer.elements"),
])
def test_finetune_checks_the_featurizer_limits_featurisation_checks(tmp_path, capsys, override, key):
    from flexmol.cli import main

    data = tmp_path / "d.csv"
    data.write_text("smiles,y\nCCO,1\nCCN,0\n")
    rc = main(["finetune", "--data", str(data), "--target", "y", "--baselines", "ecfp_rf",
               "--out", str(tmp_path / "o"), override])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and f"'{key}'" in err, err
    assert not (tmp_path / "o").exists()
