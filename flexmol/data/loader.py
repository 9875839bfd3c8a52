"""How fast the training loader delivers batches, and one plain pass over a dataset.

:func:`measure` times the stream pre-training reads (:class:`flexmol.data.streams.SourceStream`:
shard visits, record checks, seeded blocks, decoding, atom-budget batching and collation with the
2D pair inputs, all inside the DataLoader workers) in its steady state, the figure to size loader
workers by (``flexmol shards bench``).

:func:`batch_loader` reads every record of a list of shards once, in order, without the record
checks: for tools and tests that need each molecule exactly once. Training does not read through
it, and its speed is not the training loader's.
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import webdataset as wds

from flexmol.data import schema
from flexmol.data.collate import atom_budget_batches, collate


@dataclass
class Throughput:
    """What :func:`measure` counted after the warm-up: molecules and atoms (real, not padded)."""

    molecules: int
    atoms: int
    batches: int
    seconds: float
    first_batch_s: float  # from the first request to the first batch: the workers' start-up
    warmup_s: float

    @property
    def molecules_per_s(self) -> float:
        return self.molecules / self.seconds

    @property
    def atoms_per_s(self) -> float:
        return self.atoms / self.seconds


def measure(stream: Iterator[dict], seconds: float, warmup: float) -> Throughput:
    """Take batches from ``stream`` for ``warmup`` seconds after its first batch (start-up and the
    workers' first prefetch are not throughput), then count for ``seconds``."""
    started = time.perf_counter()
    next(stream)
    first = time.perf_counter()
    while time.perf_counter() - first < warmup:
        next(stream)
    counting = time.perf_counter()
    molecules = atoms = batches = 0
    while (now := time.perf_counter()) - counting < seconds:
        batch = next(stream)
        molecules += batch["mask"].shape[0]
        atoms += int(batch["num_atoms"].sum())
        batches += 1
    return Throughput(molecules, atoms, batches, now - counting, first - started, counting - first)


def stores_pair_tables(url: str) -> bool:
    """Whether the first record of the shard ``url`` carries its pair tables (``dist``,
    ``path_bond``): featurised by a version that stores them."""
    from flexmol.data.integrity import members

    for _, data in members(url):
        return data is not None and "dist" in schema.decode(data)
    return False


def decode_sample(sample: dict) -> dict:
    return schema.decode(sample[schema.SAMPLE_EXTENSION])


def _budget(max_atoms: int):
    def stage(records):
        yield from atom_budget_batches(records, max_atoms)
    return stage


def batch_pipeline(urls: Sequence[str], max_atoms: int, pairs: bool = True, max_spd: int = 8,
                   max_path: int = 5) -> wds.DataPipeline:
    """Shards -> (split by node and worker) -> records, once each and in order -> one-modality
    batches of at most ``max_atoms`` padded atoms -> model batches (:func:`collate`)."""
    return wds.DataPipeline(
        wds.SimpleShardList(list(urls)),
        wds.split_by_node,
        wds.split_by_worker,
        wds.tarfile_to_samples(),
        wds.map(decode_sample),
        _budget(max_atoms),
        wds.map(functools.partial(collate, max_spd=max_spd, max_path=max_path, pairs=pairs)),
    )


def batch_loader(urls: Sequence[str], max_atoms: int, num_workers: int, pairs: bool = True, **kw):
    """A DataLoader over :func:`batch_pipeline`: every record of ``urls`` once, in collated
    batches (compact ones from workers: :func:`flexmol.data.collate.move` widens them)."""
    return torch.utils.data.DataLoader(
        batch_pipeline(urls, max_atoms, pairs, **kw), batch_size=None, num_workers=num_workers,
        prefetch_factor=4 if num_workers else None,
    )
