"""The data a pre-training run trains on, built from its config: each source's training and
held-out shards (checked at start-up), the mixing schedule, and the mixed stream whose state
(every rank's positions, the records seen) a checkpoint holds and a resumed run continues from.

Sources are those of :data:`flexmol.train.config.SOURCES` (one config key each in ``data`` and
``validation``), each of one batch modality (:data:`flexmol.data.integrity.MODALITY_OF_SOURCE`).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from flexmol.config import ConfigError
from flexmol.data.integrity import MODALITY_OF_SOURCE, dataset_shards
from flexmol.data.streams import MixedStream, MixingSchedule, MixPoint, SourceStream, heldout_records
from flexmol.train.config import SOURCES, PretrainConfig

# Per source, cumulative over the run (all ranks): for a batch of B molecules padded to N atoms
# (n_i each), atoms += sum n_i, atom_pairs += sum n_i^2, padded_atoms += B*N, padded_pairs += B*N^2,
# batch_pairs += B^2. With the molecules seen they give the run's compute exactly for a network whose
# cost is polynomial in atoms (per-atom layers, an O(n^2) pair track, in-batch negatives).
WORK = ("atoms", "atom_pairs", "padded_atoms", "padded_pairs", "batch_pairs")


def batch_work(mask: torch.Tensor) -> torch.Tensor:
    """:data:`WORK` of one batch from its [B, N] atom mask (float64, on the host)."""
    n = mask.sum(dim=1, dtype=torch.float64)
    b, width = mask.shape
    return torch.tensor([n.sum().item(), (n * n).sum().item(), b * width, b * width * width, b * b],
                        dtype=torch.float64)


def object_gather(world: int):
    """A function of an object giving every rank's one, in rank order (the findings of
    :func:`flexmol.data.integrity.verify_checksums`, a bad record met while training, the records
    each rank's batches held)."""
    def gather(items):
        if torch.cuda.is_available():  # the NCCL object collective runs on this rank's device
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        out = [None] * world
        torch.distributed.all_gather_object(out, items)
        return out

    return gather


def _checked_urls(dirs, key: str, modality: str, shards: list | None = None) -> list[str]:
    """The shards of the datasets ``dirs`` given as config key ``key``, refusing at start-up what
    would fail later (:func:`flexmol.data.integrity.dataset_shards`: every shard the manifest lists
    present with its recorded size). The checked shards are appended to ``shards``."""
    urls = []
    for d in dirs:
        got = dataset_shards(d, key, modality)
        if shards is not None:
            shards.extend(got)
        urls += [s["url"] for s in got if s["samples"] > 0]
    return urls


def split_sources(cfg: PretrainConfig, shards: list | None = None
                  ) -> tuple[dict[str, list[str]], dict[str, list[str]], list[str]]:
    """Training and held-out shards per source, and notes on what was decided. A source with
    held-out directories in ``validation.<source>`` trains on all its shards; otherwise each of its
    datasets holds out its last ``validation.holdout_shards`` shards when it has more than that.
    Every dataset's shards are checked (and appended to ``shards``, for the checksums)."""
    train, valid, notes = {}, {}, []
    v = cfg.validation
    for key in SOURCES:
        data_dirs, valid_dirs = getattr(cfg.data, key), getattr(v, key)
        both = {str(Path(d).resolve()) for d in valid_dirs} & {str(Path(d).resolve()) for d in data_dirs}
        if both:
            raise ConfigError(f"config key 'validation.{key}': {sorted(both)} also in data.{key}; held-out data "
                              "must not be trained on")
        if valid_dirs:
            valid[key] = _checked_urls(valid_dirs, f"validation.{key}", MODALITY_OF_SOURCE[key], shards)
        if not data_dirs:
            continue
        train[key] = []
        for d in data_dirs:
            got = _checked_urls([d], f"data.{key}", MODALITY_OF_SOURCE[key], shards)
            if not valid_dirs and v.holdout_shards and len(got) > v.holdout_shards:
                got, out = got[:-v.holdout_shards], got[-v.holdout_shards:]
                valid.setdefault(key, []).extend(out)
                notes.append(f"{key}: {d}: {len(out)} of {len(got) + len(out)} shards held out for validation")
            elif not valid_dirs:
                notes.append(f"{key}: {d}: no validation ({len(got)} shard(s), validation.holdout_shards="
                             f"{v.holdout_shards}; set validation.{key}=[DIR] for a held-out dataset)")
            train[key] += got
    return train, valid, notes


def subset_notes(cfg: PretrainConfig, sources: dict[str, list[str]], shards: list[dict]) -> list[str]:
    """``data.subset`` against the molecules of each source's training shards (``shards``: the dicts
    of :func:`split_sources`): a :class:`ConfigError` naming the key when a subset is larger than its
    source; otherwise a note per subset."""
    samples = {s["url"]: s["samples"] for s in shards}
    notes = []
    for key, size in cfg.data.subset.items():
        held = sum(samples[u] for u in sources.get(key, []))
        if size > held:
            raise ConfigError(f"config key 'data.subset.{key}': {size} molecules, but the training shards of "
                              f"data.{key} hold {held}")
        notes.append(f"{key}: the first {size} of its {held} molecules in a fixed permutation (data.subset.{key}, "
                     f"data.subset_seed={cfg.data.subset_seed})")
    return notes


class TrainingData:
    """The data mix of ``cfg``: ``sources`` (training shards by source), ``heldout`` (held-out
    shards by source), ``shards`` (every checked shard's manifest entry, for the checksums),
    ``notes`` (what was decided, to print) and the ``schedule``; after :meth:`open`, the
    ``stream`` (a :class:`~flexmol.data.streams.MixedStream`) and the counts of what it gave:
    ``seen`` (molecules), ``skipped`` (bad records) and ``work`` (:data:`WORK`) per source, all
    ranks. Everything here is checked by each rank alone, before any process group exists."""

    def __init__(self, cfg: PretrainConfig):
        self.cfg = cfg
        self.shards: list[dict] = []
        self.sources, self.heldout, notes = split_sources(cfg, self.shards)
        self.notes = notes + subset_notes(cfg, self.sources, self.shards)
        self.schedule = MixingSchedule([MixPoint(p.step, dict(p.weights)) for p in cfg.data.mix], list(self.sources))
        self.stream: MixedStream | None = None
        self.world = 1
        self.seen = {k: 0 for k in self.sources}
        self.skipped = {k: 0 for k in self.sources}
        self.work = {k: dict.fromkeys(WORK, 0) for k in self.sources}

    def drawn(self) -> list[str]:
        """The training sources the schedule gives weight at some step (it is piecewise linear
        between its points and constant after the last, so its points tell)."""
        return [k for k in self.sources if any(p.weights.get(k, 0.0) > 0 for p in self.schedule.points)]

    def check_modalities(self, objective) -> None:
        """A :class:`ConfigError` naming the key, the source and the objective when a source of
        this mix (drawn, or scored on its held-out shards) holds a modality ``objective`` does not
        train on."""
        drawn = self.drawn()
        for key in SOURCES:
            modality = MODALITY_OF_SOURCE[key]
            if modality in objective.modalities or (key not in self.sources and key not in self.heldout):
                continue
            trains = ", ".join(sorted(objective.modalities))
            if key in drawn:
                where, what = "data.mix", f"draws data.{key} ({modality} molecules)"
            elif key in self.sources:
                where, what = f"data.{key}", f"holds {modality} molecules (held out for validation)"
            else:
                where, what = f"validation.{key}", f"holds {modality} molecules"
            raise ConfigError(f"config key '{where}': {what}, but the {objective.name} objective trains on {trains} "
                              f"only (recipe={self.cfg.recipe})")

    def samples(self, count: int) -> dict[str, list[dict]]:
        """Up to ``count`` records of each training source: an equal share of the first ones of
        each of its training shards (:func:`~flexmol.data.streams.heldout_records`), so that a
        dataset stored in an order (QM9's grows with the molecules' size) is represented by more
        than its start; the same on every rank and every resume. Records that do not decode are
        left out here; training meets and reports them."""
        if count <= 0:
            return {k: [] for k in self.sources}
        return {k: heldout_records(urls, count, on_bad_record="skip") for k, urls in self.sources.items()}

    def open(self, *, world: int, step: int, max_spd: int, max_path: int, labels=(), log=None) -> MixedStream:
        """The mixed stream at optimizer ``step`` 0 (positions: :meth:`load_state_dict`), its
        batches collated for a model of ``max_spd`` / ``max_path`` and, with ``labels``, carrying
        those record labels. ``world``: the ranks, whose records merge when counted."""
        d, t = self.cfg.data, self.cfg.train
        extra = {"labels": list(labels)} if labels else {}
        self.world = world
        self.stream = MixedStream(
            {k: SourceStream(k, urls, max_atoms=d.max_atoms, seed=t.seed, shuffle_buffer=d.shuffle_buffer,
                             num_workers=d.num_workers, max_spd=max_spd, max_path=max_path,
                             on_bad_record=d.on_bad_record, subset=d.subset.get(k), subset_seed=d.subset_seed,
                             log=log, **extra)
             for k, urls in self.sources.items()},
            self.schedule, t.seed, step=step * t.grad_accum, grad_accum=t.grad_accum)
        for source in self.stream.sources.values():  # several ranks: their records merge when logged
            source.coverage.deferred = world > 1
        return self.stream

    def count(self, molecules: dict[str, int], skipped: dict[str, int], work: dict[str, list[float]]) -> None:
        """Add one step's molecules, skipped records and :data:`WORK` per source (all ranks)."""
        for k, n in molecules.items():
            self.seen[k] += n
            for name, value in zip(WORK, work[k]):
                self.work[k][name] += int(value)
        for k, n in skipped.items():
            if k in self.skipped:
                self.skipped[k] += n

    def layout(self) -> dict:
        """What the meaning of a stream position depends on, by config key: a checkpoint's
        positions resume only a run that agrees on each."""
        d = self.cfg.data
        layout = {"world size": self.world, "data.num_workers": max(1, d.num_workers),
                  "data.shuffle_buffer": max(1, d.shuffle_buffer), "train.seed": self.cfg.train.seed,
                  "data.subset_seed": d.subset_seed}
        for k, s in self.stream.sources.items():
            layout[f"data.{k}"] = f"{s.plan.records} training molecules in {len(s.urls)} shards"
            layout[f"data.subset.{k}"] = d.subset.get(k)
        return layout

    def merge_coverage(self) -> None:
        """The records every rank's batches held since the last merge, added to every rank's map
        (one gather of a few steps' record numbers), so that ``unique`` counts all ranks."""
        sources = self.stream.sources
        mine = {k: s.coverage.take_pending() for k, s in sources.items()}
        parts = object_gather(self.world)(mine) if self.world > 1 else [mine]
        for k, s in sources.items():
            s.coverage.merge([p[k] for p in parts])

    def seen_report(self) -> dict[str, dict]:
        """Per source: molecules seen, unique molecules seen, the molecules it can yield (its subset
        or all its records) and passes over them (seen / those), every rank counted. Exact after
        :meth:`merge_coverage`."""
        out = {}
        for k, s in self.stream.sources.items():
            size = s.plan.subset_records
            out[k] = {"seen": self.seen[k], "unique": s.coverage.unique, "of": size, "passes": self.seen[k] / size}
        return out

    def state_dict(self) -> dict:
        """The client state of a checkpoint (every rank must call): ``stream`` (the schedule's
        position, every rank's stream positions, gathered: ZeRO 1 and 2 reload rank 0's client state
        on every rank, and the :meth:`layout`), ``coverage`` (the records seen, merged over the
        ranks), and the counts ``seen``, ``skipped``, ``work``."""
        self.merge_coverage()
        state = self.stream.state_dict()
        ranks = object_gather(self.world)(state["sources"]) if self.world > 1 else [state["sources"]]
        return {"stream": {"step": state["step"], "ranks": ranks, "layout": self.layout()},
                "coverage": {k: s.coverage.state_dict() for k, s in self.stream.sources.items()},
                "seen": dict(self.seen), "skipped": dict(self.skipped),
                "work": {k: dict(w) for k, w in self.work.items()}}

    def load_state_dict(self, client: dict, where: Path, rank: int, step: int) -> None:
        """Continue from a checkpoint's client state (of :meth:`state_dict`, written at optimizer
        ``step``): the counts, this ``rank``'s stream positions and the records seen, after checking
        that the run reads its data as the checkpoint's did (a :class:`ConfigError` naming the key
        that differs, and ``where``)."""
        self.seen.update(client.get("seen", {}))
        self.skipped.update(client.get("skipped", {}))
        for k, w in client.get("work", {}).items():
            self.work[k].update(w)
        saved, layout = client["stream"].get("layout", {}), self.layout()
        for key, now in layout.items():
            if key in saved and saved[key] != now:
                name = "resume" if key == "world size" else key
                raise ConfigError(f"config key '{name}': checkpoint {where} was written with {key} {saved[key]}, this "
                                  f"run has {now}; the streams' positions depend on it (resume with the same, or "
                                  "resume=none to start afresh)")
        try:
            self.stream.load_state_dict({"step": client["stream"]["step"], "sources": client["stream"]["ranks"][rank]})
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise ConfigError(f"config key 'resume': checkpoint {where} holds no usable stream state for rank "
                              f"{rank} ({type(exc).__name__}: {exc}); resume=none starts afresh") from None
        # the schedule's position counts micro-batches: a run resumed with another train.grad_accum
        # draws its sources at the optimizer step it stands at (the streams' positions do not depend on it)
        self.stream.step = step * self.cfg.train.grad_accum
        for k, bits in client.get("coverage", {}).items():
            if k in self.stream.sources:
                try:
                    self.stream.sources[k].coverage.load_state_dict(bits)
                except ValueError as exc:
                    raise ConfigError(f"config key 'resume': checkpoint {where}: data.{k}: {exc}") from None
