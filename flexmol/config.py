"""Typed configuration: OmegaConf structured configs built from dataclasses.

Every tunable is a key here, with its default. A YAML file or a ``key=value`` override that names
an unknown key, or gives a value of the wrong type, fails at start-up with the key's name
(:class:`ConfigError`), never half-way through a job.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, List, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

MODALITIES = ("paired", "2d", "3d")

# Elements the featuriser accepts by default: the organic subset plus the halogens, boron,
# silicon and selenium that drug-like and QM9 molecules contain. Anything else is rejected with
# the element named (metals and noble gases have no MMFF parameters and no place in the vocab).
DEFAULT_ELEMENTS = ["H", "B", "C", "N", "O", "F", "Si", "P", "S", "Cl", "Se", "Br", "I"]


class ConfigError(ValueError):
    """A configuration value was rejected; the message names the key and the reason."""


@dataclass
class FeaturizerConfig:
    """How a molecule becomes a record. Its hash is stored in every dataset's manifest."""

    # Atoms: heavy atoms only (the paper's default) or explicit hydrogens as nodes.
    explicit_hydrogens: bool = False
    elements: List[str] = field(default_factory=lambda: list(DEFAULT_ELEMENTS))
    min_heavy_atoms: int = 1
    max_heavy_atoms: int = 128
    # Salts and mixtures: "largest" keeps the largest organic fragment (counted in the manifest
    # as fragments_stripped); "reject" rejects any multi-fragment input.
    fragments: str = "largest"
    # 3D: ETKDGv3 conformers, then MMFF94 optimisation.
    num_conformers: int = 1
    seed: int = 0
    embed_timeout_s: float = 10.0  # RDKit's own per-fragment limit (soft: the molecule is rejected)
    embed_max_attempts: int = 2  # the second attempt starts from random coordinates
    mmff: bool = True
    mmff_max_iters: int = 200  # RDKit's own default
    # A molecule that keeps a worker busy longer than this (up to twice this) kills the worker
    # (hard limit: RDKit can hang in C++ where no Python exception reaches it); the job retries the
    # shard and rejects the molecule when it does so again.
    hard_timeout_s: float = 120.0
    # 3D taken from the input (SDF with 3D coordinates, QM9 DFT geometries) instead of generated.
    use_input_geometry: bool = True

    def digest(self) -> str:
        """sha256 of the canonical JSON of this config; identifies a featurisation."""
        payload = json.dumps(OmegaConf.to_container(OmegaConf.structured(self)), sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()


@dataclass
class SourceOptions:
    """How to read a source file; named sets fill these themselves."""

    smiles_column: Optional[str] = None  # CSV: auto-detected ("smiles", "SMILES", ...) when unset
    id_column: Optional[str] = None
    label_columns: List[str] = field(default_factory=list)
    delimiter: Optional[str] = None  # CSV: sniffed from the file name (.tsv -> tab) when unset


@dataclass
class JobConfig:
    """How the work is split and run; part of the dataset's identity (shard boundaries)."""

    shard_size: int = 0  # molecules per shard; 0 picks 1000 for 3D/paired and 20000 for 2D
    executor: str = "ray"  # "ray" (local ray.init() or RAY_ADDRESS) or "serial" (in-process)
    num_cpus: Optional[int] = None  # local Ray: cores to use (all when unset)
    task_retries: int = 2  # a shard task that fails for a reason other than a molecule
    crash_retries_per_molecule: int = 1  # a molecule that kills its worker this often is rejected
    node_loss_retries: int = 10  # a task whose node is lost (machine gone) is run again this often
    # InChIKeys one duplicate-search task may hold (~0.3 kB each): the key space is split into as
    # many bucket ranges as the cluster has cores, or more when the dataset has more keys
    dedup_keys_per_task: int = 500_000
    progress: bool = True


@dataclass
class FeaturizeConfig:
    source: str = ""
    modality: str = "paired"
    out: str = ""
    limit: Optional[int] = None
    data_dir: Optional[str] = None  # cache of downloaded dataset wheels; FLEXMOL_DATA_DIR or ~/.cache/flexmol
    source_options: SourceOptions = field(default_factory=SourceOptions)
    featurizer: FeaturizerConfig = field(default_factory=FeaturizerConfig)
    job: JobConfig = field(default_factory=JobConfig)


def _fail(key: str, why: str) -> None:
    raise ConfigError(f"config key '{key}': {why}")


# Upper bounds the config schema does not state: past them a value is a typo, or runs out of memory
# or time inside RDKit (which takes C integers) rather than failing with the key named.
MAX_CONFORMERS = 1000
MAX_SECONDS = 1e6
MAX_EMBED_ATTEMPTS = 100


def validate_featurizer(cfg: FeaturizerConfig, prefix: str = "featurizer") -> None:
    from rdkit import Chem

    table = Chem.GetPeriodicTable()
    for symbol in cfg.elements:
        try:
            ok = table.GetAtomicNumber(symbol) > 0
        except RuntimeError:
            ok = False
        if not ok:
            _fail(f"{prefix}.elements", f"'{symbol}' is not an element symbol")
    if cfg.min_heavy_atoms < 1:
        _fail(f"{prefix}.min_heavy_atoms", "must be at least 1")
    if cfg.max_heavy_atoms < cfg.min_heavy_atoms:
        _fail(f"{prefix}.max_heavy_atoms", "must be at least min_heavy_atoms")
    if cfg.fragments not in ("largest", "reject"):
        _fail(f"{prefix}.fragments", f"'{cfg.fragments}' is not one of largest, reject")
    if cfg.num_conformers < 1:
        _fail(f"{prefix}.num_conformers", "must be at least 1")
    if cfg.embed_timeout_s < 0 or cfg.hard_timeout_s <= 0:
        _fail(f"{prefix}.hard_timeout_s", "time limits must be positive")
    if cfg.embed_max_attempts < 1:
        _fail(f"{prefix}.embed_max_attempts", "must be at least 1")
    # upper bounds: a value past them hangs a job or turns every molecule into a time-limit reject
    if not cfg.elements:
        _fail(f"{prefix}.elements", "is empty: no molecule could be accepted")
    if cfg.num_conformers > MAX_CONFORMERS:
        _fail(f"{prefix}.num_conformers", f"{cfg.num_conformers} is more than {MAX_CONFORMERS} conformers per molecule")
    for key in ("embed_timeout_s", "hard_timeout_s"):
        value = getattr(cfg, key)
        if not math.isfinite(value) or not 0 <= value <= MAX_SECONDS:
            _fail(f"{prefix}.{key}", f"{value} is not a number of seconds between 0 and {MAX_SECONDS:g}")
    if cfg.embed_max_attempts > MAX_EMBED_ATTEMPTS:
        _fail(f"{prefix}.embed_max_attempts", f"{cfg.embed_max_attempts} is more than {MAX_EMBED_ATTEMPTS}")
    if cfg.mmff_max_iters < 0:
        _fail(f"{prefix}.mmff_max_iters", "cannot be negative")


def validate_featurize(cfg: FeaturizeConfig) -> None:
    if not cfg.source:
        _fail("source", "is required (a file path or a named set)")
    if not cfg.out:
        _fail("out", "is required (the dataset directory)")
    if cfg.modality not in MODALITIES:
        _fail("modality", f"'{cfg.modality}' is not one of {', '.join(MODALITIES)}")
    if cfg.limit is not None and cfg.limit < 1:
        _fail("limit", "must be a positive number of molecules")
    if cfg.job.executor not in ("ray", "serial"):
        _fail("job.executor", f"'{cfg.job.executor}' is not one of ray, serial")
    if cfg.job.shard_size < 0:
        _fail("job.shard_size", "must be positive (or 0 for the default)")
    for key in ("task_retries", "crash_retries_per_molecule", "node_loss_retries"):
        if getattr(cfg.job, key) < 0:
            _fail(f"job.{key}", "retries cannot be negative")
    if cfg.job.dedup_keys_per_task < 1:
        _fail("job.dedup_keys_per_task", f"{cfg.job.dedup_keys_per_task}: must be at least 1")
    validate_featurizer(cfg.featurizer)


# Configs the package itself needs, shipped inside it: ``configs/KIND/NAME.EXT``.
PACKAGE_CONFIGS = Path(__file__).resolve().parent / "configs"
RESOURCE_SUFFIXES = {"model": ".yaml", "deepspeed": ".json", "pretrain": ".yaml", "finetune": ".yaml"}


def resource_names(kind: str) -> List[str]:
    """The names of the packaged configs of one kind (``model``: tiny, small, base)."""
    return sorted(p.stem for p in (PACKAGE_CONFIGS / kind).glob(f"*{RESOURCE_SUFFIXES[kind]}"))


def is_name(value: str | Path) -> bool:
    """A bare name (``tiny``, ``zero2``): no directory part and no suffix."""
    text = str(value)
    return bool(text) and "/" not in text and os.sep not in text and not Path(text).suffix


def resolve_resource(kind: str, name_or_path: str | Path, key: Optional[str] = None) -> Path:
    """A packaged config named ``name_or_path`` (``model``/``tiny``, ``deepspeed``/``zero2``), or a file.

    A bare name is looked up among the packaged configs of ``kind`` first, then taken as a file in
    the working directory; anything else is a path (relative ones to the working directory). The
    result is absolute; a missing file raises :class:`ConfigError` naming ``key`` and the packaged
    names.
    """
    key = key or kind
    if is_name(name_or_path):
        packaged = PACKAGE_CONFIGS / kind / f"{name_or_path}{RESOURCE_SUFFIXES[kind]}"
        if packaged.is_file():
            return packaged
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path.resolve()
    what = "no such preset" if is_name(name_or_path) else "a directory, not a file" if path.is_dir() else "no such file"
    raise ConfigError(f"{key} '{name_or_path}': {what} (known: {', '.join(resource_names(kind))}; or a file path)")


def _rebase(value: Any, base: Path, names: bool) -> Any:
    if isinstance(value, str) and value and not (names and is_name(value)):
        path = Path(value).expanduser()
        if not path.is_absolute() and (base / path).exists():
            return str((base / path).resolve())
    return value


def read_yaml(path: Path) -> DictConfig:
    """A YAML file of config keys; a file that is not one (bad syntax, not text, a list or a
    scalar at the top) raises :class:`ConfigError` naming the file."""
    import yaml

    try:
        data = OmegaConf.load(path)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        why = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{where} ({why})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a YAML text file (not UTF-8)") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{path}: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, DictConfig):
        raise ConfigError(f"{path}: holds a {type(data).__name__.replace('Config', '').lower()}, "
                          "not a mapping of config keys (key: value)")
    return data


def load_file(path: str | Path, paths: Iterable[str] = (), names: Iterable[str] = ()) -> DictConfig:
    """Read a YAML config file, its relative paths resolved against the file's directory.

    ``paths`` and ``names`` are the dotted keys whose values (strings, or lists of strings) name
    files or directories. A relative value that exists beside the file becomes that absolute path;
    any other value stays as written (relative paths then mean the working directory, as on the
    command line). Under ``names`` a bare name (``model.size: tiny``) is a packaged config's name and
    stays one.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    data = read_yaml(path)
    base = path.resolve().parent
    for key, keep_names in [(k, False) for k in paths] + [(k, True) for k in names]:
        value = OmegaConf.select(data, key, default=None)
        if isinstance(value, ListConfig):
            rebased = [_rebase(v, base, keep_names) for v in value]
        else:
            rebased = _rebase(value, base, keep_names)
        if rebased != value:
            OmegaConf.update(data, key, rebased, merge=False)
    return data


def build(schema: type, *sources: Any, overrides: Optional[List[str]] = None) -> Any:
    """Merge YAML files / dicts / ``key=value`` overrides onto ``schema``'s defaults.

    Returns a plain dataclass instance. Unknown keys and wrong types raise :class:`ConfigError`.
    A file is read as written; :func:`load_file` resolves its relative paths first.
    """
    merged: DictConfig = OmegaConf.structured(schema)
    try:
        for src in sources:
            if src is None:
                continue
            if isinstance(src, (str, Path)):
                src = load_file(src)
            merged = OmegaConf.merge(merged, src)
        if overrides:
            for item in overrides:
                if "=" not in item:
                    raise ConfigError(f"override '{item}' is not of the form key=value")
            merged = OmegaConf.merge(merged, _dotlist(overrides))
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or ""
        msg = str(exc).splitlines()[0]
        if "is not a ListConfig" in msg:
            msg = f"expects a list, e.g. {key or 'key'}=[a,b]"
        if len(key) > 60:  # a whole file read as one key (not a config file): name it, do not print it
            short = f"{key[:40]}...".replace("\n", " ")
            raise ConfigError(f"config key '{short}' ({len(key)} characters) is not a config key: "
                              "not a config file?") from None
        raise ConfigError(f"config key '{key}': {msg}" if key else f"config: {msg}") from None


def _dotlist(overrides: List[str]) -> DictConfig:
    """``key=value`` overrides as a config; a value that is not valid YAML is named."""
    import yaml

    for item in overrides:
        try:
            OmegaConf.from_dotlist([item])
        except yaml.YAMLError as exc:
            why = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ConfigError(f"override '{item}': the value is not valid YAML ({why})") from None
    return OmegaConf.from_dotlist(list(overrides))


def to_dict(cfg: Any) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg))
