"""`flexmol pretrain` against damaged data and wrong input: one line naming the problem, exit 2.

Runs go through ``flexmol.train.cli.main`` in this process, on real QM9 shards with the tiny model.
"""
import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest

from flexmol import config
from flexmol.featurize import run_featurize

os.environ.setdefault("DS_ACCELERATOR", "cpu")

STAGE1 = str(Path(__file__).resolve().parents[1] / "configs" / "pretrain" / "stage1.yaml")
TINY = ["data.num_workers=0", "data.max_atoms=256", "train.warmup_steps=1", "train.max_steps=2", "train.log_every=1",
        "wandb.mode=disabled", "validation.alignment_count=0"]


@pytest.fixture(scope="module")
def qm9_small(tmp_path_factory, qm9_rows):
    """100 QM9 molecules, paired, in 4 shards of 25."""
    out = tmp_path_factory.mktemp("hostile") / "qm9"
    run_featurize(config.build(config.FeaturizeConfig, {
        "source": "qm9", "out": str(out), "modality": "paired", "limit": 100,
        "job": {"executor": "serial", "shard_size": 25, "progress": False}}), log=lambda m: None)
    return out


@pytest.fixture
def dataset(qm9_small, tmp_path):
    """A copy of ``qm9_small`` to damage."""
    return Path(shutil.copytree(qm9_small, tmp_path / "data"))


def pretrain(capsys, *overrides):
    """(exit status, stderr) of ``flexmol pretrain --config stage1 OVERRIDES``."""
    import logging
    import sys

    from flexmol.train.cli import main

    capsys.readouterr()
    for handler in logging.getLogger("DeepSpeed").handlers:  # bound to the stderr of the test that imported it
        if type(handler) is logging.StreamHandler:
            handler.stream = sys.stderr
    rc = main(["--config", STAGE1, *overrides])
    return rc, capsys.readouterr().err


def refused(rc, err):
    """The last stderr line, after checking that the run was refused with it alone."""
    assert rc == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith("flexmol pretrain: "), err[-3000:]
    return line


def _member(shard: Path, index: int) -> tarfile.TarInfo:
    with tarfile.open(shard) as tar:
        return [m for m in tar.getmembers() if m.isfile()][index]


def _overwrite(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def break_record_structure(shard: Path, index: int = 3) -> str:
    """Flip the first bytes of record ``index`` (its msgpack map header): the record no longer
    decodes. The file keeps its size. Returns the record's key."""
    m = _member(shard, index)
    _overwrite(shard, m.offset_data, b"\xc1\xc1\xc1\xc1")
    return m.name.partition(".")[0]


def flip_coordinates(shard: Path, index: int = 3) -> None:
    """Change one byte inside record ``index``'s coordinates: the record still decodes, to another
    (finite) geometry; only the checksum tells."""
    from flexmol.data import schema

    m = _member(shard, index)
    with tarfile.open(shard) as tar:
        data = tar.extractfile(tar.getmember(m.name)).read()
    pos = schema.decode(data)["pos"].tobytes()
    at = data.index(pos) + 1  # low mantissa byte of the first x coordinate
    _overwrite(shard, m.offset_data + at, bytes([data[at] ^ 0x01]))
    with tarfile.open(shard) as tar:
        changed = schema.decode(tar.extractfile(tar.getmember(m.name)).read())["pos"]
    assert changed.tobytes() != pos and (abs(changed) < 1e3).all()


# -- damaged data ----------------------------------------------------------------------------

def test_a_record_with_broken_structure_stops_the_run_with_one_line_naming_shard_and_dataset(dataset, tmp_path,
                                                                                             capsys):
    key = break_record_structure(dataset / "shard-000001.tar")
    rc, err = pretrain(capsys, *TINY, f"data.paired=[{dataset}]", "data.verify_checksums=false",
                       "validation.holdout_shards=0", f"output_dir={tmp_path / 'o'}")
    line = refused(rc, err)
    assert "shard-000001.tar" in line and str(dataset) in line and key in line and "data.paired" in line
    assert "data.on_bad_record=skip" in line


def test_a_record_with_broken_structure_stops_the_run_with_two_loader_workers(dataset, tmp_path, capsys):
    break_record_structure(dataset / "shard-000002.tar")
    rc, err = pretrain(capsys, *TINY, f"data.paired=[{dataset}]", "data.verify_checksums=false",
                       "data.num_workers=2", "validation.holdout_shards=0", f"output_dir={tmp_path / 'o'}")
    assert "shard-000002.tar" in refused(rc, err)


def test_a_record_with_coordinates_that_are_not_numbers_stops_the_run_naming_it(dataset, tmp_path, capsys):
    import numpy as np

    from flexmol.data import schema

    shard = dataset / "shard-000001.tar"
    m = _member(shard, 5)
    with tarfile.open(shard) as tar:
        data = tar.extractfile(tar.getmember(m.name)).read()
    pos = schema.decode(data)["pos"].tobytes()
    _overwrite(shard, m.offset_data + data.index(pos), np.array([np.nan], dtype=np.float32).tobytes())
    rc, err = pretrain(capsys, *TINY, f"data.paired=[{dataset}]", "data.verify_checksums=false",
                       "validation.holdout_shards=0", f"output_dir={tmp_path / 'o'}")
    line = refused(rc, err)
    assert f"shard-000001.tar: record {m.name.partition('.')[0]}: coordinates are not finite" in line


@pytest.mark.parametrize("slot", ["data", "validation"])
def test_flipped_bytes_anywhere_are_refused_at_start_up_naming_the_shard(qm9_small, dataset, tmp_path, capsys, slot):
    flip_coordinates(dataset / "shard-000002.tar")
    if slot == "data":
        where = [f"data.paired=[{dataset}]"]
    else:
        where = [f"data.paired=[{qm9_small}]", f"validation.paired=[{dataset}]"]
    rc, err = pretrain(capsys, *TINY, *where, f"output_dir={tmp_path / 'o'}")  # checksums verified by default
    line = refused(rc, err)
    assert f"'{slot}.paired'" in line and "shard-000002.tar" in line and "sha256" in line and str(dataset) in line
    assert not (tmp_path / "o" / "metrics.jsonl").exists()


@pytest.mark.parametrize("damage", ["deleted", "truncated"])
@pytest.mark.parametrize("slot", ["data", "validation"])
def test_a_deleted_or_truncated_shard_is_refused_at_start_up_naming_it(qm9_small, dataset, tmp_path, capsys, damage,
                                                                       slot):
    shard = dataset / "shard-000001.tar"
    if damage == "deleted":
        shard.unlink()
    else:
        os.truncate(shard, shard.stat().st_size - 1024)
    where = [f"data.paired=[{dataset}]"] if slot == "data" else [f"data.paired=[{qm9_small}]",
                                                                   f"validation.paired=[{dataset}]"]
    rc, err = pretrain(capsys, *TINY, *where, "data.verify_checksums=false", f"output_dir={tmp_path / 'o'}")
    line = refused(rc, err)
    assert f"'{slot}.paired'" in line and "shard-000001.tar" in line and str(dataset) in line
    assert ("missing" if damage == "deleted" else "bytes") in line


def only_shard(dataset: Path, name: str) -> None:
    """Make ``dataset`` a dataset of its shard ``name`` alone (the others deleted, the manifest
    rewritten)."""
    manifest = json.loads((dataset / "manifest.json").read_text())
    for s in manifest["shards"]:
        if s["name"] != name:
            (dataset / s["name"]).unlink()
    manifest["shards"] = [s for s in manifest["shards"] if s["name"] == name]
    (dataset / "manifest.json").write_text(json.dumps(manifest))


def nan_coordinates(shard: Path, index: int) -> str:
    """Overwrite the first coordinate of record ``index`` with NaN: it decodes, its values are
    bad. Returns the record's key."""
    import numpy as np

    from flexmol.data import schema

    m = _member(shard, index)
    with tarfile.open(shard) as tar:
        data = tar.extractfile(tar.getmember(m.name)).read()
    pos = schema.decode(data)["pos"].tobytes()
    _overwrite(shard, m.offset_data + data.index(pos), np.array([np.nan], dtype=np.float32).tobytes())
    return m.name.partition(".")[0]


def test_skip_mode_trains_past_bad_records_and_reports_how_many(dataset, tmp_path, capsys):
    """One shard of 25 records read in order, 3 steps of about 5 molecules: its first read, which
    holds a record that does not decode and one with coordinates that are not numbers, each
    counted once."""
    only_shard(dataset, "shard-000001.tar")
    break_record_structure(dataset / "shard-000001.tar", 3)
    nan_coordinates(dataset / "shard-000001.tar", 7)
    out = tmp_path / "o"
    rc, err = pretrain(capsys, *TINY, f"data.paired=[{dataset}]", "data.verify_checksums=false",
                       "data.on_bad_record=skip", "validation.holdout_shards=0", "train.max_steps=3",
                       "data.shuffle_buffer=0", "data.max_atoms=24", f"output_dir={out}")
    assert rc == 0, err[-3000:]
    train = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in train if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3]
    assert train[-1]["seen"]["paired"] + 2 <= 25  # the shard's first read only
    counts = [r["skipped_records"].get("paired", 0) for r in train]
    assert counts == sorted(counts) and counts[-1] == 2
    assert "skipping bad data" in err and "shard-000001.tar" in err
    assert "data.paired 2" in err


@pytest.mark.parametrize("buffer", [0, 1])
def test_a_shuffle_buffer_of_0_or_1_trains_on_the_records_in_order(qm9_small, tmp_path, capsys, buffer):
    out = tmp_path / "o"
    rc, err = pretrain(capsys, *TINY, f"data.paired=[{qm9_small}]", f"data.shuffle_buffer={buffer}",
                       f"output_dir={out}")
    assert rc == 0, err[-3000:]
    train = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in train if r["split"] == "train"] == [1, 2]


# -- wrong configuration ---------------------------------------------------------------------

@pytest.mark.parametrize("override,key,why", [
    ("train.lr=-0.001", "train.lr", "positive"),
    ("train.lr=0", "train.lr", "positive"),
    ("train.lr=nan", "train.lr", "finite"),
    ("train.grad_accum=0", "train.grad_accum", "at least 1"),
    ("train.warmup_steps=50", "train.warmup_steps", "more than train.max_steps"),
    ("train.warmup_steps=-1", "train.warmup_steps", "at least 0"),
    ("train.min_lr_ratio=1.5", "train.min_lr_ratio", "[0, 1]"),
    ("train.weight_decay=-0.1", "train.weight_decay", "at least 0"),
    ("train.grad_clip=-1", "train.grad_clip", "at least 0"),
    ("train.grad_clip=inf", "train.grad_clip", "finite"),
    ("train.log_every=0", "train.log_every", "at least 1"),
    ("train.save_every=0", "train.save_every", "at least 1"),
    ("train.stop_after=0", "train.stop_after", "at least 1"),
    ("train.seed=-1", "train.seed", "at least 0"),
    ("data.max_atoms=0", "data.max_atoms", "at least 1"),
    ("data.num_workers=-1", "data.num_workers", "at least 0"),
    ("data.shuffle_buffer=-1", "data.shuffle_buffer", "at least 0"),
    ("data.on_bad_record=ignore", "data.on_bad_record", "not one of stop, skip"),
    ("wandb.mode=cloud", "wandb.mode", "not one of offline, online, disabled"),
    ("objective.temperature=nan", "objective.temperature", "finite"),
    ("objective.contrastive=-1", "objective.contrastive", "at least 0"),
    ("data.mix=[{step: 0, weights: {paired: nan}}]", "data.mix", "not a finite number"),
    ("data.mix=[{step: 0, weights: {paired: inf}}]", "data.mix", "not a finite number"),
    ("output_dir=' '", "output_dir", "is empty"),
    ("train.max_nonfinite_steps=0", "train.max_nonfinite_steps", "at least 1"),
    ("data.subset.paired=0", "data.subset.paired", "at least 1"),
    ("data.subset.single_3d=5", "data.subset.single_3d", "data.single_3d gives no dataset"),
    ("data.subset.quad=5", "data.subset.quad", "not a source"),
    ("data.subset_seed=-1", "data.subset_seed", "at least 0"),
])
def test_a_bad_config_value_is_refused_with_one_line_naming_its_key(qm9_small, tmp_path, capsys, override, key, why):
    rc, err = pretrain(capsys, *TINY, f"data.paired=[{qm9_small}]", f"output_dir={tmp_path / 'o'}", override)
    line = refused(rc, err)
    assert f"'{key}'" in line and why in line
    assert not (tmp_path / "o" / "metrics.jsonl").exists()


def test_a_subset_larger_than_its_source_is_refused_at_start_up_naming_the_key(qm9_small, tmp_path, capsys):
    rc, err = pretrain(capsys, *TINY, f"data.paired=[{qm9_small}]", "data.subset.paired=76",
                       f"output_dir={tmp_path / 'o'}")
    line = refused(rc, err)
    assert "'data.subset.paired'" in line and "76 molecules" in line and "hold 75" in line  # one shard held out


def test_a_checkpoint_resumes_only_a_run_that_reads_its_data_alike_and_an_older_format_is_refused(
        qm9_small, tmp_path, capsys):
    import torch

    from flexmol.train.trainer import _checkpoint_globals

    run = [*TINY, f"data.paired=[{qm9_small}]", "train.max_steps=4", f"output_dir={tmp_path / 'o'}"]
    rc, err = pretrain(capsys, *run, "train.stop_after=2")
    assert rc == 0, err[-3000:]
    line = refused(*pretrain(capsys, *run, "resume=auto", "data.shuffle_buffer=7"))
    assert "'data.shuffle_buffer'" in line and "1000" in line and "7" in line and "step-00000002" in line
    # a checkpoint that records its streams as batches taken (no positions) cannot be continued exactly
    states = tmp_path / "o" / "checkpoints" / "step-00000002" / "mp_rank_00_model_states.pt"
    with torch.serialization.safe_globals(_checkpoint_globals()):
        saved = torch.load(states, weights_only=True)
    saved["stream"] = {"step": 2, "taken": {"paired": 2}}
    torch.save(saved, states)
    line = refused(*pretrain(capsys, *run, "resume=auto"))
    assert "'resume'" in line and "batches taken" in line and "init_from=" in line


def test_a_deepspeed_config_that_is_not_json_is_refused_naming_the_key(qm9_small, tmp_path, capsys):
    bad = tmp_path / "zero.json"
    bad.write_text("{stage: 2,")
    rc, err = pretrain(capsys, *TINY, f"data.paired=[{qm9_small}]", f"deepspeed={bad}", f"output_dir={tmp_path / 'o'}")
    line = refused(rc, err)
    assert "'deepspeed'" in line and str(bad) in line


def test_an_output_dir_that_is_a_file_is_refused_naming_key_and_path(qm9_small, tmp_path, capsys):
    taken = tmp_path / "results.txt"
    taken.write_text("not a directory\n")
    for out in (taken, taken / "run"):
        rc, err = pretrain(capsys, *TINY, f"data.paired=[{qm9_small}]", f"output_dir={out}")
        line = refused(rc, err)
        assert "'output_dir'" in line and str(out) in line
    assert taken.read_text() == "not a directory\n"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only directory: nothing to refuse")
def test_an_unwritable_output_dir_is_refused_naming_key_and_path(qm9_small, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        rc, err = pretrain(capsys, *TINY, f"data.paired=[{qm9_small}]", f"output_dir={locked / 'run'}")
        line = refused(rc, err)
        assert "'output_dir'" in line and str(locked / "run") in line and "writable" in line
    finally:
        locked.chmod(0o700)


def test_a_data_directory_that_is_missing_a_file_or_no_dataset_is_refused_naming_key_and_path(qm9_small, tmp_path,
                                                                                             capsys):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_text("{not json")
    cases = {tmp_path / "nowhere": "does not exist", a_file: "is a file", tmp_path: "no manifest.json",
             broken: "unreadable manifest.json"}
    for path, why in cases.items():
        for key, where in (("data.paired", [f"data.paired=[{path}]"]),
                           ("validation.paired", [f"data.paired=[{qm9_small}]", f"validation.paired=[{path}]"])):
            rc, err = pretrain(capsys, *TINY, *where, f"output_dir={tmp_path / 'o'}")
            line = refused(rc, err)
            assert f"'{key}'" in line and str(path) in line and why in line, line


# -- init_from and resume pointing at the wrong thing -----------------------------------------

def test_init_from_garbage_is_refused_with_one_line(qm9_small, tmp_path, capsys):
    garbage = tmp_path / "export"
    garbage.mkdir()
    (garbage / "model.safetensors").write_bytes(b"\x00" * 64)
    rc, err = pretrain(capsys, *TINY, f"data.paired=[{qm9_small}]", f"init_from={garbage}",
                       f"output_dir={tmp_path / 'o'}")
    line = refused(rc, err)
    assert "'init_from'" in line and f"{garbage}: no model.yaml" in line
    (garbage / "model.yaml").write_text("dim: 64\n")
    rc, err = pretrain(capsys, *TINY, f"data.paired=[{qm9_small}]", f"init_from={garbage}",
                       f"output_dir={tmp_path / 'o'}")
    line = refused(rc, err)
    assert "'init_from'" in line and f"{garbage / 'model.safetensors'}: not a readable safetensors file" in line
    a_file = tmp_path / "weights.bin"
    a_file.write_bytes(b"\x00")
    rc, err = pretrain(capsys, *TINY, f"data.paired=[{qm9_small}]", f"init_from={a_file}",
                       f"output_dir={tmp_path / 'o'}")
    assert "'init_from'" in refused(rc, err)


@pytest.mark.slow
def test_init_from_and_resume_of_another_model_size_are_refused_with_one_line(qm9_small, tmp_path, capsys):
    run = tmp_path / "small"
    rc, err = pretrain(capsys, *TINY, f"data.paired=[{qm9_small}]", "model.size=small", "train.max_steps=1",
                       f"output_dir={run}")
    assert rc == 0, err[-3000:]
    rc, err = pretrain(capsys, *TINY, f"data.paired=[{qm9_small}]", f"init_from={run}", f"output_dir={tmp_path / 'o'}")
    line = refused(rc, err)
    assert "'init_from'" in line and "another model" in line
    rc, err = pretrain(capsys, *TINY, f"data.paired=[{qm9_small}]", f"resume={run / 'checkpoints'}",
                       f"output_dir={tmp_path / 'o2'}")
    line = refused(rc, err)
    assert "'resume'" in line and "another model" in line


def test_resume_pointing_at_something_that_is_not_a_checkpoint_is_refused(qm9_small, tmp_path, capsys):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    empty = tmp_path / "empty"
    empty.mkdir()
    for target in (a_file, empty, qm9_small):
        rc, err = pretrain(capsys, *TINY, f"data.paired=[{qm9_small}]", f"resume={target}",
                           f"output_dir={tmp_path / 'o'}")
        line = refused(rc, err)
        assert "'resume'" in line and str(target) in line and "not a checkpoint" in line
    # auto, with a 'latest' naming a checkpoint that is not there
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step-00000007")
    rc, err = pretrain(capsys, *TINY, f"data.paired=[{qm9_small}]", "resume=auto", f"output_dir={tmp_path / 'run'}")
    line = refused(rc, err)
    assert "'resume'" in line and "step-00000007" in line
    # a checkpoint directory whose files are not checkpoints
    fake = tmp_path / "fake" / "step-00000001"
    fake.mkdir(parents=True)
    (fake / "mp_rank_00_model_states.pt").write_bytes(b"not a checkpoint")
    rc, err = pretrain(capsys, *TINY, f"data.paired=[{qm9_small}]", f"resume={fake}", f"output_dir={tmp_path / 'o'}")
    line = refused(rc, err)
    assert "'resume'" in line and str(fake) in line


def test_a_run_whose_losses_stop_being_finite_stops_with_one_line_and_saves_nothing(qm9_small, tmp_path, capsys):
    out = tmp_path / "o"
    rc, err = pretrain(capsys, *TINY, f"data.paired=[{qm9_small}]", "train.lr=1e30", "train.max_steps=8",
                       "train.save_every=1", f"output_dir={out}")
    assert rc == 1 and "Traceback" not in err, err[-3000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith("flexmol pretrain: steps ") and "loss/total not finite 3 step(s) in a row" in line
    assert "train.lr" in line and "train.max_nonfinite_steps" in line
    train = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    last = train[-1]["step"]
    assert last < 8 and train[-1]["loss/total"] != train[-1]["loss/total"]  # NaN, logged
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step-{last - 3:08d}"


def test_init_from_an_export_with_altered_weights_is_refused_naming_the_file(qm9_small, tmp_path, capsys):
    from flexmol import save_pretrained
    from flexmol.model import FlexMol
    from flexmol.model.summary import model_config

    export = save_pretrained(FlexMol(model_config("tiny")), tmp_path / "stage1" / "export")
    weights = export / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x10  # inside a tensor: safetensors would read it without a word
    weights.write_bytes(bytes(data))
    rc, err = pretrain(capsys, *TINY, f"data.paired=[{qm9_small}]", f"init_from={tmp_path / 'stage1'}",
                       f"output_dir={tmp_path / 'o'}")
    line = refused(rc, err)
    assert "'init_from'" in line and str(weights) in line and "sha256" in line
    assert line.startswith(f"flexmol pretrain: config key 'init_from': {weights}: checksum mismatch"), line
    assert line.count(str(weights)) == 1 and "not a readable" not in line


def test_init_from_an_export_with_weights_that_are_not_numbers_is_refused_naming_tensor_and_file(
        qm9_small, tmp_path, capsys):
    import torch

    from flexmol import save_pretrained
    from flexmol.model import FlexMol
    from flexmol.model.summary import model_config

    model = FlexMol(model_config("tiny"))
    name, weight = next((k, v) for k, v in model.state_dict().items() if v.is_floating_point())
    with torch.no_grad():
        weight.view(-1)[0] = float("nan")
    export = save_pretrained(model, tmp_path / "stage1" / "export")  # checksums of the NaN: they verify
    rc, err = pretrain(capsys, *TINY, f"data.paired=[{qm9_small}]", f"init_from={tmp_path / 'stage1'}",
                       f"output_dir={tmp_path / 'o'}")
    line = refused(rc, err)
    assert f"'init_from': {export / 'model.safetensors'}: 1 tensor(s) hold NaN" in line and name in line


def test_init_from_an_export_without_checksums_trains_with_one_warning_line(qm9_small, tmp_path, capsys):
    from flexmol import save_pretrained
    from flexmol.model import FlexMol
    from flexmol.model.summary import model_config

    export = save_pretrained(FlexMol(model_config("tiny")), tmp_path / "stage1" / "export")
    (export / "checksums.json").unlink()
    rc, err = pretrain(capsys, *TINY, f"data.paired=[{qm9_small}]", f"init_from={tmp_path / 'stage1'}",
                       "train.max_steps=1", f"output_dir={tmp_path / 'o'}")
    assert rc == 0, err[-3000:]
    said = [line for line in err.splitlines() if "unverified" in line]
    assert len(said) == 1 and said[0].startswith(f"[pretrain] warning: config key 'init_from': {export} has no "
                                                  "checksums.json"), err[-3000:]


def test_a_model_too_large_for_this_machine_is_refused_naming_model_size(qm9_small, tmp_path, capsys):
    huge = tmp_path / "huge.yaml"
    huge.write_text("dim: 1000000\nheads: 1\n")
    rc, err = pretrain(capsys, *TINY, f"data.paired=[{qm9_small}]", f"model.size={huge}",
                       f"output_dir={tmp_path / 'o'}")
    line = refused(rc, err)
    assert "'model.size'" in line and "parameters" in line
