"""Training streams: one deterministic, resampled stream per dataset, mixed per batch by a schedule.

- Each source (a list of dataset directories of one modality) is an endless WebDataset pipeline:
  ``ResampledShards(deterministic=True)`` seeded by (seed, rank, worker, epoch), a shuffle buffer
  and a conformer draw seeded by (seed, rank, worker), decoding, atom-budget batching and
  collation inside the DataLoader workers. Every rank and worker resamples shards on its own, so
  a dataset of one shard feeds any number of ranks and workers; with fewer shards than readers,
  each reader keeps a disjoint share of every shard.
- The source of each micro-batch is drawn by an RNG seeded from (seed, optimizer step, micro-batch)
  alone, with the schedule's weights at that optimizer step, so every rank draws the same source
  and runs the same modules (ZeRO-3 deadlocks otherwise) and a ramp "by step" means optimizer steps
  whatever the gradient accumulation.
- State is the step and, per source, the number of batches taken. The DataLoader hands out its
  workers' batches in turn, so batch ``p`` of the stream (counted from its very start) is batch
  ``p // W`` of worker ``p % W`` (W loader workers). A worker's seeds, shard share and skip count
  come from its *logical* number, not from the DataLoader's: a loader started after ``taken``
  batches gives its worker ``i`` the logical number ``(i + taken) % W``. Its first batch (from its
  worker 0) is then the one of logical worker ``taken % W``, the one the uninterrupted stream
  hands out at position ``taken``, and the round-robin continues in step with the original order
  whatever ``taken % W`` is. Each logical worker regenerates and drops the batches it produced
  before the checkpoint (records are decoded and batched, not collated), and the batch sequence
  continues exactly where it stopped.
- Records are checked as they are read (:mod:`flexmol.data.integrity`): a shard that ends early or
  a record that does not decode or would not make a valid batch stops the stream with one line
  naming the dataset, shard and record (``on_bad_record="stop"``), or is dropped and counted
  (``"skip"``; the count of each batch travels with it, so a resumed stream counts exactly what
  the uninterrupted one did).
"""
from __future__ import annotations

import bisect
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
import webdataset as wds

from flexmol.data.collate import atom_budget_batches, collate
from flexmol.data.integrity import (MODALITY_OF_SOURCE, DataError, RecordGuard, batch_problem, checked_records,
                                    value_problem)
from flexmol.data.shards import load_manifest

SOURCES = ("paired", "single_2d", "single_3d")


@dataclass
class MixPoint:
    """Source weights from ``step`` on; between two points the weights move linearly."""

    step: int = 0
    weights: dict = field(default_factory=lambda: {"paired": 1.0})


class MixingSchedule:
    """Per-source sampling weights as a function of the training step (piecewise linear, constant
    after the last point). Sources absent from the run get weight 0 whatever the schedule says."""

    def __init__(self, points: Sequence[MixPoint], available: Sequence[str]):
        if not points:
            raise ValueError("the mixing schedule needs at least one point")
        self.points = sorted(points, key=lambda p: p.step)
        self.available = [s for s in SOURCES if s in available]
        for p in self.points:
            unknown = set(p.weights) - set(SOURCES)
            if unknown:
                raise ValueError(f"mixing schedule at step {p.step}: unknown source(s) {sorted(unknown)}")
            if any(w < 0 for w in p.weights.values()):
                raise ValueError(f"mixing schedule at step {p.step}: negative weight")
        for step in {p.step for p in self.points} | {self.points[-1].step + 1}:
            if self._raw(step).sum() <= 0:
                raise ValueError(f"mixing schedule gives no weight to any available source ({self.available}) at step {step}")

    def _raw(self, step: int) -> np.ndarray:
        steps = [p.step for p in self.points]
        i = bisect.bisect_right(steps, step) - 1
        if i < 0:
            w = self.points[0].weights
            return np.array([w.get(s, 0.0) for s in self.available])
        a = self.points[i]
        if i + 1 == len(self.points):
            return np.array([a.weights.get(s, 0.0) for s in self.available])
        b = self.points[i + 1]
        t = (step - a.step) / (b.step - a.step)
        return np.array([(1 - t) * a.weights.get(s, 0.0) + t * b.weights.get(s, 0.0) for s in self.available])

    def weights(self, step: int) -> dict[str, float]:
        raw = self._raw(step)
        return dict(zip(self.available, raw / raw.sum()))

    def choose(self, step: int, seed: int, micro: int = 0) -> str:
        """The source of micro-batch ``micro`` of optimizer step ``step``: a function of (seed, step,
        micro) only, identical on every rank; the weights are the schedule's at ``step``."""
        w = self._raw(step)
        # micro 0 keeps the (seed, step) draw of runs without gradient accumulation
        rng = np.random.default_rng([seed, step] if micro == 0 else [seed, step, micro])
        return self.available[int(rng.choice(len(w), p=w / w.sum()))]


def dataset_urls(directories: Sequence[str]) -> list[str]:
    urls = []
    for d in directories:
        m = load_manifest(Path(d))
        urls += [str(Path(d) / s["name"]) for s in m["shards"] if s["samples"] > 0]
    return urls


def _worker_identity(offset: int) -> tuple[int, int, int, int]:
    """(rank, world, logical worker, workers) of the calling loader worker: the DataLoader's worker
    ``i`` plays logical worker ``(i + offset) % workers`` (``offset``: batches taken before this
    loader started, modulo the workers), see the module docstring."""
    rank, world, worker, workers = wds.utils.pytorch_worker_info()
    return rank, world, (worker + offset) % workers, workers


def _worker_seed(offset: int):
    def seed() -> int:  # what wds.utils.pytorch_worker_seed gives, for the logical worker
        rank, _, worker, _ = _worker_identity(offset)
        return rank * 1000 + worker

    return seed


def _skip_batches(skip: int, num_workers: int, offset: int, guard: RecordGuard):
    """Pipeline stage: drop the batches this worker produced before the checkpoint. Each batch
    takes the count of records skipped since the previous one was made and checked: the records
    left out while reading up to it (those met while a dropped batch was made were counted before
    the checkpoint; a dropped batch is not collated, so its values, checked then, are not checked
    again). The count is read again once the batch comes back for the next one, after
    :func:`_collate_checked` has counted the records of its own that it drops."""

    def stage(batches):
        _, _, worker, _ = _worker_identity(offset)
        workers = max(num_workers, 1)
        mine = (skip - worker + workers - 1) // workers if skip > worker else 0
        counted = 0
        for i, b in enumerate(batches):
            if i >= mine:
                yield b, guard.total - counted
            counted = guard.total

    return stage


def _worker_rng(seed: int, purpose: str, offset: int = 0) -> random.Random:
    """An RNG of this rank and (logical) loader worker (created inside the worker, so workers differ)."""
    return random.Random(f"{seed}/{_worker_seed(offset)()}/{purpose}")


def _in_order(samples):
    """Pipeline stage: the samples as they come (``shuffle_buffer`` 0 or 1)."""
    return samples


def _shuffle(bufsize: int, seed: int, offset: int = 0):
    def stage(samples):
        yield from wds.shuffle(bufsize, initial=bufsize, rng=_worker_rng(seed, "shuffle", offset))(samples)

    return stage


def _shard_sizes(urls: Sequence[str]) -> list[int]:
    sizes = {}
    for url in urls:
        d = Path(url).parent
        if d not in sizes:
            sizes[d] = {s["name"]: s["samples"] for s in load_manifest(d)["shards"]}
    return [sizes[Path(u).parent].get(Path(u).name, 0) for u in urls]


def split_samples(urls: Sequence[str], num_workers: int, offset: int = 0):
    """Pipeline stage: when a source has fewer shards than ranks x loader workers, each of them
    keeps a disjoint share of every shard's records (by position in the shard), so that ranks do
    not train on the same molecules in the same step (with more shards than readers, resampling
    spreads them over the shards, though two may still read one shard at times). A shard smaller
    than the number of shares is read whole, so that no reader is left without records."""
    sizes = dict(zip(urls, _shard_sizes(urls)))

    def stage(samples):
        rank, world, worker, _ = _worker_identity(offset)
        groups = world * max(1, num_workers)
        if len(urls) >= groups:
            yield from samples
            return
        mine = rank * max(1, num_workers) + worker
        for sample in samples:  # __position__: the record's place in its shard
            if sizes.get(sample["__url__"], 0) < groups or sample["__position__"] % groups == mine:
                yield sample

    return stage


def sample_conformer(seed: int, offset: int = 0):
    """Pipeline stage: each record keeps one of its K conformers, drawn per record by this worker's
    seeded RNG (so a resumed stream draws what the uninterrupted one did)."""

    def stage(records):
        rng = _worker_rng(seed, "conformer", offset)
        for r in records:
            pos = r.get("pos")
            if pos is not None and len(pos) > 1:
                k = rng.randrange(len(pos))
                r = {**r, "pos": pos[k:k + 1], "conformer": k}
            yield r

    return stage


def _budget(max_atoms: int):
    def stage(records):
        yield from atom_budget_batches(records, max_atoms)

    return stage


def _collate(records: list[dict], max_spd: int, max_path: int) -> tuple[Optional[dict], Optional[Exception]]:
    try:
        batch = collate(records, max_spd=max_spd, max_path=max_path)
    except (ValueError, IndexError, KeyError, TypeError) as exc:
        return None, exc
    return (None, None) if batch_problem(batch) else (batch, None)


def _collate_checked(guard: RecordGuard, max_spd: int, max_path: int):
    """Pipeline stage: collate each (records, skipped) pair and check the batch's values. A batch
    that fails is checked record by record: a bad record stops the run, or (skip) is dropped and
    counted and the others make the batch; a batch left empty goes on as an empty one carrying its
    count and notes, so that the position in the stream stays the same. A batch that holds records
    ends the guard's run of records without a good one (:meth:`RecordGuard.delivered`): a source
    whose records all decode but none has values the model can take stops at the guard's limit."""

    def stage(pairs):
        for records, skipped in pairs:
            batch, exc = _collate(records, max_spd, max_path)
            if batch is None:
                before = guard.total
                good = []
                for r in records:
                    why = value_problem(r)
                    if why:
                        guard.problem(r["__url__"], r["__key__"], why)
                    else:
                        good.append(r)
                batch, exc = _collate(good, max_spd, max_path) if good else (None, None)
                if batch is None and good:  # no record to blame: the batch as a whole
                    shards = sorted({r["__url__"] for r in good})
                    why = f"({type(exc).__name__}: {exc})" if exc else "(values out of range)"
                    guard.problem(shards[0], None, f"a batch of {len(good)} records from {len(shards)} shard(s) does "
                                                   f"not collate {why}", count=len(good))
                skipped += guard.total - before
                if batch is None:
                    yield {"skipped_records": skipped, "skip_notes": dict(guard.notes)}
                    continue
            guard.delivered()
            batch["skipped_records"] = skipped
            if skipped:
                batch["skip_notes"] = dict(guard.notes)
            yield batch

    return stage


def _deliver():
    """Pipeline stage, the last: a :class:`DataError` raised anywhere upstream in the worker ends
    the worker's stream with a batch ``{"error": message}``, which :class:`SourceStream` raises in
    the main process as the same one-line error (rather than the worker's traceback)."""

    def stage(batches):
        try:
            yield from batches
        except DataError as exc:
            yield {"error": str(exc)}

    return stage


def source_pipeline(urls: Sequence[str], *, max_atoms: int, seed: int, shuffle_buffer: int, skip: int,
                    num_workers: int, max_spd: int = 8, max_path: int = 5, source: str = "paired",
                    on_bad_record: str = "stop") -> wds.DataPipeline:
    """The batches of one source; ``skip`` batches of the stream were taken before (see the module
    docstring for how the workers are numbered then)."""
    offset = skip % max(num_workers, 1)
    sizes = dict(zip(urls, _shard_sizes(urls)))
    guard = RecordGuard(source, MODALITY_OF_SOURCE.get(source, source), sizes, on_bad_record)
    return wds.DataPipeline(
        wds.ResampledShards(list(urls), seed=seed, deterministic=True, worker_seed=_worker_seed(offset)),
        guard.read,
        split_samples(urls, num_workers, offset),
        _shuffle(shuffle_buffer, seed, offset) if shuffle_buffer > 1 else _in_order,
        guard.decode,
        sample_conformer(seed, offset),
        _budget(max_atoms),
        _skip_batches(skip, num_workers, offset, guard),
        _collate_checked(guard, max_spd, max_path),
        _deliver(),
    )


class SourceStream:
    """The endless batch stream of one source, with its position as state: ``taken`` batches
    (empty ones of skipped data included) and ``skipped`` records (``on_bad_record="skip"``)."""

    def __init__(self, name: str, urls: Sequence[str], *, max_atoms: int, seed: int, shuffle_buffer: int = 1000,
                 num_workers: int = 2, taken: int = 0, max_spd: int = 8, max_path: int = 5,
                 on_bad_record: str = "stop", skipped: int = 0, log=None):
        self.name, self.urls, self.taken, self.skipped = name, list(urls), taken, skipped
        self._kw = dict(max_atoms=max_atoms, seed=seed, shuffle_buffer=shuffle_buffer, num_workers=num_workers,
                        max_spd=max_spd, max_path=max_path, source=name, on_bad_record=on_bad_record)
        self._it: Optional[Iterator] = None
        self._noted: set[str] = set()
        self._log = log

    def _start(self) -> Iterator:
        workers = self._kw["num_workers"]
        pipe = source_pipeline(self.urls, skip=self.taken, **self._kw)
        loader = torch.utils.data.DataLoader(pipe, batch_size=None, num_workers=workers,
                                             prefetch_factor=2 if workers else None, persistent_workers=False)
        return iter(loader)

    def __next__(self) -> dict:
        if self._it is None:  # started on first use: a source with weight 0 costs nothing
            self._it = self._start()
        while True:
            batch = next(self._it)
            if "error" in batch:
                raise DataError(batch["error"])
            self.taken += 1
            self.skipped += int(batch.pop("skipped_records", 0))
            for shard, note in batch.pop("skip_notes", {}).items():
                if shard not in self._noted:
                    self._noted.add(shard)
                    if self._log is not None:
                        self._log(f"skipping bad data: {note}")
            if "mask" in batch:
                return batch


class MixedStream:
    """Yields (optimizer step, source name, batch): ``grad_accum`` micro-batches per optimizer step,
    the source of each drawn by the schedule at that optimizer step. ``step`` counts micro-batches
    (the position in the stream)."""

    def __init__(self, sources: dict[str, SourceStream], schedule: MixingSchedule, seed: int, step: int = 0,
                 grad_accum: int = 1):
        self.sources, self.schedule, self.seed, self.step = sources, schedule, seed, step
        self.grad_accum = grad_accum

    def __iter__(self):
        return self

    def next_source(self) -> str:
        optimizer_step, micro = divmod(self.step, self.grad_accum)
        return self.schedule.choose(optimizer_step, self.seed, micro)

    def __next__(self) -> tuple[int, str, dict]:
        name = self.next_source()
        batch = next(self.sources[name])
        step = self.step // self.grad_accum
        self.step += 1
        return step, name, batch

    def state_dict(self) -> dict:
        return {"step": self.step, "taken": {k: s.taken for k, s in self.sources.items()}}


def heldout_records(urls: Sequence[str], max_molecules: int, modality: Optional[str] = None,
                    on_bad_record: str = "stop", notes: Optional[list] = None) -> list[dict]:
    """Up to ``max_molecules`` records, an equal share from each shard of ``urls`` in order (so
    every held-out dataset is represented). The same on every call and every rank. Records are
    checked as in training (``modality``: the manifest's, when not given): a bad one raises
    :class:`~flexmol.data.integrity.DataError`, or with ``on_bad_record="skip"`` is left out."""
    import itertools

    share = -(-max_molecules // max(1, len(urls)))
    modalities = {}
    for u in urls:
        d = Path(u).parent
        if d not in modalities:
            modalities[d] = modality or load_manifest(d).get("modality")
    return list(itertools.islice(itertools.chain.from_iterable(
        itertools.islice(checked_records(u, modalities[Path(u).parent], on_bad_record, notes=notes), share)
        for u in urls), max_molecules))


def fixed_batches(urls: Sequence[str], *, max_atoms: int, max_molecules: int, max_spd: int = 8,
                  max_path: int = 5, on_bad_record: str = "stop", notes: Optional[list] = None) -> list[dict]:
    """Evaluation batches of :func:`heldout_records`, each molecule with its first conformer,
    batched by atom budget."""
    records = heldout_records(urls, max_molecules, on_bad_record=on_bad_record, notes=notes)
    return [collate(b, max_spd=max_spd, max_path=max_path) for b in atom_budget_batches(records, max_atoms)]
