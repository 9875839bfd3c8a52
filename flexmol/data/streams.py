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
  workers' batches in turn, so that count fixes how many batches each worker produced; on resume
  each worker regenerates and drops those (records are decoded and batched, not collated), and
  the batch sequence continues exactly where it stopped.
"""
from __future__ import annotations

import bisect
import functools
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
import webdataset as wds

from flexmol.data.collate import atom_budget_batches, collate
from flexmol.data.loader import decode_sample
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


def _skip_batches(skip: int, num_workers: int):
    """Pipeline stage: drop the batches this worker produced before the checkpoint."""

    def stage(batches):
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        workers = max(num_workers, 1)
        mine = (skip - worker + workers - 1) // workers if skip > worker else 0
        for i, b in enumerate(batches):
            if i >= mine:
                yield b

    return stage


def _worker_rng(seed: int, purpose: str) -> random.Random:
    """An RNG of this rank and loader worker (created inside the worker, so workers differ)."""
    return random.Random(f"{seed}/{wds.utils.pytorch_worker_seed()}/{purpose}")


def _shuffle(bufsize: int, seed: int):
    def stage(samples):
        yield from wds.shuffle(bufsize, initial=bufsize, rng=_worker_rng(seed, "shuffle"))(samples)

    return stage


def _shard_sizes(urls: Sequence[str]) -> list[int]:
    sizes = {}
    for url in urls:
        d = Path(url).parent
        if d not in sizes:
            sizes[d] = {s["name"]: s["samples"] for s in load_manifest(d)["shards"]}
    return [sizes[Path(u).parent].get(Path(u).name, 0) for u in urls]


def split_samples(urls: Sequence[str], num_workers: int):
    """Pipeline stage: when a source has fewer shards than ranks x loader workers, each of them
    keeps a disjoint share of every shard's records (by position in the shard), so that ranks do
    not train on the same molecules in the same step (with more shards than readers, resampling
    spreads them over the shards, though two may still read one shard at times). A shard smaller
    than the number of shares is read whole, so that no reader is left without records."""
    sizes = dict(zip(urls, _shard_sizes(urls)))

    def stage(samples):
        rank, world, worker, _ = wds.utils.pytorch_worker_info()
        groups = world * max(1, num_workers)
        if len(urls) >= groups:
            yield from samples
            return
        mine = rank * max(1, num_workers) + worker
        url = key = None
        position = 0
        for sample in samples:
            # a new shard starts where the url changes or the keys (increasing in a shard) restart
            if sample.get("__url__") != url or key is None or sample["__key__"] <= key:
                position = 0
            url, key = sample.get("__url__"), sample["__key__"]
            if sizes.get(url, 0) < groups or position % groups == mine:
                yield sample
            position += 1

    return stage


def sample_conformer(seed: int):
    """Pipeline stage: each record keeps one of its K conformers, drawn per record by this worker's
    seeded RNG (so a resumed stream draws what the uninterrupted one did)."""

    def stage(records):
        rng = _worker_rng(seed, "conformer")
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


def source_pipeline(urls: Sequence[str], *, max_atoms: int, seed: int, shuffle_buffer: int, skip: int,
                    num_workers: int, max_spd: int = 8, max_path: int = 5) -> wds.DataPipeline:
    return wds.DataPipeline(
        wds.ResampledShards(list(urls), seed=seed, deterministic=True),
        wds.tarfile_to_samples(),
        split_samples(urls, num_workers),
        _shuffle(shuffle_buffer, seed) if shuffle_buffer > 1 else wds.identity,
        wds.map(decode_sample),
        sample_conformer(seed),
        _budget(max_atoms),
        _skip_batches(skip, num_workers),
        wds.map(functools.partial(collate, max_spd=max_spd, max_path=max_path)),
    )


class SourceStream:
    """The endless batch stream of one source, with its position as state."""

    def __init__(self, name: str, urls: Sequence[str], *, max_atoms: int, seed: int, shuffle_buffer: int = 1000,
                 num_workers: int = 2, taken: int = 0, max_spd: int = 8, max_path: int = 5):
        self.name, self.urls, self.taken = name, list(urls), taken
        self._kw = dict(max_atoms=max_atoms, seed=seed, shuffle_buffer=shuffle_buffer, num_workers=num_workers,
                        max_spd=max_spd, max_path=max_path)
        self._it: Optional[Iterator] = None

    def _start(self) -> Iterator:
        workers = self._kw["num_workers"]
        pipe = source_pipeline(self.urls, skip=self.taken, **self._kw)
        loader = torch.utils.data.DataLoader(pipe, batch_size=None, num_workers=workers,
                                             prefetch_factor=2 if workers else None, persistent_workers=False)
        return iter(loader)

    def __next__(self) -> dict:
        if self._it is None:  # started on first use: a source with weight 0 costs nothing
            self._it = self._start()
        batch = next(self._it)
        self.taken += 1
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


def heldout_records(urls: Sequence[str], max_molecules: int) -> list[dict]:
    """Up to ``max_molecules`` records, an equal share from each shard of ``urls`` in order (so
    every held-out dataset is represented). The same on every call and every rank."""
    import itertools

    from flexmol.data.shards import read_shard

    share = -(-max_molecules // max(1, len(urls)))
    return list(itertools.islice(
        itertools.chain.from_iterable(itertools.islice(read_shard(Path(u)), share) for u in urls), max_molecules))


def fixed_batches(urls: Sequence[str], *, max_atoms: int, max_molecules: int, max_spd: int = 8,
                  max_path: int = 5) -> list[dict]:
    """Evaluation batches of :func:`heldout_records`, each molecule with its first conformer,
    batched by atom budget."""
    records = heldout_records(urls, max_molecules)
    return [collate(b, max_spd=max_spd, max_path=max_path) for b in atom_budget_batches(records, max_atoms)]
