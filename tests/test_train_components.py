"""The pre-training loop's parts, each alone: the objective registry, the data mix and its streams'
state, the checkpointer, the metrics log. On real QM9 shards, with the tiny model."""
import json
import os

import pytest
import torch

from flexmol import config
from flexmol.config import ConfigError
from flexmol.featurize import run_featurize

os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture(scope="module")
def qm9_shards(tmp_path_factory, qm9_rows):
    """60 QM9 molecules, paired, in 3 shards of 20."""
    out = tmp_path_factory.mktemp("components") / "qm9"
    run_featurize(config.build(config.FeaturizeConfig, {
        "source": "qm9", "out": str(out), "modality": "paired", "limit": 60,
        "job": {"executor": "serial", "shard_size": 20, "progress": False}}), log=lambda m: None)
    return out


@pytest.fixture(scope="module")
def nci_2d(tmp_path_factory, nci_smi):
    """60 NCI molecules as 2D records, in 2 shards."""
    from conftest import nci_2d_dataset

    return nci_2d_dataset(tmp_path_factory.mktemp("components"), nci_smi, 60)


def load(*overrides):
    from flexmol.train import config as tc

    return tc.load(None, ["wandb.mode=disabled", "data.num_workers=0", "data.max_atoms=160", *overrides])


@pytest.fixture(scope="module")
def tiny():
    from flexmol.model.summary import build_model, model_config

    torch.manual_seed(0)
    return build_model(model_config("tiny"), "model")


# -- source names --------------------------------------------------------------------------------

def test_source_names_are_defined_once_and_every_config_section_and_stream_follows_them():
    import dataclasses

    from flexmol.data import streams
    from flexmol.data.integrity import MODALITY_OF_SOURCE
    from flexmol.scaling import spec
    from flexmol.train import config as tc

    assert tc.SOURCES == tuple(MODALITY_OF_SOURCE) == spec.SOURCES
    assert set(streams.SOURCES) == set(tc.SOURCES)
    for section in (tc.DataSection, tc.ValidationSection):
        assert set(tc.SOURCES) <= {f.name for f in dataclasses.fields(section)}
    assert {f"data.{s}" for s in tc.SOURCES} | {f"validation.{s}" for s in tc.SOURCES} <= set(tc.PATH_KEYS)


# -- the objective registry ----------------------------------------------------------------------

def test_the_recipe_key_chooses_the_objective_and_the_stage_chooses_flexmols(qm9_shards, tmp_path, monkeypatch):
    import flexmol.objectives.m2umol as m2umol
    from flexmol.objectives import FlexMolObjective, build_objective

    one = build_objective(load(f"data.paired=[{qm9_shards}]"))
    two = build_objective(load(f"data.paired=[{qm9_shards}]", "stage=2", f"init_from={tmp_path}"))
    assert isinstance(one, FlexMolObjective) and (one.name, one.stage, two.stage) == ("flexmol", 1, 2)
    m2u = build_objective(load(f"data.paired=[{qm9_shards}]", "recipe=m2umol", 'm2umol.modalities={"3d": {"kind": '
                               '"conformer"}}'))
    # what the progress bar says: M2UMol has no stages
    assert (one.title, two.title, m2u.title) == ("flexmol stage 1", "flexmol stage 2", "m2umol")

    class Recorded:
        def __init__(self, cfg):
            self.cfg = cfg

    monkeypatch.setattr(m2umol, "validate_config", lambda section: None)
    monkeypatch.setattr(m2umol, "M2UMolObjective", Recorded, raising=False)
    cfg = load(f"data.paired=[{qm9_shards}]", "recipe=m2umol")
    got = build_objective(cfg)
    assert isinstance(got, Recorded) and got.cfg is cfg  # the whole config, m2umol section included


def test_an_unknown_recipe_is_refused_naming_the_key(qm9_shards):
    from flexmol.objectives import build_objective

    with pytest.raises(ConfigError, match=r"config key 'recipe': 'unimol' is not one of flexmol, m2umol"):
        load(f"data.paired=[{qm9_shards}]", "recipe=unimol")
    with pytest.raises(ConfigError, match=r"config key 'stage': 2: the m2umol recipe has no stages"):
        load(f"data.paired=[{qm9_shards}]", "recipe=m2umol", 'm2umol.modalities={"3d": {"kind": "conformer"}}',
             "stage=2", f"init_from={qm9_shards}")
    cfg = load(f"data.paired=[{qm9_shards}]")
    cfg.recipe = "unimol"  # past validation, the registry still refuses it
    with pytest.raises(ConfigError, match=r"config key 'recipe'"):
        build_objective(cfg)


def test_stage_two_freezes_exactly_the_feature_learners_and_owns_the_pretraining_heads(tiny):
    from flexmol.objectives import FlexMolObjective, ObjectiveConfig

    learners = {id(p) for m in (tiny.fl_2d, tiny.fl_3d) for p in m.parameters()}
    frozen = FlexMolObjective(ObjectiveConfig(), stage=2).frozen(tiny)
    assert learners and {id(p) for p in frozen.values()} == learners
    assert FlexMolObjective(ObjectiveConfig(), stage=1).frozen(tiny) == {}
    heads = FlexMolObjective(ObjectiveConfig(), stage=1).owned(tiny)
    assert heads["atom_head"] is tiny.atom_head and heads["proj_2d"] is tiny.proj_2d
    named = dict(tiny.named_modules())
    assert all(named[name] is module for name, module in heads.items())


def test_held_out_scoring_never_gathers_negatives_and_keeps_the_stage(qm9_shards, tmp_path):
    from flexmol.objectives import build_objective
    from flexmol.objectives.losses import gather_mode

    cfg = load(f"data.paired=[{qm9_shards}]", "stage=2", f"init_from={tmp_path}", "objective.gather_negatives=on")
    objective = build_objective(cfg)
    held = objective.heldout()
    assert (held.cfg.gather_negatives, held.stage, held.cfg.temperature) == ("off", 2, objective.cfg.temperature)
    assert gather_mode(objective.cfg.gather_negatives) == "on"


# -- the data mix --------------------------------------------------------------------------------

class PairedOnly:
    """An objective that trains on paired molecules only."""

    name = "paired-only"
    modalities = frozenset({"paired"})


class TwoDOnly:
    name = "2d-only"
    modalities = frozenset({"2d"})


def test_a_mix_drawing_a_modality_the_objective_does_not_train_on_is_refused_naming_source_and_objective(qm9_shards,
                                                                                                      nci_2d):
    from flexmol.train.data import TrainingData

    data = TrainingData(load(f"data.paired=[{qm9_shards}]"))
    data.check_modalities(PairedOnly())
    with pytest.raises(ConfigError, match=r"config key 'data.mix': draws data.paired \(paired molecules\), but the "
                                          r"2d-only objective trains on 2d only"):
        data.check_modalities(TwoDOnly())
    # a source it does not draw is refused all the same: its held-out molecules would be scored
    with pytest.raises(ConfigError, match=r"config key 'validation.single_2d': holds 2d molecules, but the "
                                          r"paired-only objective trains on paired only"):
        TrainingData(load(f"data.paired=[{qm9_shards}]", f"validation.single_2d=[{nci_2d}]")
                     ).check_modalities(PairedOnly())
    with pytest.raises(ConfigError, match=r"config key 'data.single_2d': holds 2d molecules \(held out for "
                                          r"validation\), but the paired-only objective"):
        TrainingData(load(f"data.paired=[{qm9_shards}]", f"data.single_2d=[{nci_2d}]")).check_modalities(PairedOnly())


def test_the_trainer_refuses_such_a_mix_before_it_starts(qm9_shards, tmp_path, monkeypatch, capsys):
    from flexmol.train import trainer
    from flexmol.train.cli import main

    monkeypatch.setattr(trainer, "build_objective", lambda cfg: TwoDOnly())
    rc = main(["--config", "stage1", f"data.paired=[{qm9_shards}]", "wandb.mode=disabled",
               f"output_dir={tmp_path / 'o'}"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "data.paired" in err and "2d-only objective" in err.strip().splitlines()[-1]
    assert not (tmp_path / "o").exists()  # refused before anything was made


def test_samples_for_prepare_are_an_equal_share_of_every_training_shards_first_records(qm9_shards):
    """QM9 is stored smallest molecules first: statistics from the first shard alone (CH4, NH3,
    H2O, ...) would not describe the data, so every training shard gives its share."""
    from flexmol.data.streams import heldout_records
    from flexmol.train.data import TrainingData

    data = TrainingData(load(f"data.paired=[{qm9_shards}]"))
    urls = data.sources["paired"]
    assert len(urls) == 2  # 3 shards, the last held out
    got = data.samples(6)
    share = [r["id"] for u in urls for r in heldout_records([u], 3)]
    assert list(got) == ["paired"] and [r["id"] for r in got["paired"]] == share
    assert data.samples(0) == {"paired": []}


def _opened(cfg, labels=()):
    from flexmol.train.data import TrainingData

    data = TrainingData(cfg)
    data.open(world=1, step=0, max_spd=8, max_path=5, labels=labels)
    return data


def test_the_streams_state_round_trips_so_a_resumed_stream_continues_where_the_first_stood(qm9_shards):
    cfg = load(f"data.paired=[{qm9_shards}]", "validation.holdout_shards=0", "data.shuffle_buffer=7")
    first = _opened(cfg)
    for _ in range(3):
        next(first.stream)
    first.count({"paired": 30}, {"paired": 0}, {"paired": [1.0, 2.0, 3.0, 4.0, 5.0]})
    state = json.loads(json.dumps({k: v for k, v in first.state_dict().items() if k != "coverage"}))
    state["coverage"] = first.state_dict()["coverage"]
    resumed = _opened(cfg)
    resumed.load_state_dict(state, "ckpt", rank=0, step=3)
    assert resumed.stream.step == 3 and resumed.seen == {"paired": 30} and resumed.work["paired"]["atoms"] == 1
    assert resumed.seen_report()["paired"]["unique"] == first.seen_report()["paired"]["unique"] > 0
    for _ in range(4):
        a, b = next(first.stream), next(resumed.stream)
        assert a[:2] == b[:2] and a[2]["records"].tolist() == b[2]["records"].tolist()
    # a run reading the data otherwise is refused, naming the key that differs
    other = _opened(load(f"data.paired=[{qm9_shards}]", "validation.holdout_shards=0", "data.shuffle_buffer=9"))
    with pytest.raises(ConfigError, match=r"config key 'data.shuffle_buffer': checkpoint ckpt was written with "
                                          r"data.shuffle_buffer 7, this run has 9"):
        other.load_state_dict(state, "ckpt", rank=0, step=3)


def test_batches_carry_the_labels_the_objective_asks_for_and_only_then(qm9_shards):
    cfg = load(f"data.paired=[{qm9_shards}]")
    batch = next(_opened(cfg, labels=["homo", "gap"]).stream)[2]
    assert batch["labels"].shape == (batch["mask"].shape[0], 2) and torch.isfinite(batch["labels"]).all()
    assert "labels" not in next(_opened(cfg).stream)[2]


# -- the checkpointer ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def engines():
    """Two DeepSpeed engines over a small linear model (the second to load into)."""
    import deepspeed

    from flexmol.train.checkpoint import weights_only_engine
    from flexmol.train.trainer import _single_process_env

    _single_process_env()
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="gloo")
    ds = {"train_micro_batch_size_per_gpu": 1, "train_batch_size": torch.distributed.get_world_size(),
          "zero_optimization": {"stage": 0}}
    out = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = torch.nn.Linear(4, 3)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        engine = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), optimizer=opt,
                                      config=ds)[0]
        engine.checkpoint_engine = weights_only_engine(engine.checkpoint_engine)
        out.append(engine)
    return out


def test_the_checkpointer_saves_and_loads_the_client_state_and_resumes_the_latest(engines, tmp_path):
    from flexmol.train.checkpoint import Checkpointer

    saving, loading = engines
    keeper = Checkpointer(tmp_path, "auto", "tiny")
    assert keeper.resume_target() is None and keeper.saved_step() == "the start (no checkpoint)"
    client = {"step": 7, "stream": {"step": 14, "ranks": [{"paired": {"taken": 14, "positions": [[1, 3]]}}]},
              "coverage": {"paired": torch.tensor([5, 0, 9], dtype=torch.uint8)}, "seen": {"paired": 70}}
    keeper.save(saving, 4, {**client, "step": 4})
    keeper.save(saving, 7, client)
    target = keeper.resume_target()
    assert target == (tmp_path / "checkpoints", "step-00000007") and keeper.saved_step().endswith("step-00000007")
    got = Checkpointer(tmp_path, "auto", "tiny").load(loading, *target)
    assert {k: got[k] for k in ("step", "stream", "seen")} == {k: client[k] for k in ("step", "stream", "seen")}
    assert torch.equal(got["coverage"]["paired"], client["coverage"]["paired"])
    assert torch.equal(loading.module.weight, saving.module.weight)
    # resume naming an earlier checkpoint directory, or the run's output_dir
    assert Checkpointer(tmp_path, str(tmp_path / "checkpoints" / "step-00000004"), "tiny").resume_target() == \
        (tmp_path / "checkpoints", "step-00000004")
    assert Checkpointer(tmp_path / "elsewhere", str(tmp_path), "tiny").resume_target() == target


def test_the_checkpointer_refuses_what_is_not_a_checkpoint_of_this_trainer_naming_resume(engines, tmp_path):
    from flexmol.train.checkpoint import Checkpointer

    saving, loading = engines
    with pytest.raises(ConfigError, match=r"config key 'resume': .* is not a checkpoint"):
        Checkpointer(tmp_path, str(tmp_path), "tiny").resume_target()
    keeper = Checkpointer(tmp_path, "auto", "tiny")
    keeper.save(saving, 1, {"step": 1, "stream": {"step": 1, "taken": 1}})  # streams' state as batches taken
    with pytest.raises(ConfigError, match=r"config key 'resume': .* holds its streams' state as batches taken"):
        keeper.load(loading, *keeper.resume_target())
    (tmp_path / "checkpoints" / "latest").write_text("step-00000099")
    with pytest.raises(ConfigError, match=r"config key 'resume': auto: .* names 'step-00000099', which is not a "
                                          r"checkpoint"):
        keeper.resume_target()


# -- the metrics log -----------------------------------------------------------------------------

def _write(path, records, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


def _steps(path):
    return [(r["split"], r["step"]) for r in map(json.loads, path.read_text().splitlines())]


RECORDS = [{"split": "train", "step": s} for s in range(1, 7)] + [{"split": "valid", "step": s} for s in (2, 4, 6)] \
    + [{"split": "alignment", "step": 6}]


def test_a_resumed_run_drops_the_records_after_its_checkpoint_and_a_line_cut_by_a_kill(tmp_path, capsys):
    from flexmol.train.metrics import MetricsLogger

    log = MetricsLogger(tmp_path)
    _write(log.path, sorted(RECORDS, key=lambda r: r["step"]), tail='{"split": "train", "st')
    log.trim(4, resumed=True, closing=False)
    assert _steps(log.path) == [("train", 1), ("train", 2), ("valid", 2), ("train", 3), ("train", 4), ("valid", 4)]
    assert "resuming at step 4: 5 record(s) of later steps dropped" in capsys.readouterr().out
    log.log({"split": "train", "step": 5, "loss/total": 1.5})
    assert _steps(log.path)[-1] == ("train", 5)


def test_a_run_resumed_to_close_drops_that_steps_closing_records_only(tmp_path):
    from flexmol.train.metrics import MetricsLogger

    log = MetricsLogger(tmp_path)
    _write(log.path, RECORDS)
    log.trim(6, resumed=True, closing=True)
    assert _steps(log.path) == [("train", s) for s in range(1, 7)] + [("valid", 2), ("valid", 4)]


def test_a_run_started_afresh_sets_the_earlier_records_aside(tmp_path):
    from flexmol.train.metrics import MetricsLogger

    log = MetricsLogger(tmp_path)
    _write(log.path, RECORDS)
    before = log.path.read_text()
    log.trim(0, resumed=False, closing=False)
    aside = list(tmp_path.glob("metrics.before-*.jsonl"))
    assert not log.path.exists() and len(aside) == 1 and aside[0].read_text() == before


# -- validation on held-out data -----------------------------------------------------------------

class AtomsObjective:
    """Losses that are batch statistics: ``total`` the mean atom count of a batch's molecules, and
    ``big`` the same, given only by batches of more than ``threshold`` molecules."""

    name = "atoms"
    modalities = frozenset({"paired"})
    threshold = 0

    def heldout(self):
        return self

    def losses(self, model, batch, generator=None):
        atoms = batch["num_atoms"].double().mean()
        out = {"total": atoms + 0 * model.weight.sum()}
        if batch["mask"].shape[0] > self.threshold:
            out["big"] = atoms
        return out


def test_held_out_losses_average_each_loss_over_the_molecules_of_the_batches_that_gave_it(qm9_shards):
    from types import SimpleNamespace

    from flexmol.train.validation import Validator

    cfg = load(f"data.paired=[{qm9_shards}]", "data.max_atoms=100", "validation.max_molecules=40")
    model = torch.nn.Linear(1, 1)
    model.cfg = SimpleNamespace(max_spd=8, max_path=5)
    objective = AtomsObjective()
    validator = Validator(cfg, {"paired": [str(p) for p in sorted(qm9_shards.glob("shard-*.tar"))]}, objective)
    batches = validator.batches(model)["paired"]
    sizes = [b["mask"].shape[0] for b in batches]
    atoms = [b["num_atoms"].double().sum().item() for b in batches]
    objective.threshold = min(sizes)
    assert max(sizes) > objective.threshold  # batches with and without "big"
    record = validator.evaluate(model, 3, device=torch.device("cpu"))
    assert record["split"] == "valid" and record["step"] == 3 and record["valid/paired/molecules"] == sum(sizes) == 40
    assert record["valid/paired/total"] == pytest.approx(sum(atoms) / 40)
    big = [(a, n) for a, n in zip(atoms, sizes) if n > objective.threshold]
    assert record["valid/paired/big"] == pytest.approx(sum(a for a, _ in big) / sum(n for _, n in big))
