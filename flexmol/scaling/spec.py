"""Sweep specs: one small YAML names the axes of a study, and :func:`plan` turns it into runs.

A spec (``configs/scaling/*.yaml``; every key is documented in ``configs/scaling/ladder.yaml``)
gives a model ladder (rungs of width, depth and heads over a base preset), the study's datasets and
held-out shards, then either

- ``budgets``: molecules seen in training (a data-scaling ladder on one source), or
- ``paired_size`` with ``ratios`` and ``schedules``: a fixed paired set and single-modality 2D data
  at ``ratio`` times its size, trained ``mixed`` (one stage-1 phase drawing both sources in
  proportion) or ``two_phase`` (stage 1 on the paired set, then stage 2 from it on the 2D data),

and ``seeds``. Fixed across runs: the data order (``train.seed``-independent nested subsets: the D
molecules of a run are the first D of one permutation, so a larger budget holds a smaller one),
the held-out set, the training settings, and the schedule's shape (warm-up a fixed fraction of the
run, decay to its end). Everything that cannot be honoured is refused before anything runs.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from flexmol import config
from flexmol.config import ConfigError
from flexmol.data.integrity import MODALITY_OF_SOURCE
from flexmol.scaling import ScalingError

SOURCES = tuple(MODALITY_OF_SOURCE)
SCHEDULES = ("mixed", "two_phase")
# The held-out losses each source's batches give (flexmol.objectives.pretraining_losses, stage-1 objective)
LOSSES = {"paired": ("total", "contrastive", "consistency", "alignment", "atom", "spd", "coord", "dist"),
          "single_2d": ("total", "consistency", "atom", "spd"),
          "single_3d": ("total", "consistency", "coord", "dist")}
# Keys a study sets per run: train.overrides may not change them
RUN_KEYS = ("stage", "model", "output_dir", "resume", "init_from", *(f"data.{source}" for source in SOURCES),
            "data.subset", "data.subset_seed", "data.mix", "data.max_atoms", "train.max_steps", "train.warmup_steps",
            "train.lr", "train.decay", "train.seed", "train.stop_after", "train.grad_accum", "validation")


@dataclass
class ModelsSection:
    base: str = "tiny"  # the preset (or model YAML) every rung starts from
    # rung name -> model keys over the base (dim, heads, layers, decoder_layers, mm_layers, ...)
    rungs: Dict[str, Optional[Dict[str, Any]]] = field(default_factory=dict)


@dataclass
class HeldoutSection:
    shards: int = 1  # each dataset's last N shards: the held-out set of every run, never trained on
    max_molecules: int = 1000  # per source, evaluated at the end of every run
    # the losses (SOURCE/LOSS, e.g. paired/total) whose sum is a run's val_loss
    loss: List[str] = field(default_factory=lambda: ["paired/total"])


@dataclass
class ProbeSection:
    data: str = ""  # a labelled set for the linear probe (b3db, moleculenet:NAME, a CSV); empty: none
    targets: List[str] = field(default_factory=list)
    task: str = "classification"
    metric: str = "roc_auc"
    subsample: Optional[int] = None  # a seeded random N molecules of it
    split: str = "scaffold"
    seeds: List[int] = field(default_factory=lambda: [0])


@dataclass
class TrainSection:
    lr: float = 3e-4
    warmup_fraction: float = 0.1  # of each run's steps (phase by phase)
    decay: str = "cosine"
    max_atoms: int = 512  # padded atoms per batch: molecules per step follow from the data
    # any further pre-training config keys, the same for every run (e.g. train.weight_decay: 0.0)
    overrides: Dict[str, Any] = field(default_factory=dict)


@dataclass
class RunSection:
    parallel: int = 2  # runs at once on a local Ray (a cluster schedules by resources)
    cpus_per_run: int = 1  # Ray CPUs and torch threads per run
    gpus_per_run: int = 0  # 1: a GPU per run; more: the run goes through the DeepSpeed launcher
    max_retries: int = 0  # a failed run is retried this many times before it is reported


@dataclass
class Spec:
    name: str = ""
    data: Dict[str, List[str]] = field(default_factory=dict)  # source -> dataset directories
    heldout: HeldoutSection = field(default_factory=HeldoutSection)
    models: ModelsSection = field(default_factory=ModelsSection)
    budgets: List[int] = field(default_factory=list)
    passes: float = 1.0  # molecules seen per unique molecule: a run of budget B trains on B/passes
    paired_size: Optional[int] = None
    ratios: List[float] = field(default_factory=list)
    schedules: List[str] = field(default_factory=list)
    seeds: List[int] = field(default_factory=lambda: [0])
    subset_seed: int = 0
    train: TrainSection = field(default_factory=TrainSection)
    probe: ProbeSection = field(default_factory=ProbeSection)
    run: RunSection = field(default_factory=RunSection)
    path: str = ""  # where it was read from (set by load_spec)


@dataclass
class Phase:
    stage: int
    steps: int
    molecules: Dict[str, int]  # planned molecules seen per source
    subset: Dict[str, int]  # unique molecules per source (data.subset)
    weights: Dict[str, float]  # mixing weights per source (by batches)


@dataclass
class Run:
    name: str
    rung: str
    params: int
    seed: int
    phases: List[Phase]
    budget: int  # planned molecules seen, all phases
    schedule: str = ""
    ratio: Optional[float] = None
    flops: Optional[float] = None  # estimated (plan), from measured FLOPs per molecule

    def definition(self, spec: Spec) -> dict:
        """What its training is: compared with a run directory's before it is reused (a change
        needs another study directory)."""
        return {"name": self.name, "rung": spec.models.rungs[self.rung], "base": spec.models.base,
                "seed": self.seed, "phases": [dataclasses.asdict(p) for p in self.phases], "data": spec.data,
                "heldout_shards": spec.heldout.shards, "train": dataclasses.asdict(spec.train),
                "subset_seed": spec.subset_seed, "gpus_per_run": spec.run.gpus_per_run}

    def digest(self, spec: Spec) -> str:
        return _digest(self.definition(spec))

    @staticmethod
    def evaluation_digest(spec: Spec) -> str:
        """What its evaluation is (held-out losses, val_loss, probe): a change re-evaluates the
        finished runs' exports without training them again."""
        return _digest({"heldout": dataclasses.asdict(spec.heldout), "probe": dataclasses.asdict(spec.probe)})


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def load_spec(path: str | Path) -> Spec:
    """The spec in ``path``, checked (:func:`validate`); dataset paths resolve against the spec's
    directory when they exist there, else against the working directory."""
    path = Path(path)
    if path.is_dir():
        raise ScalingError(f"{path}: is a directory, not a spec file")
    if not path.is_file():
        raise ScalingError(f"{path}: no such spec file")
    try:
        spec = config.build(Spec, path)
    except ConfigError as exc:
        raise ScalingError(str(exc) if str(path) in str(exc) else f"{path}: {exc}") from None
    spec.path = str(path)
    for source, dirs in spec.data.items():
        spec.data[source] = [_resolve(d, path.parent) for d in (dirs if isinstance(dirs, list) else [dirs])]
    if spec.probe.data and not spec.probe.data.startswith("moleculenet:") and spec.probe.data not in ("b3db", "qm9"):
        spec.probe.data = _resolve(spec.probe.data, path.parent)
    validate(spec)
    return spec


def _resolve(value: str, base: Path) -> str:
    """Absolute (runs read it from other processes, and on a cluster from other machines): against
    the spec's directory when it exists there, else the working directory."""
    p = Path(value)
    if not p.is_absolute() and (base / p).exists():
        return str((base / p).resolve())
    return str(p.resolve())


def validate(spec: Spec) -> None:
    """Checks that need no data: a bad key is refused naming it and saying why."""
    where = spec.path or "spec"

    def fail(key: str, why: str):
        raise ScalingError(f"{where}: key '{key}': {why}")

    if not spec.name.strip():
        fail("name", "is empty (the study's name)")
    for source, dirs in spec.data.items():
        if source not in SOURCES:
            fail(f"data.{source}", f"is not a source ({', '.join(SOURCES)})")
        if not dirs:
            fail(f"data.{source}", "names no dataset directory")
    if not spec.data:
        fail("data", f"names no dataset ({', '.join(SOURCES)})")
    if not spec.models.rungs:
        fail("models.rungs", "is empty: name at least one model size")
    import re

    for rung, keys in spec.models.rungs.items():
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.]*", rung):
            fail(f"models.rungs.{rung}", "a rung name is letters, digits, '_' and '.' (it names files and runs)")
        if keys is not None and not isinstance(keys, dict):
            fail(f"models.rungs.{rung}", f"must map model keys to values (e.g. {{dim: 64, heads: 4}}), got {keys!r}")
    if not spec.seeds:
        fail("seeds", "is empty")
    if any(s < 0 for s in spec.seeds) or len(set(spec.seeds)) != len(spec.seeds):
        fail("seeds", f"must be distinct non-negative integers, got {spec.seeds}")
    if not (math.isfinite(spec.passes) and spec.passes > 0):
        fail("passes", f"must be a positive number, got {spec.passes}")
    h = spec.heldout
    if h.shards < 1:
        fail("heldout.shards", f"must be at least 1 (the held-out set), got {h.shards}")
    if h.max_molecules < 1:
        fail("heldout.max_molecules", f"must be at least 1, got {h.max_molecules}")
    if not h.loss:
        fail("heldout.loss", "is empty: name the held-out losses (SOURCE/LOSS) whose sum is val_loss")
    if len(set(h.loss)) != len(h.loss):
        fail("heldout.loss", f"names a loss twice (it would count twice in val_loss): {h.loss}")
    for item in h.loss:
        source, _, loss = item.partition("/")
        if source not in spec.data or loss not in LOSSES.get(source, ()):
            fail("heldout.loss", f"'{item}' is not SOURCE/LOSS of the study's sources: "
                                 + "; ".join(f"{s}/{{{','.join(LOSSES[s])}}}" for s in spec.data if s in LOSSES))
    t = spec.train
    if not (math.isfinite(t.lr) and t.lr > 0):
        fail("train.lr", f"must be a positive number, got {t.lr}")
    if t.decay not in ("cosine", "linear", "constant"):
        fail("train.decay", f"'{t.decay}' is not one of cosine, linear, constant")
    if spec.subset_seed < 0:
        fail("subset_seed", f"must be 0 or more, got {spec.subset_seed}")
    if not 0 <= t.warmup_fraction < 1:
        fail("train.warmup_fraction", f"must be in [0, 1), got {t.warmup_fraction}")
    if t.max_atoms < 1:
        fail("train.max_atoms", f"must be at least 1, got {t.max_atoms}")
    r = spec.run
    for key in ("parallel", "cpus_per_run"):
        if getattr(r, key) < 1:
            fail(f"run.{key}", f"must be at least 1, got {getattr(r, key)}")
    for key in ("gpus_per_run", "max_retries"):
        if getattr(r, key) < 0:
            fail(f"run.{key}", f"must be 0 or more, got {getattr(r, key)}")
    for key in t.overrides:
        if key in ("recipe", "m2umol") or key.startswith("m2umol."):
            fail(f"train.overrides.{key}", "scaling studies run the FlexMol recipe (their FLOP models, held-out "
                                           "losses and evaluation are FlexMol's)")
        if any(key == k or key.startswith(k + ".") for k in RUN_KEYS):
            fail(f"train.overrides.{key}", "is set by the study for each run (its model, data, budget, schedule, "
                                           "seed, held-out set); change the spec's own keys instead")
    if t.overrides:  # checked as the pre-training config checks them (a placeholder dataset: no data read)
        from flexmol.train.config import load as load_pretrain

        try:
            load_pretrain(None, [f"{k}={json.dumps(v)}" for k, v in t.overrides.items()] + ["data.paired=[-]"])
        except ConfigError as exc:
            fail("train.overrides", str(exc))
    if spec.probe.data:
        from flexmol.finetune.config import METRICS

        if spec.probe.metric not in METRICS or METRICS[spec.probe.metric] != spec.probe.task:
            fail("probe.metric", f"'{spec.probe.metric}' is not a metric of a {spec.probe.task} task "
                                 f"({', '.join(m for m, t in METRICS.items() if t == spec.probe.task) or 'none'})")
        from flexmol.finetune.split import SPLITS

        if not spec.probe.seeds:
            fail("probe.seeds", "is empty")
        if spec.probe.split not in SPLITS:
            fail("probe.split", f"'{spec.probe.split}' is not one of {', '.join(SPLITS)}")
        if not spec.probe.targets:
            fail("probe.targets", "is empty: name the label column(s) of probe.data")
        if spec.probe.subsample is not None and spec.probe.subsample < 20:
            fail("probe.subsample", f"must be at least 20 molecules, got {spec.probe.subsample}")
        if spec.probe.split == "scaffold" and len(spec.probe.seeds) > 1:
            fail("probe.seeds", "the scaffold split is the same for every seed (and the probe is deterministic): "
                                "give one seed, or split: random for a spread over seeds")
    mix_mode = spec.paired_size is not None or spec.ratios or spec.schedules
    if spec.budgets and mix_mode:
        fail("budgets", "a spec scales either budgets or paired_size x ratios x schedules, not both")
    if not spec.budgets and not mix_mode:
        fail("budgets", "give budgets (molecules seen) or paired_size, ratios and schedules")
    if spec.budgets:
        if len(spec.data) != 1:
            fail("budgets", f"scale one source's data; data names {len(spec.data)} ({', '.join(spec.data)})")
        if any(b < 1 for b in spec.budgets) or len(set(spec.budgets)) != len(spec.budgets):
            fail("budgets", f"must be distinct positive molecule counts, got {spec.budgets}")
    else:
        if spec.paired_size is None or spec.paired_size < 1:
            fail("paired_size", f"must be a positive molecule count, got {spec.paired_size}")
        if set(spec.data) != {"paired", "single_2d"}:
            fail("data", f"a paired-versus-single study needs data.paired and data.single_2d (got "
                         f"{', '.join(spec.data)})")
        if not spec.ratios or any(not (math.isfinite(x) and x >= 0) for x in spec.ratios):
            fail("ratios", f"must be non-negative numbers (single-modality molecules per paired one), got {spec.ratios}")
        if len(set(spec.ratios)) != len(spec.ratios):
            fail("ratios", f"holds a value twice: {spec.ratios}")
        bad = [s for s in spec.schedules if s not in SCHEDULES]
        if not spec.schedules or bad:
            fail("schedules", f"{bad or 'empty'}: choose from {', '.join(SCHEDULES)}")
        if len(set(spec.schedules)) != len(spec.schedules):
            fail("schedules", f"names a schedule twice: {spec.schedules}")


# -- the data side ------------------------------------------------------------------------------
@dataclass
class SourceFacts:
    """What the plan needs of a source's training data (after the held-out shards)."""

    train_urls: List[str]
    heldout_urls: List[str]
    records: int  # training records
    molecules_per_batch: float  # at train.max_atoms, measured on the sample
    sizes: List[int]  # atom counts of the sample (for the compute estimate)


def source_facts(spec: Spec, sample: int = 2000) -> dict[str, SourceFacts]:
    """Per source: its training and held-out shards (the trainer's rule: each dataset's last
    ``heldout.shards`` shards), its training record count, and molecules per batch and the atom
    count's first two moments on up to ``sample`` training records (an equal share of every shard's first)."""
    from flexmol.data.collate import atom_budget_batches
    from flexmol.data.integrity import DataError, dataset_shards
    from flexmol.data.streams import heldout_records

    out = {}
    for source, dirs in spec.data.items():
        train, heldout, records = [], [], 0
        for d in dirs:
            try:
                shards = [s for s in dataset_shards(d, f"data.{source}", MODALITY_OF_SOURCE[source]) if s["samples"] > 0]
            except (ConfigError, DataError) as exc:
                raise ScalingError(f"{spec.path}: {exc}") from None
            if len(shards) <= spec.heldout.shards:
                raise ScalingError(f"{spec.path}: key 'heldout.shards': {d} has {len(shards)} shard(s) with records; "
                                   f"holding out {spec.heldout.shards} would leave nothing to train on")
            train += [s["url"] for s in shards[:-spec.heldout.shards]]
            heldout += [s["url"] for s in shards[-spec.heldout.shards:]]
            records += sum(s["samples"] for s in shards[:-spec.heldout.shards])
        try:
            first = heldout_records(train, min(sample, records))
        except DataError as exc:
            raise ScalingError(f"{spec.path}: data.{source}: {exc}") from None
        sizes = [len(r["z"]) for r in first]
        batches = list(atom_budget_batches(first, spec.train.max_atoms))
        full = batches[:-1] or batches  # the last batch is a remainder
        out[source] = SourceFacts(train, heldout, records, sum(len(b) for b in full) / len(full), sizes)
    return out


# -- the runs -----------------------------------------------------------------------------------
def rung_config(spec: Spec, rung: str):
    """The rung's :class:`~flexmol.model.network.ModelConfig` (base preset + the rung's keys),
    checked; an impossible size is refused naming the rung."""
    from flexmol.model.summary import model_config

    keys = spec.models.rungs[rung] or {}
    try:
        return model_config(spec.models.base, [f"{k}={json.dumps(v)}" for k, v in keys.items()], key="models.base")
    except ConfigError as exc:
        raise ScalingError(f"{spec.path}: key 'models.rungs.{rung}': {exc}") from None


def rung_yaml(spec: Spec, rung: str) -> str:
    """The rung's model config as YAML (what its runs' ``model.size`` points to)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(rung_config(spec, rung)))


def _steps(molecules: Dict[str, float], facts: dict[str, SourceFacts], ranks: int = 1) -> tuple[int, Dict[str, float]]:
    """Steps to see ``molecules`` per source when each step trains one batch on each of ``ranks``
    processes, and the per-batch source weights that draw them."""
    batches = {k: m / facts[k].molecules_per_batch for k, m in molecules.items() if m > 0}
    total = sum(batches.values())
    return max(1, math.ceil(total / ranks)), {k: b / total for k, b in batches.items()}


def plan(spec: Spec, facts: dict[str, SourceFacts] | None = None) -> list[Run]:
    """Every run of the spec, in a stable order; refuses a budget larger than the data."""
    from flexmol.model.summary import parameter_count

    facts = facts if facts is not None else source_facts(spec)
    params = {r: parameter_count(rung_config(spec, r), f"models.rungs.{r}") for r in spec.models.rungs}
    ranks = max(1, spec.run.gpus_per_run)

    def _steps_(molecules):
        return _steps(molecules, facts, ranks)

    def unique(source: str, molecules: float, key: str) -> int:
        n = max(1, math.ceil(molecules / spec.passes))
        if n > facts[source].records:
            raise ScalingError(f"{spec.path}: key '{key}': {n} unique {source} molecules needed "
                               f"({molecules:g} seen at passes={spec.passes:g}) but data.{source} holds "
                               f"{facts[source].records} training molecules (after {spec.heldout.shards} "
                               f"held-out shard(s) per dataset)")
        return n

    runs = []
    for rung in spec.models.rungs:
        for seed in spec.seeds:
            if spec.budgets:
                (source,) = spec.data
                for budget in sorted(spec.budgets):
                    steps, weights = _steps_({source: budget})
                    phase = Phase(1, steps, {source: budget}, {source: unique(source, budget, "budgets")}, weights)
                    runs.append(Run(f"{rung}-b{budget}-s{seed}", rung, params[rung], seed, [phase], budget))
                continue
            p_seen = spec.paired_size * spec.passes
            p_unique = unique("paired", p_seen, "paired_size")
            for ratio in sorted(spec.ratios):
                s_seen = ratio * spec.paired_size * spec.passes
                schedules = ["paired_only"] if ratio == 0 else spec.schedules
                for schedule in schedules:
                    if schedule == "paired_only":
                        steps, w = _steps_({"paired": p_seen})
                        phases = [Phase(1, steps, {"paired": round(p_seen)}, {"paired": p_unique}, w)]
                    else:
                        s_unique = unique("single_2d", s_seen, "ratios")
                        if schedule == "mixed":
                            steps, w = _steps_({"paired": p_seen, "single_2d": s_seen})
                            phases = [Phase(1, steps, {"paired": round(p_seen), "single_2d": round(s_seen)},
                                            {"paired": p_unique, "single_2d": s_unique}, w)]
                        else:  # two_phase
                            s1, w1 = _steps_({"paired": p_seen})
                            s2, w2 = _steps_({"single_2d": s_seen})
                            phases = [Phase(1, s1, {"paired": round(p_seen)}, {"paired": p_unique}, w1),
                                      Phase(2, s2, {"single_2d": round(s_seen)}, {"single_2d": s_unique}, w2)]
                    runs.append(Run(f"{rung}-{schedule}-r{ratio:g}-s{seed}", rung, params[rung], seed, phases,
                                    sum(sum(p.molecules.values()) for p in phases), schedule, ratio))
    names = [r.name for r in runs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ScalingError(f"{spec.path}: runs {', '.join(twice)} would share a name (ratios or budgets that print "
                           "alike): make the values distinct")
    for source, f in facts.items():
        if max(f.sizes) > spec.train.max_atoms:
            raise ScalingError(f"{spec.path}: key 'train.max_atoms': {spec.train.max_atoms} padded atoms per batch "
                               f"cannot hold data.{source}'s molecules of {max(f.sizes)} atoms")
    return runs


def objective(spec: Spec):
    """The objective every run trains with: the defaults and the spec's ``objective.*`` overrides."""
    from flexmol.objectives import ObjectiveConfig

    keys = {k.split(".", 1)[1]: v for k, v in spec.train.overrides.items() if k.startswith("objective.")}
    try:
        return config.build(ObjectiveConfig, {}, overrides=[f"{k}={json.dumps(v)}" for k, v in keys.items()])
    except ConfigError as exc:
        raise ScalingError(f"{spec.path}: key 'train.overrides': {exc}") from None


def flop_models(spec: Spec, runs: list[Run], cache_dir: Path, log=None) -> dict:
    """The FLOP model of every (rung, stage) the runs train, measured on real batches of the
    study's data (:mod:`flexmol.scaling.flops`), cached in ``cache_dir``."""
    from flexmol.scaling.flops import flop_model, sample_records

    records = {}
    for source, dirs in spec.data.items():
        modality, sample = sample_records(dirs[0], limit=256, key=f"data.{source}")
        records[modality] = sample
    models = {}
    for rung, stage in sorted({(r.rung, p.stage) for r in runs for p in r.phases}):
        if log:
            log(f"FLOPs of model {rung}, stage {stage}, on real batches")
        models[(rung, stage)] = flop_model(rung_config(spec, rung), records, stage=stage, cache_dir=cache_dir,
                                           objective=objective(spec))
    return models


def estimate_flops(spec: Spec, runs: list[Run], facts: dict[str, SourceFacts], models: dict) -> None:
    """Each run's estimated training FLOPs (``run.flops``): its planned molecules per source,
    batched as training batches them (the sample's atom counts), through the measured models."""
    from flexmol.scaling.flops import planned_work

    sizes = {source: f.sizes for source, f in facts.items()}
    for run in runs:
        run.flops = sum(models[(run.rung, p.stage)].total(planned_work(p.molecules, sizes, spec.train.max_atoms))["flops"]
                        for p in run.phases)


def check_probe(spec: Spec) -> None:
    """The probe set opens, with its SMILES and target columns (nothing featurised yet)."""
    if not spec.probe.data:
        return
    from flexmol.config import SourceOptions
    from flexmol.data.registry import DatasetUnavailable
    from flexmol.data.sources import SourceError, open_source

    try:
        open_source(spec.probe.data, SourceOptions(label_columns=list(spec.probe.targets)))
    except (SourceError, DatasetUnavailable, ConfigError, OSError) as exc:
        raise ScalingError(f"{spec.path}: key 'probe.data': {str(exc).splitlines()[0]}") from None


def plan_table(spec: Spec, measure: bool = True) -> str:
    """The plan as text: rungs with their sizes and parameters, then one line per run."""
    check_probe(spec)
    facts = source_facts(spec)
    runs = plan(spec, facts)
    if measure:
        import tempfile

        with tempfile.TemporaryDirectory() as cache:
            estimate_flops(spec, runs, facts, flop_models(spec, runs, Path(cache)))
    lines = [f"study {spec.name}: {len(runs)} run(s) from {spec.path}"]
    for source, f in facts.items():
        lines.append(f"  data.{source}: {f.records} training molecules in {len(f.train_urls)} shard(s), "
                     f"{len(f.heldout_urls)} held-out shard(s); {f.molecules_per_batch:.1f} molecules/step at "
                     f"max_atoms {spec.train.max_atoms} (mean {sum(f.sizes) / len(f.sizes):.1f} atoms)")
    for rung in spec.models.rungs:
        c = rung_config(spec, rung)
        lines.append(f"  model {rung}: dim {c.dim}, heads {c.heads}, layers {c.layers}, decoder_layers "
                     f"{c.decoder_layers}, mm_layers {c.mm_layers}: {runs_params(runs, rung):,} parameters")
    lines.append(f"  {'run':<28} {'params':>10} {'molecules':>10} {'unique':>18} {'steps':>7} {'est. FLOPs':>11}")
    for run in runs:
        uniq = "+".join(f"{v}" for p in run.phases for v in p.subset.values())
        steps = "+".join(str(p.steps) for p in run.phases)
        flops = f"{run.flops:.3g}" if run.flops is not None else "-"
        lines.append(f"  {run.name:<28} {run.params:>10,} {run.budget:>10,} {uniq:>18} {steps:>7} {flops:>11}")
    if measure:
        lines.append(f"  total estimated training compute: {sum(r.flops for r in runs):.3g} FLOPs")
    return "\n".join(lines)


def runs_params(runs: list[Run], rung: str) -> int:
    return next(r.params for r in runs if r.rung == rung)
