"""Training compute, measured: FLOPs of a training step as a function of its batch's shape, per
model size, stage and modality, and a run's total from the molecules it saw.

C = 6ND does not hold here: the pair track (attention logits as pair features, pair heads, the 3D
Gaussian kernels) costs O(n^2) in a molecule's atoms. So the cost is measured.

**What is measured.** :func:`step_flops` counts, with ``torch.utils.flop_counter.FlopCounterMode``,
the FLOPs of one training micro-step as the trainer runs it: ``pretraining_losses(...)["total"]``
and its ``backward()``, the model in training mode, the stage's feature learners frozen
(:func:`flexmol.objectives.stages.frozen_parameters`) and ``train_feature_learners = (stage == 1)``.
FlopCounterMode counts matrix products (mm, addmm, bmm, attention kernels); element-wise work
(activations, layer norms, softmax, the Gaussian kernels' exp, the loss reductions) and the
optimizer's update are not matrix products and are not counted, the convention of 6ND. bf16
autocast changes no count (the shapes are the same; measured). Its registry (torch 2.13) has no
formula for the CPU flash-attention kernel, so :data:`CPU_ATTENTION` gives it torch's own SDPA
formulas: a CPU count then does not depend on which kernel ``scaled_dot_product_attention`` picks
(training takes the math path, counted as its bmm calls, because the pair bias is learned).

**The cost model.** Every module runs on the padded [B, N] (atoms) and [B, N, N] (pairs) tensors,
and the contrastive loss compares every pair of the batch's molecules, so a step of B molecules
padded to N atoms costs, exactly,

    flops(B, N) = c_molecule * B + c_atom * B*N + c_pair * B*N^2 + c_batch * B^2

(no N^3 term: there are no triangle updates; no B^2*N: the contrastive loss compares pooled
vectors). :func:`measure` counts real batches of real molecules, built with the project's
:func:`~flexmol.data.collate.collate`, at a grid of shapes (molecules grouped by atom count, and
mixed), fits the four coefficients per modality by non-negative least squares on relative
residuals (integers: every count is a sum of 2*m*n*k over integer sizes), and checks the fit on
held-out batches made as training makes them (:func:`~flexmol.data.collate.atom_budget_batches`
at the run's atom budget). The fit is exact (residuals at float rounding) for the presets: a
residual, or a held-out error above ``tolerance``, means the model has a term this form lacks
(:class:`ScalingError`).

**A run's total.** The trainer accumulates per source the counters of :func:`batch_work`;
:meth:`FlopModel.total` turns them into ``flops`` (each molecule at its own atom count: the
useful work) and ``flops_padded`` (what the hardware ran, padding included). Before a run,
:func:`planned_work` estimates the counters from a sample of each source's atom counts
(:func:`sample_records`), batched the way training batches them.

**Cache.** :func:`flop_model` keeps one JSON file per (model sizes, stage, objective, modalities)
in a directory the caller names: a model size is measured once per study.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional, Sequence

import numpy as np
import torch
from scipy.optimize import nnls
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from flexmol.data.collate import atom_budget_batches, collate
from flexmol.data.integrity import MODALITY_OF_SOURCE, DataError, check_record, checked_records, read_manifest
from flexmol.model.network import FlexMol, ModelConfig
from flexmol.objectives.stages import ObjectiveConfig, pretraining_losses
from flexmol.scaling import ScalingError

FORMAT, VERSION = "flexmol-flops", 1
MODALITIES = ("paired", "2d", "3d")
# The coefficients, named by the work counter each multiplies (useful work); the padded work
# multiplies the same coefficients by the padded counters.
TERMS = ("molecules", "atoms", "atom_pairs", "batch_pairs")
PADDED = {"molecules": "molecules", "atoms": "padded_atoms", "atom_pairs": "padded_pairs",
          "batch_pairs": "batch_pairs"}
COUNTERS = ("molecules", "atoms", "atom_pairs", "padded_atoms", "padded_pairs", "batch_pairs")

_aten = torch.ops.aten
CPU_ATTENTION = {
    _aten._scaled_dot_product_flash_attention_for_cpu:
        lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v),
    _aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda grad, q, k, v, *args, out_shape=None, **kwargs: sdpa_backward_flop_count(grad, q, k, v),
}


# -- counting ----------------------------------------------------------------------------------

def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of the matrix products ``fn()`` runs (FlopCounterMode with :data:`CPU_ATTENTION`)."""
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION) as counter:
        fn()
    return counter.get_total_flops()


def prepare(model: FlexMol, stage: int) -> FlexMol:
    """``model`` as the trainer trains it in ``stage``: training mode, the stage's frozen
    parameters without gradient. (The counts do not depend on the latter today: in stage 2 the
    objectives run the feature learners without gradient, ``train_feature_learners=False``.)"""
    from flexmol.objectives.stages import frozen_parameters

    for p in model.parameters():
        p.requires_grad_(True)
    for p in frozen_parameters(model, stage).values():
        p.requires_grad_(False)
    return model.train()


def step_flops(model: FlexMol, batch: dict, objective: ObjectiveConfig, stage: int) -> int:
    """FLOPs of one training micro-step on ``batch``: the losses' forward and ``total.backward()``,
    as the trainer runs them in ``stage`` (``model`` from :func:`prepare`)."""
    def step():
        losses = pretraining_losses(model, batch, objective, torch.Generator().manual_seed(0),
                                    train_feature_learners=stage == 1)
        losses["total"].backward()

    flops = count_flops(step)
    model.zero_grad(set_to_none=True)
    return flops


def batch_work(mask: torch.Tensor | np.ndarray) -> dict[str, int]:
    """The work counters of one batch (``batch["mask"]`` [B, N_pad]): molecules B, atoms sum n_i,
    atom_pairs sum n_i^2, padded_atoms B*N_pad, padded_pairs B*N_pad^2, batch_pairs B^2 — what
    the trainer sums per source (:func:`flexmol.train.trainer.batch_work`), with the molecules."""
    from flexmol.train.trainer import WORK, batch_work as counters

    m = torch.as_tensor(np.asarray(mask.cpu() if isinstance(mask, torch.Tensor) else mask, dtype=bool))
    return {"molecules": int(m.shape[0]), **{k: int(v) for k, v in zip(WORK, counters(m).tolist())}}


def _design(shapes: np.ndarray) -> np.ndarray:
    """Rows [B, B*N, B*N^2, B^2] of (B, N) shapes: the terms of :data:`TERMS`."""
    b, n = shapes[:, 0].astype(float), shapes[:, 1].astype(float)
    return np.stack([b, b * n, b * n * n, b * b], axis=1)


# -- the fitted model --------------------------------------------------------------------------

@dataclasses.dataclass
class FlopModel:
    """Training FLOPs per micro-step of one model size and stage, per modality: ``coefficients``
    {modality: {term: FLOPs}} with the terms of :data:`TERMS`. ``fits`` keeps, per modality, the
    measured points ([B, N, flops]) and held-out batches ([B, N, flops, predicted]) and their
    largest relative errors. JSON through :meth:`to_dict` / :meth:`from_dict`."""

    key: str
    model: dict
    stage: int
    objective: dict
    parameters: int
    coefficients: dict
    fits: dict
    seconds: float
    torch: str

    # -- estimates
    def batch_flops(self, modality: str, molecules: int, atoms: int) -> float:
        """FLOPs of one step on a batch of ``molecules`` padded to ``atoms`` atoms."""
        c = self._coefficients(modality)
        b, n = molecules, atoms
        return c["molecules"] * b + c["atoms"] * b * n + c["atom_pairs"] * b * n * n + c["batch_pairs"] * b * b

    def per_molecule(self, n_atoms: float, modality: str, batch: int = 1) -> float:
        """FLOPs per molecule of ``n_atoms`` atoms trained in a batch of ``batch`` molecules of its
        size (the batch-pair term grows with the batch): c_molecule + c_atom*n + c_pair*n^2 +
        c_batch*batch."""
        c = self._coefficients(modality)
        return c["molecules"] + c["atoms"] * n_atoms + c["atom_pairs"] * n_atoms ** 2 + c["batch_pairs"] * batch

    def total(self, work: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
        """A run's FLOPs from its work counters per source (``paired``, ``single_2d``,
        ``single_3d``; the counters of :data:`COUNTERS`, summed over its batches):
        ``flops`` counts each molecule at its own atom count, ``flops_padded`` the padded batches
        the steps ran. A source without molecules costs nothing."""
        useful = padded = 0.0
        for source, counters in work.items():
            if source not in MODALITY_OF_SOURCE:
                raise ScalingError(f"work: unknown source {source!r} (sources: {', '.join(MODALITY_OF_SOURCE)})")
            if not isinstance(counters, Mapping):
                raise ScalingError(f"work[{source!r}]: counters must be a mapping, got {type(counters).__name__}")
            values = {}
            for k in COUNTERS:
                v = counters.get(k)
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                    raise ScalingError(f"work[{source!r}][{k!r}]: must be a non-negative number, got {v!r}")
                values[k] = v
            if not values["molecules"]:
                continue
            c = self._coefficients(MODALITY_OF_SOURCE[source], f"work[{source!r}]")
            useful += sum(c[t] * values[t] for t in TERMS)
            padded += sum(c[t] * values[PADDED[t]] for t in TERMS)
        return {"flops": useful, "flops_padded": padded}

    def _coefficients(self, modality: str, where: str = "modality") -> dict:
        if modality not in self.coefficients:
            raise ScalingError(f"{where}: the FLOP model of {self.key} measured {sorted(self.coefficients)}, not "
                               f"{modality!r}; measure it with {modality} records")
        return self.coefficients[modality]

    # -- JSON
    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: object, where: str = "FLOP model") -> "FlopModel":
        """The model of :meth:`to_dict`'s dict; a :class:`ScalingError` naming ``where`` and the
        key when a value is missing or not what it must be."""
        def fail(key, why):
            raise ScalingError(f"{where}: key {key!r}: {why}")

        if not isinstance(d, Mapping):
            raise ScalingError(f"{where}: not a JSON object")
        if d.get("format") != FORMAT or d.get("version") != VERSION:
            fail("format", f"not a {FORMAT} version {VERSION} file (format {d.get('format')!r}, "
                           f"version {d.get('version')!r})")
        kinds = {"key": str, "model": dict, "stage": int, "objective": dict, "parameters": int, "coefficients": dict,
                 "fits": dict, "seconds": (int, float), "torch": str}
        for key, kind in kinds.items():
            if key not in d:
                fail(key, "missing")
            if not isinstance(d[key], kind) or isinstance(d[key], bool):
                fail(key, f"expected {kind.__name__ if isinstance(kind, type) else 'a number'}, got {d[key]!r}")
        if d["stage"] not in (1, 2):
            fail("stage", f"must be 1 or 2, got {d['stage']}")
        for modality, c in d["coefficients"].items():
            if modality not in MODALITIES:
                fail("coefficients", f"unknown modality {modality!r} (modalities: {', '.join(MODALITIES)})")
            for t in TERMS:
                v = c.get(t) if isinstance(c, Mapping) else None
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                    fail(f"coefficients.{modality}.{t}", f"must be a non-negative number, got {v!r}")
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls)})

    @classmethod
    def load(cls, path: str | Path) -> "FlopModel":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ScalingError(f"{path}: not a readable FLOP model ({_first_line(exc)})") from None
        return cls.from_dict(d, str(path))

    def save(self, path: str | Path) -> Path:
        from flexmol.data.shards import atomic_write_text

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1) + "\n")
        return path


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


# -- measuring ---------------------------------------------------------------------------------

def cache_key(model_cfg: ModelConfig, stage: int, objective: ObjectiveConfig, modalities: Iterable[str]) -> str:
    """What a FLOP model depends on: the model's sizes, the stage, the objective and the modalities
    measured (16 hex digits of a sha256). Not the molecules nor the atom budget: the cost is a
    function of the batch shape alone (see the module docstring), and the fit is exact."""
    payload = json.dumps({"model": dataclasses.asdict(model_cfg), "stage": stage,
                          "objective": dataclasses.asdict(objective), "modalities": sorted(modalities),
                          "version": VERSION}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _batchable(records: Sequence[dict], modality: str) -> list[dict]:
    """``records`` relabelled as ``modality`` (a paired record serves a 2D or 3D batch too), each
    checked as training checks it."""
    out = []
    for i, r in enumerate(records):
        rec = dict(r, modality=modality)
        why = check_record(rec, modality)
        if why:
            raise ScalingError(f"records[{modality!r}][{i}] (molecule {r.get('id', '?')!r}): cannot make a "
                               f"{modality} batch: {why}")
        out.append(rec)
    return out


def _fit_shapes(sizes: np.ndarray, max_atoms: int, counts: int = 4, largest_batch: int = 8) -> list[tuple[int, int]]:
    """The (B, N) shapes to fit on: ``counts`` atom counts spread over those of the records, each
    with batches of 1, 2, 4, ... molecules up to ``largest_batch``, the atom budget and the records
    of at most that many atoms."""
    distinct = np.unique(sizes)
    picked = distinct[np.unique(np.linspace(0, len(distinct) - 1, min(counts, len(distinct))).round().astype(int))]
    shapes = []
    for n in picked.tolist():
        most = min(largest_batch, max_atoms // n, int((sizes <= n).sum()))
        b = 1
        while b <= most:
            shapes.append((b, n))
            b *= 2
    return shapes


def _batch_of_shape(records: list[dict], sizes: np.ndarray, b: int, n: int) -> list[dict]:
    """``b`` records of at most ``n`` atoms, the largest first (a batch padded to ``n`` atoms:
    molecules of one atom count where there are enough, mixed with smaller ones otherwise)."""
    order = np.argsort(-sizes, kind="stable")
    fitting = order[sizes[order] <= n]
    return [records[i] for i in fitting[:b]]


def _held_out(records: list[dict], max_atoms: int, seed: int, taken: set) -> list[list[dict]]:
    """Training-like batches (the first of a shuffled stream batched by atom budget, at
    ``max_atoms``, half and a quarter of it) whose shapes are not among the fitted ones."""
    shuffled = [records[i] for i in np.random.default_rng(seed).permutation(len(records))]
    out = []
    for budget in (max_atoms, max_atoms // 2, max_atoms // 4):
        if budget < max(len(r["z"]) for r in records):
            continue
        batch = next(atom_budget_batches(shuffled, budget))
        shape = (len(batch), max(len(r["z"]) for r in batch))
        if shape not in taken:
            taken.add(shape)
            out.append(batch)
    return out


def _fit(points: np.ndarray) -> dict[str, float]:
    """The coefficients of [B, N, flops] rows: non-negative least squares of the relative
    residuals, rounded to integers (each matrix product counts 2*m*n*k over integer sizes, so a
    right form has integer coefficients)."""
    x = _design(points[:, :2])
    y = points[:, 2].astype(float)
    rows = x / y[:, None]
    scale = np.abs(rows).max(axis=0)
    scale[scale == 0] = 1.0
    c, _ = nnls(rows / scale, np.ones(len(y)))
    return {t: float(round(v)) for t, v in zip(TERMS, c / scale)}


def _relative_errors(coefficients: dict, points: np.ndarray) -> np.ndarray:
    predicted = _design(points[:, :2]) @ np.array([coefficients[t] for t in TERMS])
    return predicted / points[:, 2] - 1.0


def _worst(errors: np.ndarray, points: np.ndarray) -> str:
    i = int(np.abs(errors).argmax())
    return f"{100 * errors[i]:+.3g}% on {int(points[i, 0])} molecules x {int(points[i, 1])} atoms"


# The fitted points' largest relative residual that a right form leaves: float rounding (~1e-15).
EXACT = 1e-9


def measure(model_cfg: ModelConfig, records: Mapping[str, Sequence[dict]], *, stage: int = 1,
            objective: Optional[ObjectiveConfig] = None, max_atoms: int = 2048, tolerance: float = 0.01,
            seed: int = 0, log: Optional[Callable[[str], None]] = None) -> FlopModel:
    """Measure and fit the FLOP model of ``model_cfg`` in ``stage`` for each modality of
    ``records`` ({"paired" | "2d" | "3d": real records}; a paired record serves all three).

    A CPU model in training mode runs :func:`step_flops` on batches of :func:`_fit_shapes` (at
    least three atom counts are needed to separate the atom and pair terms) and on held-out
    training-like batches at ``max_atoms``. Two checks, each a :class:`ScalingError`: the fit must
    reproduce every fitted count exactly (to :data:`EXACT`; a residual means a cost term the form
    lacks, e.g. N^3 from a triangle update, which over one data set's atom counts a quadratic
    mimics to within a percent), and predict the held-out batches within ``tolerance``; ``seed``
    orders their stream. The meta device does not do: the objectives pick masked atoms by value
    (``mask_atoms``)."""
    from flexmol.model.summary import build_model, count

    objective = objective or ObjectiveConfig()
    if stage not in (1, 2):
        raise ScalingError(f"stage: must be 1 or 2, got {stage!r}")
    if not records:
        raise ScalingError("records: no modality to measure")
    unknown = set(records) - set(MODALITIES)
    if unknown:
        raise ScalingError(f"records: unknown modality {sorted(unknown)} (modalities: {', '.join(MODALITIES)})")
    if max_atoms < 1:
        raise ScalingError(f"max_atoms: must be positive, got {max_atoms}")
    started = time.perf_counter()
    model = prepare(build_model(model_cfg, "model", error=ScalingError), stage)  # its weights do not matter
    coefficients, fits = {}, {}
    for modality in (m for m in MODALITIES if m in records):
        recs = [r for r in _batchable(records[modality], modality) if len(r["z"]) <= max_atoms]
        sizes = np.array([len(r["z"]) for r in recs])
        if len(np.unique(sizes)) < 3:
            raise ScalingError(f"records[{modality!r}]: molecules of {len(np.unique(sizes))} atom count(s) within "
                               f"max_atoms {max_atoms}; at least 3 are needed to tell the per-atom and per-pair "
                               "costs apart")
        shapes = _fit_shapes(sizes, max_atoms)
        points = np.array([(b, n, step_flops(model, collate(_batch_of_shape(recs, sizes, b, n)), objective, stage))
                           for b, n in shapes], dtype=float)
        c = _fit(points)
        errors = _relative_errors(c, points)
        if np.abs(errors).max() > EXACT:
            raise ScalingError(
                f"FLOP model of {modality} batches: the counts are not c_molecule*B + c_atom*B*N + c_pair*B*N^2 + "
                f"c_batch*B^2 (residual {_worst(errors, points)}): the model has a cost term beyond these (e.g. "
                "B*N^3 from a triangle update), or a cost that depends on the molecules, not only on the padded "
                "batch shape")
        held = []
        for batch in _held_out(recs, max_atoms, seed, set(shapes)):
            collated = collate(batch)
            b, n = collated["mask"].shape
            held.append((b, n, step_flops(model, collated, objective, stage)))
        held = np.array(held, dtype=float).reshape(-1, 3)
        held_errors = _relative_errors(c, held)
        worst = float(np.abs(held_errors).max()) if len(held) else 0.0
        if worst > tolerance:
            raise ScalingError(f"FLOP model of {modality} batches: a held-out batch is predicted "
                               f"{_worst(held_errors, held)} off its count (tolerance {100 * tolerance:g}%)")
        coefficients[modality] = c
        predicted = _design(held[:, :2]) @ np.array([c[t] for t in TERMS])
        fits[modality] = {
            "points": points.astype(int).tolist(), "max_relative_error": float(np.abs(errors).max()),
            "held_out": [[int(b), int(n), int(f), float(p)] for (b, n, f), p in zip(held, predicted)],
            "held_out_max_relative_error": worst}
        if log:
            log(f"{modality}: {len(points)} shapes fitted exactly, {len(held)} held-out batches, largest error "
                f"{100 * worst:.2g}%")
    return FlopModel(key=cache_key(model_cfg, stage, objective, coefficients), model=dataclasses.asdict(model_cfg),
                     stage=stage, objective=dataclasses.asdict(objective), parameters=count(model),
                     coefficients=coefficients, fits=fits, seconds=round(time.perf_counter() - started, 3),
                     torch=torch.__version__)


def flop_model(model_cfg: ModelConfig, records: Mapping[str, Sequence[dict]], *, stage: int, cache_dir: str | Path,
               objective: Optional[ObjectiveConfig] = None, **measure_kw) -> FlopModel:
    """The FLOP model of (``model_cfg``, ``stage``, ``objective``, the modalities of ``records``):
    read from ``cache_dir/flops-<key>.json`` when there, otherwise :func:`measure`-d and written
    there."""
    objective = objective or ObjectiveConfig()
    key = cache_key(model_cfg, stage, objective, records)
    path = Path(cache_dir) / f"flops-{key}.json"
    if path.exists():
        cached = FlopModel.load(path)
        if cached.key != key:
            raise ScalingError(f"{path}: holds the FLOP model {cached.key}, not {key} (remove it to measure again)")
        return cached
    found = measure(model_cfg, records, stage=stage, objective=objective, **measure_kw)
    found.save(path)
    return found


# -- before a run --------------------------------------------------------------------------------

def sample_records(directory: str | Path, *, limit: int = 1024, key: str = "dataset") -> tuple[str, list[dict]]:
    """(modality, the first ``limit`` records) of a dataset directory, from its first shards, checked
    as training checks them; ``key`` (the config key that named the directory) is in the errors."""
    from flexmol.config import ConfigError

    try:
        manifest = read_manifest(directory, key)
        modality = manifest.get("modality")
        if modality not in MODALITIES:
            raise ScalingError(f"{key}: {directory} holds {modality!r} data, not one of {', '.join(MODALITIES)}")
        out: list[dict] = []
        for shard in manifest["shards"]:
            if shard["samples"] == 0:
                continue
            for rec in checked_records(str(Path(directory) / shard["name"]), modality, what=key):
                out.append(rec)
                if len(out) == limit:
                    return modality, out
    except (ConfigError, DataError) as exc:
        raise ScalingError(str(exc)) from None
    if not out:
        raise ScalingError(f"{key}: {directory} holds no molecules")
    return modality, out


def planned_work(molecules: Mapping[str, int], sizes: Mapping[str, Sequence[int]], max_atoms: int,
                 seed: int = 0) -> dict[str, dict[str, float]]:
    """Expected work counters (:func:`batch_work`, summed) of a run that trains on
    ``molecules[source]`` molecules of each source, from a sample of the source's atom counts
    (``sizes[source]``, e.g. from :func:`sample_records`): the sample, shuffled, batched by the
    atom budget as training batches it (:func:`~flexmol.data.collate.atom_budget_batches`), its
    per-molecule averages scaled to the molecules. Feed it to :meth:`FlopModel.total`."""
    out = {}
    for source, m in molecules.items():
        if source not in MODALITY_OF_SOURCE:
            raise ScalingError(f"molecules: unknown source {source!r} (sources: {', '.join(MODALITY_OF_SOURCE)})")
        sample = np.asarray(sizes.get(source, ()), dtype=np.int64)
        if not len(sample):
            raise ScalingError(f"sizes[{source!r}]: no atom counts to estimate {source} batches from")
        if sample.min() < 1 or sample.max() > max_atoms:
            raise ScalingError(f"sizes[{source!r}]: atom counts must be within 1..max_atoms ({max_atoms}), got "
                               f"{sample.min()}..{sample.max()}")
        shuffled = np.random.default_rng(seed).permutation(sample)
        totals = dict.fromkeys(COUNTERS, 0)
        stream = ({"modality": source, "z": range(n)} for n in shuffled.tolist())
        for batch in atom_budget_batches(stream, max_atoms):
            lengths = np.array([len(r["z"]) for r in batch])
            mask = np.arange(lengths.max()) < lengths[:, None]
            for k, v in batch_work(mask).items():
                totals[k] += v
        out[source] = {k: v * m / len(sample) for k, v in totals.items()}
    return out
