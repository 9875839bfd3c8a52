"""The pre-training configuration: one tree for both stages, overridable as ``key=value``.

Keys others rely on: ``model.size``, ``data.paired``, ``data.single_2d``, ``data.single_3d``,
``train.max_steps``, ``output_dir``, ``resume``, ``init_from``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from flexmol import config
from flexmol.config import ConfigError
from flexmol.objectives import ObjectiveConfig


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
    shuffle_buffer: int = 1000
    # Source weights by step: piecewise linear between points, constant after the last.
    mix: List[MixPointConfig] = field(default_factory=lambda: [MixPointConfig(0, {"paired": 1.0})])


@dataclass
class TrainSection:
    max_steps: int = 1000
    lr: float = 1e-4
    warmup_steps: int = 100
    decay: str = "cosine"  # cosine | linear | constant, from the end of warm-up to max_steps
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    grad_accum: int = 1
    precision: str = "fp32"  # fp32 | bf16
    seed: int = 0
    log_every: int = 10
    save_every: int = 500
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
    stage: int = 1
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    validation: ValidationSection = field(default_factory=ValidationSection)
    wandb: WandbSection = field(default_factory=WandbSection)
    deepspeed: str = "zero2"  # a packaged ZeRO config (zero1, zero2, zero3: flexmol/configs/deepspeed) or a JSON path
    output_dir: str = "outputs/pretrain"
    resume: str = "none"  # none | auto (latest checkpoint in output_dir) | a checkpoint path
    init_from: Optional[str] = None  # stage 2: the stage-1 checkpoint or export to start from


# Keys naming files or directories: in a config file, a relative value resolves against the file's
# directory when it exists there (flexmol.config.load_file); on the command line, against the
# working directory. model.size and deepspeed also take the name of a packaged config.
PATH_KEYS = ("data.paired", "data.single_2d", "data.single_3d", "validation.paired", "validation.single_2d",
             "validation.single_3d", "init_from", "resume")
NAME_KEYS = ("model.size", "deepspeed")


def load(path: str | Path | None, overrides: Optional[List[str]] = None) -> PretrainConfig:
    """``path``: a YAML file, the name of a packaged stage config (stage1, stage2), or None (defaults)."""
    if path is not None and config.is_name(path):
        path = config.resolve_resource("pretrain", path, key="--config")
    source = None if path is None else config.load_file(path, PATH_KEYS, NAME_KEYS)
    cfg = config.build(PretrainConfig, source, overrides=overrides)
    resolve_paths(cfg)
    validate(cfg)
    return cfg


def resolve_paths(cfg: PretrainConfig) -> None:
    """``cfg.deepspeed`` becomes the absolute path of its JSON (a packaged name or a file)."""
    cfg.deepspeed = str(config.resolve_resource("deepspeed", cfg.deepspeed, key="deepspeed"))


def validate(cfg: PretrainConfig) -> None:
    """Checks that need no data and no devices; the trainer checks the datasets themselves."""
    def fail(key, why):
        raise ConfigError(f"config key '{key}': {why}")

    if cfg.stage not in (1, 2):
        fail("stage", "must be 1 or 2")
    if cfg.stage == 2 and not cfg.init_from:
        fail("init_from", "stage 2 starts from a stage-1 checkpoint: set init_from=DIR")
    if cfg.train.precision not in ("fp32", "bf16"):
        fail("train.precision", f"'{cfg.train.precision}' is not one of fp32, bf16 (fp16 is refused on CPU)")
    if cfg.train.decay not in ("cosine", "linear", "constant"):
        fail("train.decay", f"'{cfg.train.decay}' is not one of cosine, linear, constant")
    if cfg.train.max_steps < 1 or cfg.train.grad_accum < 1:
        fail("train.max_steps", "steps and grad_accum must be positive")
    from flexmol.objectives import validate_objective

    try:
        validate_objective(cfg.objective)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    v = cfg.validation
    for key in ("every", "holdout_shards", "max_molecules", "alignment_count"):
        if getattr(v, key) < 0:
            fail(f"validation.{key}", f"must be 0 or more, got {getattr(v, key)}")
    if cfg.resume not in ("none", "auto") and not Path(cfg.resume).exists():
        fail("resume", f"{cfg.resume} does not exist (none, auto or a checkpoint path)")
    if not (cfg.data.paired or cfg.data.single_2d or cfg.data.single_3d):
        fail("data.paired", "no dataset given (data.paired, data.single_2d, data.single_3d)")
    from flexmol.data.streams import MixingSchedule, MixPoint

    available = [k for k in ("paired", "single_2d", "single_3d") if getattr(cfg.data, k)]
    try:
        MixingSchedule([MixPoint(p.step, dict(p.weights)) for p in cfg.data.mix], available)
    except ValueError as exc:
        fail("data.mix", str(exc))
    from flexmol.model.summary import model_config

    model_config(cfg.model.size)
