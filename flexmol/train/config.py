"""The pre-training configuration: one tree for both recipes and both stages, overridable as
``key=value``.

Keys others rely on: ``recipe``, ``model.size``, ``data.paired``, ``data.single_2d``,
``data.single_3d`` (one key per source of :data:`SOURCES`), ``train.max_steps``, ``output_dir``,
``resume``, ``init_from``.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from flexmol import config
from flexmol.config import ConfigError
from flexmol.data.integrity import MODALITY_OF_SOURCE
from flexmol.objectives import RECIPES, ObjectiveConfig
from flexmol.objectives.m2umol import M2UMolConfig

# The training sources (a key each in the data and validation sections) and the batch modality of
# each: defined once, in flexmol.data.integrity.
SOURCES = tuple(MODALITY_OF_SOURCE)


@dataclass
class ModelSection:
    size: str = "tiny"  # a packaged preset (tiny, small, base: flexmol/configs/model) or a model YAML


@dataclass
class MixPointConfig:
    step: int = 0
    # Empty by default: OmegaConf merges a YAML point into this default, so a non-empty default
    # would add its sources to every point a user writes.
    weights: Dict[str, float] = field(default_factory=dict)


@dataclass
class DataSection:
    paired: List[str] = field(default_factory=list)  # dataset directories (flexmol featurize outputs)
    single_2d: List[str] = field(default_factory=list)
    single_3d: List[str] = field(default_factory=list)
    max_atoms: int = 2048  # padded atoms per batch
    num_workers: int = 2  # loader workers per source
    # Records of a shard visit are read in blocks of this many positions, each block in a seeded
    # random order (flexmol/data/streams.py); 0 or 1: in order.
    shuffle_buffer: int = 1000
    # Nested data for data-scaling studies: per source, train on the first D molecules of a fixed
    # permutation of its training records (e.g. {single_2d: 100000}), which depends on the data and
    # subset_seed only: every run of a study sees the same D molecules, and a smaller D's are among
    # a larger D's. No copy of the shards is made. A source not named trains on all its records.
    subset: Dict[str, int] = field(default_factory=dict)
    subset_seed: int = 0
    # sha256 of every shard against its manifest at start-up (sizes are always checked). About a
    # second per GB, shared by the ranks (measured: flexmol/data/integrity.py); false skips it.
    verify_checksums: bool = True
    # A record that does not decode or a shard that ends early while training: stop (one line naming
    # the dataset, shard and record; exit 2) | skip (dropped, counted in metrics.jsonl's
    # skipped_records per source).
    on_bad_record: str = "stop"
    # Source weights by step: piecewise linear between points, constant after the last.
    mix: List[MixPointConfig] = field(default_factory=lambda: [MixPointConfig(0, {"paired": 1.0})])


@dataclass
class TrainSection:
    max_steps: int = 1000
    lr: float = 1e-4
    warmup_steps: Optional[int] = None  # linear warm-up; unset: a tenth of max_steps
    decay: str = "cosine"  # cosine | linear | constant, from the end of warm-up to max_steps
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    grad_accum: int = 1
    precision: str = "fp32"  # fp32 | bf16
    seed: int = 0
    log_every: int = 10
    save_every: int = 500
    # Optimizer steps in a row whose loss is not finite before the run stops (exit 1, nothing saved
    # after the last checkpoint). DeepSpeed skips the update of such a step, so a rare bad batch
    # passes; a diverged run does not. 1: stop at the first.
    max_nonfinite_steps: int = 3
    # Stop (and checkpoint) at this step although max_steps is further: a run cut into chunks by a
    # scheduler's time limit, exactly like a preempted one. The LR schedule follows max_steps.
    stop_after: Optional[int] = None


@dataclass
class ValidationSection:
    """Held-out data per source, evaluated inside the loop (every loss by name)."""

    every: int = 100  # optimizer steps between evaluations; 0: only at the end of the run
    # Held-out dataset directories per source. A source without one holds out the last
    # ``holdout_shards`` shards of its training data (when it has more shards than that).
    paired: List[str] = field(default_factory=list)
    single_2d: List[str] = field(default_factory=list)
    single_3d: List[str] = field(default_factory=list)
    holdout_shards: int = 1
    max_molecules: int = 1000  # per source, the first ones of the held-out shards
    # At the end of the stage, the alignment report (retrieval, cosines, feature-learner and
    # decoder errors) on this many held-out paired molecules; 0 turns it off.
    alignment_count: int = 500


@dataclass
class WandbSection:
    mode: str = "offline"  # offline | online | disabled
    project: str = "flexmol"


@dataclass
class PretrainConfig:
    recipe: str = "flexmol"  # flexmol (stages 1 and 2: the objective section) | m2umol (the m2umol section)
    stage: int = 1
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    m2umol: M2UMolConfig = field(default_factory=M2UMolConfig)
    validation: ValidationSection = field(default_factory=ValidationSection)
    wandb: WandbSection = field(default_factory=WandbSection)
    deepspeed: str = "zero2"  # a packaged ZeRO config (zero1, zero2, zero3: flexmol/configs/deepspeed) or a JSON path
    output_dir: str = "outputs/pretrain"
    resume: str = "none"  # none | auto (latest checkpoint in output_dir) | a checkpoint path
    init_from: Optional[str] = None  # stage 2: the stage-1 checkpoint or export to start from


# Keys naming files or directories: in a config file, a relative value resolves against the file's
# directory when it exists there (flexmol.config.load_file); on the command line, against the
# working directory. model.size and deepspeed also take the name of a packaged config.
PATH_KEYS = (*(f"{section}.{source}" for section in ("data", "validation") for source in SOURCES), "init_from",
             "resume")
NAME_KEYS = ("model.size", "deepspeed")


def load(path: str | Path | None, overrides: Optional[List[str]] = None) -> PretrainConfig:
    """``path``: a YAML file, the name of a packaged stage config (stage1, stage2), or None (defaults)."""
    if path is not None and config.is_name(path):
        path = config.resolve_resource("pretrain", path, key="--config")
    source = None if path is None else config.load_file(path, PATH_KEYS, NAME_KEYS)
    cfg = config.build(PretrainConfig, source, overrides=overrides)
    if cfg.train.warmup_steps is None:
        cfg.train.warmup_steps = warmup_steps(cfg.train)
    resolve_paths(cfg)
    validate(cfg)
    return cfg


def warmup_steps(t: TrainSection) -> int:
    """``train.warmup_steps``, or a tenth of ``train.max_steps`` when it is unset."""
    return t.warmup_steps if t.warmup_steps is not None else t.max_steps // 10


def resolve_paths(cfg: PretrainConfig) -> None:
    """``cfg.deepspeed`` becomes the absolute path of its JSON (a packaged name or a file)."""
    cfg.deepspeed = str(config.resolve_resource("deepspeed", cfg.deepspeed, key="deepspeed"))


def validate(cfg: PretrainConfig) -> None:
    """Checks that need no data and no devices; the trainer checks the datasets themselves."""
    def fail(key, why):
        raise ConfigError(f"config key '{key}': {why}")

    def finite(key, value):
        if not math.isfinite(value):
            fail(key, f"must be a finite number, got {value}")

    def at_least(key, value, low):
        if value < low:
            fail(key, f"must be at least {low}, got {value}")

    if cfg.recipe not in RECIPES:
        fail("recipe", f"'{cfg.recipe}' is not one of {', '.join(RECIPES)}")
    if cfg.recipe == "m2umol":
        from flexmol.objectives.m2umol import validate_config

        validate_config(cfg.m2umol)
        if cfg.stage != 1:
            fail("stage", f"{cfg.stage}: the m2umol recipe has no stages (stage is FlexMol's); leave it at 1")
    if cfg.stage not in (1, 2):
        fail("stage", "must be 1 or 2")
    if cfg.stage == 2 and not cfg.init_from:
        fail("init_from", "stage 2 starts from a stage-1 checkpoint: set init_from=DIR")
    t = cfg.train
    if t.precision not in ("fp32", "bf16"):
        fail("train.precision", f"'{t.precision}' is not one of fp32, bf16 (fp16 is refused on CPU)")
    if t.decay not in ("cosine", "linear", "constant"):
        fail("train.decay", f"'{t.decay}' is not one of cosine, linear, constant")
    for key in ("max_steps", "grad_accum", "log_every", "save_every", "max_nonfinite_steps"):
        at_least(f"train.{key}", getattr(t, key), 1)
    if t.stop_after is not None:
        at_least("train.stop_after", t.stop_after, 1)
    at_least("train.seed", t.seed, 0)
    warmup = warmup_steps(t)
    at_least("train.warmup_steps", warmup, 0)
    if warmup > t.max_steps:
        fail("train.warmup_steps", f"{warmup} is more than train.max_steps ({t.max_steps}): the learning rate would "
                                   "never reach train.lr (unset, it is a tenth of max_steps)")
    for key in ("lr", "min_lr_ratio", "weight_decay", "grad_clip"):
        finite(f"train.{key}", getattr(t, key))
    if t.lr <= 0:
        fail("train.lr", f"must be positive, got {t.lr}")
    if not 0 <= t.min_lr_ratio <= 1:
        fail("train.min_lr_ratio", f"must be in [0, 1], got {t.min_lr_ratio}")
    for key in ("weight_decay", "grad_clip"):
        at_least(f"train.{key}", getattr(t, key), 0)
    from flexmol.objectives import validate_objective

    try:
        validate_objective(cfg.objective)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    for f in dataclasses.fields(cfg.objective):
        value = getattr(cfg.objective, f.name)
        if isinstance(value, float):
            finite(f"objective.{f.name}", value)
            at_least(f"objective.{f.name}", value, 0)
    d = cfg.data
    at_least("data.max_atoms", d.max_atoms, 1)
    at_least("data.num_workers", d.num_workers, 0)
    at_least("data.shuffle_buffer", d.shuffle_buffer, 0)
    at_least("data.subset_seed", d.subset_seed, 0)
    for key, size in d.subset.items():
        if key not in SOURCES:
            fail(f"data.subset.{key}", f"is not a source ({', '.join(SOURCES)})")
        if not getattr(d, key):
            fail(f"data.subset.{key}", f"data.{key} gives no dataset to take a subset of")
        at_least(f"data.subset.{key}", size, 1)
    from flexmol.data.integrity import ON_BAD_RECORD

    if d.on_bad_record not in ON_BAD_RECORD:
        fail("data.on_bad_record", f"'{d.on_bad_record}' is not one of {', '.join(ON_BAD_RECORD)}")
    v = cfg.validation
    for key in ("every", "holdout_shards", "max_molecules", "alignment_count"):
        if getattr(v, key) < 0:
            fail(f"validation.{key}", f"must be 0 or more, got {getattr(v, key)}")
    if cfg.wandb.mode not in ("offline", "online", "disabled"):
        fail("wandb.mode", f"'{cfg.wandb.mode}' is not one of offline, online, disabled")
    if not cfg.output_dir.strip():
        fail("output_dir", "is empty (the run's directory: checkpoints, export, metrics.jsonl)")
    if cfg.init_from is not None and not str(cfg.init_from).strip():
        fail("init_from", "is empty (a stage-1 output_dir, its export/ or checkpoints/, or null)")
    if cfg.resume not in ("none", "auto") and not Path(cfg.resume).exists():
        fail("resume", f"{cfg.resume} does not exist (none, auto or a checkpoint path)")
    if not any(getattr(d, key) for key in SOURCES):
        fail(f"data.{SOURCES[0]}", f"no dataset given ({', '.join(f'data.{key}' for key in SOURCES)})")
    for key in SOURCES:
        for section, dirs in (("data", getattr(d, key)), ("validation", getattr(v, key))):
            if any(not str(x).strip() for x in dirs):
                fail(f"{section}.{key}", "holds an empty path")
    from flexmol.data.streams import MixingSchedule, MixPoint

    available = [k for k in SOURCES if getattr(d, k)]
    for i, p in enumerate(d.mix):
        for name, w in p.weights.items():
            if not math.isfinite(w):
                fail("data.mix", f"point {i} (step {p.step}): weight of {name} is {w}, not a finite number")
    try:
        MixingSchedule([MixPoint(p.step, dict(p.weights)) for p in d.mix], available)
    except ValueError as exc:
        fail("data.mix", str(exc))
    try:
        ds = json.loads(Path(cfg.deepspeed).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        fail("deepspeed", f"{cfg.deepspeed} is not a readable JSON file ({str(exc).splitlines()[0]})")
    if not isinstance(ds, dict):
        fail("deepspeed", f"{cfg.deepspeed} does not hold a JSON object")
    from flexmol.model.summary import model_config

    model_config(cfg.model.size)
