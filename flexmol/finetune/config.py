"""The fine-tuning configuration (``flexmol/configs/finetune/default.yaml``, shipped in the package), overridable as ``key=value``."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from flexmol import config
from flexmol.config import ConfigError, FeaturizerConfig

TASKS = ("classification", "regression")
METRICS = {"roc_auc": "classification", "rmse": "regression", "mae": "regression"}
MODES = ("2d", "3d", "both")
# The arms beside the pre-trained model with LoRA (``flexmol``), in table order: how each is
# trained and whether it starts from the checkpoint.
BASELINES = ("flexmol_full", "scratch", "probe_flexmol", "probe_scratch", "ecfp_rf")
NEEDS_CHECKPOINT = ("flexmol_full", "probe_flexmol")
ARMS = {  # name: (training, pre-trained)
    "flexmol": ("LoRA", True),
    "flexmol_full": ("full", True),
    "scratch": ("full", False),
    "probe_flexmol": ("linear probe", True),
    "probe_scratch": ("linear probe", False),
    "ecfp_rf": ("ECFP4 + RF", None),
}


@dataclass
class DataSection:
    source: str = ""  # a CSV/TSV path or a named set: b3db, qm9, moleculenet:NAME
    smiles_column: Optional[str] = None  # found by name (smiles, SMILES, ...) when not given
    id_column: Optional[str] = None  # names molecules in rejects and predictions (default: row number)
    targets: List[str] = field(default_factory=list)
    task: str = "classification"
    metric: Optional[str] = None  # roc_auc (classification), rmse (default for regression) or mae
    limit: Optional[int] = None  # only the first N rows (quick runs)
    subsample: Optional[int] = None  # then a random N of them (seeded; files are often sorted by label)
    subsample_seed: int = 0
    num_workers: int = 2  # processes featurising the molecules


@dataclass
class SplitSection:
    kind: str = "scaffold"  # scaffold (deterministic, the same for every seed) | random (per seed)
    fractions: List[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])


@dataclass
class LoraSection:
    enabled: bool = True  # False: every backbone weight is trained
    r: int = 64
    alpha: int = 64
    dropout: float = 0.0
    # Attention and feed-forward projections of every encoder, decoder and the MM encoder
    # (peft matches module-name suffixes).
    target_modules: List[str] = field(default_factory=lambda: ["qkv", "out", "ffn.0", "ffn.3"])


@dataclass
class HeadSection:
    hidden: int = 0  # 0: the model's width
    dropout: float = 0.1


@dataclass
class TrainSection:
    epochs: int = 40
    patience: int = 10  # epochs without a better validation metric before stopping
    batch_size: int = 32  # molecules
    bucket: int = 8  # sort each run of N batches by molecule size (less padding); 1: plain shuffling
    lr: float = 3e-4
    head_lr: Optional[float] = None  # default: lr
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    grad_clip: float = 1.0
    eval_batch_size: int = 128


@dataclass
class RandomForestSection:
    n_estimators: int = 500
    radius: int = 2  # ECFP4
    bits: int = 2048
    n_jobs: int = -1


@dataclass
class ProbeSection:
    """Linear probes on frozen embeddings: one model per target, its regularisation strength the
    grid value with the best validation metric, ties to the earlier value (features standardised
    on the training part)."""

    c_grid: List[float] = field(default_factory=lambda: [0.001, 0.01, 0.1, 1.0, 10.0])  # LogisticRegression C
    alpha_grid: List[float] = field(default_factory=lambda: [0.01, 0.1, 1.0, 10.0, 100.0, 1000.0])  # Ridge alpha
    max_iter: int = 2000  # LogisticRegression (lbfgs)


@dataclass
class FinetuneConfig:
    checkpoint: Optional[str] = None  # an export (model.safetensors + model.yaml) or a pre-training output_dir
    data: DataSection = field(default_factory=DataSection)
    split: SplitSection = field(default_factory=SplitSection)
    seeds: List[int] = field(default_factory=lambda: [0, 1, 2])
    mode: str = "2d"  # input: 2d (the decoder supplies 3D), 3d (RDKit conformer), both
    lora: LoraSection = field(default_factory=LoraSection)
    head: HeadSection = field(default_factory=HeadSection)
    train: TrainSection = field(default_factory=TrainSection)
    # Arms beside the pre-trained model with LoRA: any of BASELINES, "all" (every arm that applies:
    # those needing a checkpoint only when there is one) or none ([]).
    baselines: List[str] = field(default_factory=lambda: ["all"])
    scratch_model: str = "tiny"  # the architecture trained from scratch when there is no checkpoint
    rf: RandomForestSection = field(default_factory=RandomForestSection)
    probe: ProbeSection = field(default_factory=ProbeSection)
    featurizer: FeaturizerConfig = field(default_factory=lambda: FeaturizerConfig(num_conformers=1))
    device: str = "auto"  # auto (cuda when there is one) | cpu | cuda | cuda:N
    save_models: bool = True  # best-validation adapters + head (or full weights) per seed
    out: str = "outputs/finetune"


def load(path=None, *more, overrides: Optional[List[str]] = None) -> FinetuneConfig:
    cfg = config.build(FinetuneConfig, path, *more, overrides=overrides)
    validate(cfg)
    return cfg


def export_dir(checkpoint: str) -> Path:
    """The export inside ``checkpoint``: the directory itself or its ``export/``."""
    path = Path(checkpoint)
    for cand in (path, path / "export"):
        if (cand / "model.safetensors").is_file() and (cand / "model.yaml").is_file():
            return cand
    what = "does not exist" if not path.exists() else "is a file, not a directory" if not path.is_dir() else \
        "holds no model.safetensors + model.yaml"
    raise ConfigError(f"config key 'checkpoint': {path} {what} (an export, or a pre-training output_dir with "
                      "export/)")


def check_export(checkpoint: str) -> Path:
    """The export of ``checkpoint``, its files checked (checksum, safetensors header, sizes): a
    damaged or foreign checkpoint is refused before any molecule is featurised."""
    from flexmol.model.export import ExportError, check_export as check_files

    path = export_dir(checkpoint)
    try:
        check_files(path)
    except ExportError as exc:
        raise ConfigError(f"config key 'checkpoint': {exc}") from None
    return path


def check_mode(mode: str, export: Path) -> None:
    """Refuse an input ``mode`` the checkpoint in ``export`` cannot serve (an M2UMol export:
    ``2d``, and ``3d`` with a conformer modality), naming the key."""
    from flexmol.finetune.model import finetune_modes
    from flexmol.model.export import export_model_config

    modes = finetune_modes(export_model_config(export))
    if mode not in modes:
        raise ConfigError(f"config key 'mode': '{mode}': the checkpoint {export} (an M2UMol export) serves "
                          f"{', '.join(modes)} only")


def check_out(out: str) -> None:
    """``out`` is a directory this process can write into, or one it can create."""
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"config key 'out': {out} is a file, not a directory")
    existing = path.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"config key 'out': cannot create {out}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = f"{out} is not writable" if existing == path.absolute() else \
            f"cannot create {out}: {existing} is not writable"
        raise ConfigError(f"config key 'out': {what}")


def selected_baselines(cfg: FinetuneConfig) -> list[str]:
    """The arms of ``cfg.baselines`` in table order, "all" expanded."""
    names = set(cfg.baselines)
    if "all" in names:
        names |= {b for b in BASELINES if cfg.checkpoint or b not in NEEDS_CHECKPOINT}
    return [b for b in BASELINES if b in names]


def device_problem(device: str, names=("cpu",)) -> str | None:
    """Why ``device`` (one of ``names``, ``cuda`` or ``cuda:N``) cannot be used here, or None."""
    if device in names:
        return None
    match = re.fullmatch(r"cuda(?::(\d+))?", device)
    if not match:
        return f"'{device}' is not {', '.join(names)}, cuda or cuda:N"
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if int(match[1] or 0) >= count:
        return f"'{device}': {'no CUDA device here' if not count else f'{count} CUDA device(s) here'}"
    return None


def validate(cfg: FinetuneConfig) -> None:
    def fail(key, why):
        raise ConfigError(f"config key '{key}': {why}")

    if not cfg.data.source:
        fail("data.source", "no data given (a CSV path or b3db, qm9, moleculenet:NAME)")
    if not cfg.data.targets:
        fail("data.targets", "name at least one target column")
    if len(set(cfg.data.targets)) != len(cfg.data.targets):
        fail("data.targets", f"repeated target in {cfg.data.targets}")
    if cfg.data.task not in TASKS:
        fail("data.task", f"'{cfg.data.task}' is not one of {', '.join(TASKS)}")
    if cfg.data.metric is None:
        cfg.data.metric = "roc_auc" if cfg.data.task == "classification" else "rmse"
    if METRICS.get(cfg.data.metric) != cfg.data.task:
        fail("data.metric", f"'{cfg.data.metric}' does not go with {cfg.data.task} "
                            f"(classification: roc_auc; regression: rmse, mae)")
    for key in ("limit", "subsample"):
        if getattr(cfg.data, key) is not None and getattr(cfg.data, key) < 1:
            fail(f"data.{key}", "must be at least 1")
    if cfg.split.kind not in ("scaffold", "random"):
        fail("split.kind", f"'{cfg.split.kind}' is not one of scaffold, random")
    fr = cfg.split.fractions
    if len(fr) != 3 or any(f <= 0 for f in fr) or abs(sum(fr) - 1) > 1e-6:
        fail("split.fractions", f"{list(fr)} must be three positive numbers summing to 1")
    if not cfg.seeds or len(set(cfg.seeds)) != len(cfg.seeds) or min(cfg.seeds) < 0:
        fail("seeds", f"{list(cfg.seeds)}: give one or more distinct seeds, 0 or more")
    if cfg.data.subsample_seed < 0:
        fail("data.subsample_seed", f"must be 0 or more, got {cfg.data.subsample_seed}")
    if cfg.data.num_workers < 0:
        fail("data.num_workers", f"must be 0 or more (0 and 1: in this process), got {cfg.data.num_workers}")
    if cfg.mode not in MODES:
        fail("mode", f"'{cfg.mode}' is not one of {', '.join(MODES)}")
    if cfg.lora.r < 1:
        fail("lora.r", f"must be positive, got {cfg.lora.r}")
    if not cfg.lora.alpha > 0:
        fail("lora.alpha", f"must be positive, got {cfg.lora.alpha}")
    for key, value in (("lora.dropout", cfg.lora.dropout), ("head.dropout", cfg.head.dropout)):
        if not 0 <= value < 1:
            fail(key, f"must be in [0, 1), got {value}")
    if cfg.head.hidden < 0:
        fail("head.hidden", f"must be 0 (the model's width) or more, got {cfg.head.hidden}")
    if not cfg.lora.target_modules:
        fail("lora.target_modules", "empty")
    unknown = [b for b in cfg.baselines if b not in BASELINES + ("all",)]
    if unknown:
        fail("baselines", f"{unknown} unknown; choose from {', '.join(BASELINES)} or all")
    orphans = [b for b in cfg.baselines if b in NEEDS_CHECKPOINT and not cfg.checkpoint]
    if orphans:
        fail("baselines", f"{', '.join(orphans)} start{'s' if len(orphans) == 1 else ''} from the pre-trained model "
                          "and there is none (set config key 'checkpoint' / --checkpoint)")
    if not cfg.checkpoint and not selected_baselines(cfg):
        fail("baselines", "nothing to run: give a checkpoint, a baseline, or both")
    t = cfg.train
    if t.epochs < 1 or t.batch_size < 1 or t.eval_batch_size < 1 or t.patience < 1:
        fail("train", "epochs, batch_size, eval_batch_size and patience must be positive")
    if not 0 <= t.warmup_ratio < 1:
        fail("train.warmup_ratio", "must be in [0, 1)")
    if not t.lr > 0:
        fail("train.lr", f"must be positive, got {t.lr}")
    if t.head_lr is not None and not t.head_lr > 0:
        fail("train.head_lr", f"must be positive (or null: train.lr), got {t.head_lr}")
    for key in ("weight_decay", "grad_clip"):
        if not getattr(t, key) >= 0:
            fail(f"train.{key}", f"must be 0 or more, got {getattr(t, key)}")
    if t.bucket < 1:
        fail("train.bucket", f"must be at least 1 (1: plain shuffling), got {t.bucket}")
    rf = cfg.rf
    for key, least in (("n_estimators", 1), ("radius", 0), ("bits", 1)):
        if getattr(rf, key) < least:
            fail(f"rf.{key}", f"must be at least {least}, got {getattr(rf, key)}")
    if rf.n_jobs == 0:
        fail("rf.n_jobs", "must be a number of processes, or -1 for every core (not 0)")
    for key in ("c_grid", "alpha_grid"):
        grid = getattr(cfg.probe, key)
        if not grid or any(not v > 0 for v in grid):
            fail(f"probe.{key}", f"{list(grid)}: give one or more positive values")
    if cfg.probe.max_iter < 1:
        fail("probe.max_iter", "must be positive")
    why = device_problem(cfg.device, ("auto", "cpu"))
    if why:
        fail("device", why)
    config.validate_featurizer(cfg.featurizer)
    if not cfg.out:
        fail("out", "is required (the output directory)")
    check_out(cfg.out)
    if cfg.checkpoint:
        check_mode(cfg.mode, check_export(cfg.checkpoint))  # its sizes too: a model too large is refused here
    else:
        from flexmol.model.summary import check_fits_memory, model_config

        try:
            shape = model_config(cfg.scratch_model, key="scratch_model")
            check_fits_memory(shape, str(config.resolve_resource("model", cfg.scratch_model, key="scratch_model")))
        except ConfigError as exc:
            text = str(exc)
            raise ConfigError(text if text.startswith("scratch_model") else f"config key 'scratch_model': {text}") \
                from None
