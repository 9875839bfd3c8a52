"""Training streams: one deterministic stream per source whose position is its state, mixed per
batch by a schedule.

- **Readers and shard visits.** Each rank reads a source through W = max(1, ``num_workers``)
  logical loader workers: reader ``g = rank * W + worker`` of ``G = world * W``. A reader's stream
  is a sequence of shard visits; its visit ``v`` reads shard ``P_e[q % S]`` with ``q = v * G + g``,
  ``e = q // S`` and ``P_e`` a permutation of the source's S shards seeded by (seed, e). Each epoch
  deals every shard out once among the readers, and visit ``v`` is found in O(1). Readers at the
  same visit number read different shards within an epoch; where their visits straddle two epochs
  (``q`` on both sides of a multiple of S), the end of one permutation may repeat the start of the
  next, and two readers may read one shard at the same time.
- **The records of a visit** are the shard's positions in the source's subset (below) and, when
  the source has fewer shards than readers, this reader's share (every G-th of them, so that
  readers train on disjoint molecules; a shard with fewer records than readers is read whole).
  They are read in blocks of ``shuffle_buffer`` positions, each block permuted by an RNG seeded by
  (seed, rank, worker, visit, block) that also draws each record's conformer: the ``c``-th record
  of visit ``v`` (its *slot*) and its conformer are functions of (seed, rank, worker, v, c) alone.
- **Position as state.** Every batch carries its worker's position after it, (visit, slot after
  its last record); the main process keeps the latest one per logical worker, and that (with the
  count of batches taken) is the stream's state. A resumed worker starts at its position: it
  passes over the tar headers before its block (no data read, nothing decoded) and reads that one
  block, so resuming costs at most a shard's headers and a block, whatever the step.
- **Round robin.** The DataLoader hands out its workers' batches in turn, so batch ``p`` of the
  stream (counted from its very start) is batch ``p // W`` of logical worker ``p % W``. A loader
  started after ``taken`` batches gives its worker ``i`` the logical number ``(i + taken) % W``: its
  first batch (from its worker 0) is the one of logical worker ``taken % W``, the one the
  uninterrupted stream hands out next, and the round robin continues in step with the original.
- **Bad data** (:mod:`flexmol.data.integrity`): a shard that ends early or a record that does not
  decode or would not make a valid batch stops the stream with one line naming the dataset, shard
  and record (``on_bad_record="stop"``), or is dropped and counted (``"skip"``). A problem belongs
  to the slot where it is met (a shard's, to the first slot of the block where reading the visit
  from its start meets it), and a batch counts those up to its last record: a resumed stream
  counts exactly what the uninterrupted one did.
- **Subsets and unique molecules.** ``subset=D`` keeps the first D records of a fixed permutation
  of the source's records (numbered in shard order: a shard's offset in the source plus the
  position in it), which depends on the data and ``subset_seed`` only: every run of a study sees
  the same D molecules, and a smaller D's are among a larger D's. Nothing is copied: a visit keeps
  the positions whose rank in the permutation (:func:`permutation_rank`, a Feistel network, O(1)
  memory per record) is below D. Each batch carries the numbers of its records, from which
  :class:`Coverage` counts the distinct molecules a run has seen.
- **Mixing.** The source of each micro-batch is drawn by an RNG seeded from (seed, optimizer step,
  micro-batch) alone, with the schedule's weights at that optimizer step, so every rank draws the
  same source and runs the same modules (ZeRO-3 deadlocks otherwise) and a ramp "by step" means
  optimizer steps whatever the gradient accumulation.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
import webdataset as wds

from flexmol.data.collate import atom_budget_batches, collate, label_problem
from flexmol.data.integrity import (MODALITY_OF_SOURCE, DataError, RecordGuard, ShardReader, batch_problem,
                                    checked_records, decode_checked, value_problem)
from flexmol.data.shards import load_manifest

SOURCES = tuple(MODALITY_OF_SOURCE)  # the training sources, in this order


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


def _shard_sizes(urls: Sequence[str]) -> list[int]:
    sizes = {}
    for url in urls:
        d = Path(url).parent
        if d not in sizes:
            sizes[d] = {s["name"]: s["samples"] for s in load_manifest(d)["shards"]}
    return [sizes[Path(u).parent].get(Path(u).name, 0) for u in urls]


# -- nested subsets --------------------------------------------------------------------------

_FEISTEL_ROUNDS = 6


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on uint64 arrays (arithmetic modulo 2^64): the Feistel round function."""
    x = (x ^ (x >> 30)) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> 27)) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> 31)


def permutation_rank(records, size: int, seed: int) -> np.ndarray:
    """The place of each of ``records`` (numbers in ``range(size)``) in a fixed pseudo-random
    permutation of ``range(size)`` keyed by ``seed``; the first D records of the permutation are
    those whose place is below D.

    A balanced Feistel network (6 rounds) on the smallest even number of bits that covers
    ``size`` is a bijection of [0, 2^bits); a value that falls outside ``range(size)`` goes through
    it again until it falls inside ("cycle walking", fewer than 4 passes on average), which keeps it
    a bijection of ``range(size)``. Vectorised, O(1) memory per record: no table of the dataset."""
    x = np.array(records, dtype=np.uint64, ndmin=1)
    half = max(1, ((max(size, 2) - 1).bit_length() + 1) // 2)
    low = np.uint64((1 << half) - 1)
    keys = np.random.SeedSequence(seed).generate_state(_FEISTEL_ROUNDS, dtype=np.uint64)

    def encrypt(v: np.ndarray) -> np.ndarray:
        left, right = v >> np.uint64(half), v & low
        for key in keys:
            left, right = right, left ^ (_mix64(right ^ key) & low)
        return (left << np.uint64(half)) | right

    out = encrypt(x)
    outside = out >= size
    while outside.any():
        out[outside] = encrypt(out[outside])
        outside = out >= size
    return out.astype(np.int64)


# -- where each reader is --------------------------------------------------------------------

_SHARD_ORDER, _RECORD_ORDER = 1, 2  # tags that keep the two kinds of draws apart


class SourcePlan:
    """Which records each reader of one source reads, in which order, as a function of its
    position (visit, slot) alone (see the module docstring). ``records``: the source's records,
    numbered in shard order; ``subset_records``: those the stream can yield (D, or all)."""

    def __init__(self, urls: Sequence[str], sizes: Sequence[int], *, seed: int, block: int,
                 subset: Optional[int] = None, subset_seed: int = 0):
        self.urls, self.sizes = list(urls), np.asarray(sizes, dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(np.int64)
        self.records = int(self.sizes.sum())
        if not self.records:
            raise ValueError("the source holds no records")
        if subset is not None and not 1 <= subset <= self.records:
            raise ValueError(f"a subset of {subset} molecules: the source holds {self.records}")
        self.seed, self.block, self.subset, self.subset_seed = seed, max(1, block), subset, subset_seed
        self.subset_records = self.records if subset is None else subset
        self._epoch: tuple[int, Optional[np.ndarray]] = (-1, None)

    def shard(self, visit: int, reader: int, readers: int) -> int:
        epoch, i = divmod(visit * readers + reader, len(self.urls))
        if self._epoch[0] != epoch:
            self._epoch = epoch, np.random.default_rng([self.seed, _SHARD_ORDER, epoch]).permutation(len(self.urls))
        return int(self._epoch[1][i])

    def kept(self, shard: int, reader: int, readers: int) -> np.ndarray:
        """The positions of ``shard`` a visit of ``reader`` reads, ascending."""
        positions = np.arange(self.sizes[shard])
        if self.subset is not None:
            ranks = permutation_rank(self.offsets[shard] + positions, self.records, self.subset_seed)
            positions = positions[ranks < self.subset]
        if len(self.urls) < readers and len(positions) >= readers:
            positions = positions[reader::readers]
        return positions

    def order(self, who: tuple[int, int], visit: int, block: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The reading order of a block of ``n`` positions, and a uniform draw per slot (the
        conformer's); ``who``: (rank, logical worker)."""
        rng = np.random.default_rng([self.seed, _RECORD_ORDER, *who, visit, block])
        return (rng.permutation(n) if self.block > 1 else np.arange(n)), rng.random(n)


def _marker(slot: tuple[int, int], url: str, message: str, count: int) -> dict:
    """What a skipped problem leaves in the item stream: its slot, the records it costs, its line."""
    return {"__slot__": slot, "__skipped__": count, "__shard__": Path(url).name, "__note__": message}


def _visit(plan: SourcePlan, guard: RecordGuard, who: tuple[int, int], reader: int, readers: int, visit: int,
           start: int) -> Iterator[dict]:
    """The items of one shard visit from slot ``start`` on: raw records {__slot__, __url__, __key__,
    __index__ (the record's number in the source), __draw__, data} and markers of skipped problems."""
    shard = plan.shard(visit, reader, readers)
    kept = plan.kept(shard, reader, readers)
    if start >= len(kept):
        return
    url, offset, per_block = plan.urls[shard], int(plan.offsets[shard]), plan.block
    tar = ShardReader(url, int(plan.sizes[shard]))
    try:
        for b in range(start // per_block, -(-len(kept) // per_block)):
            first = b * per_block
            block = kept[first:first + per_block]
            found = tar.take(block)
            why = tar.failure or (tar.finish() if first + per_block >= len(kept) else None)
            if why:  # charged to the first slot of the block where reading from the start meets it
                met = min(int(np.searchsorted(kept, tar.readable)), len(kept) - 1) // per_block * per_block
                if met < first:  # (resumed past the visit's last record) the visit ended there, counted
                    return
                if start <= first:
                    lost = max(1, len(kept) - first - len(found))
                    yield _marker((visit, first), url, guard.problem(url, None, why, count=lost), lost)
            order, draws = plan.order(who, visit, b, len(block))
            for j in range(max(0, start - first), len(block)):
                p = int(block[order[j]])
                if p not in found:  # lost with the shard's end, counted above
                    continue
                key, data = found[p]
                if data is None:
                    yield _marker((visit, first + j), url, guard.problem(url, key, "not a record member"), 1)
                    continue
                yield {"__slot__": (visit, first + j), "__url__": url, "__key__": key, "__index__": offset + p,
                       "__draw__": float(draws[j]), "data": data}
            if why:
                return
    finally:
        tar.close()


def _worker_identity(offset: int) -> tuple[int, int, int, int]:
    """(rank, world, logical worker, workers) of the calling loader worker: the DataLoader's worker
    ``i`` plays logical worker ``(i + offset) % workers`` (``offset``: batches taken before this
    loader started, modulo the workers), see the module docstring."""
    rank, world, worker, workers = wds.utils.pytorch_worker_info()
    return rank, world, (worker + offset) % workers, workers


def _read(plan: SourcePlan, guard: RecordGuard, starts: Sequence[tuple[int, int]], offset: int):
    """Pipeline source: this worker's visits, from its logical worker's position on."""

    def items() -> Iterator[dict]:
        rank, world, worker, workers = _worker_identity(offset)
        visit, slot = starts[worker]
        while True:
            yield from _visit(plan, guard, (rank, worker), rank * workers + worker, world * workers, visit, slot)
            visit, slot = visit + 1, 0

    return items


def _decode(guard: RecordGuard):
    """Pipeline stage: raw records to checked records, each with the conformer its slot drew (a
    record of K conformers keeps one); a record that does not decode becomes a marker."""

    def stage(items):
        for item in items:
            if "data" not in item:
                yield item
                continue
            rec, why = decode_checked(item.pop("data"), guard.modality, values=False)
            if rec is None:
                url = item["__url__"]
                yield _marker(item["__slot__"], url, guard.problem(url, item["__key__"], why), 1)
                continue
            pos = rec.get("pos")
            if pos is not None and len(pos) > 1:
                k = int(item["__draw__"] * len(pos))
                rec["pos"], rec["conformer"] = pos[k:k + 1], k
            rec.update(item)
            yield rec

    return stage


def _batches(max_atoms: int):
    """Pipeline stage: atom-budget batches (:func:`flexmol.data.collate.atom_budget_batches`) as
    (records, markers up to the last record, position after the last record)."""

    def stage(items):
        markers: list[dict] = []

        def records():
            for item in items:
                if "__skipped__" in item:
                    markers.append(item)
                else:
                    yield item

        for batch in atom_budget_batches(records(), max_atoms):
            visit, slot = end = batch[-1]["__slot__"]
            yield batch, [m for m in markers if m["__slot__"] <= end], (visit, slot + 1)
            markers[:] = [m for m in markers if m["__slot__"] > end]

    return stage


def _collate(records: list[dict], max_spd: int, max_path: int, labels: Sequence[str] = ()
             ) -> tuple[Optional[dict], Optional[Exception]]:
    try:
        batch = collate(records, max_spd=max_spd, max_path=max_path, labels=labels)
    except (ValueError, IndexError, KeyError, TypeError) as exc:
        return None, exc
    return (None, None) if batch_problem(batch) else (batch, None)


def _collate_checked(guard: RecordGuard, max_spd: int, max_path: int, offset: int, labels: Sequence[str] = ()):
    """Pipeline stage: collate each batch and check its values. A batch that fails is checked record
    by record: a bad record stops the run, or (skip) is dropped and counted and the others make the
    batch; a batch left empty goes on as an empty one, so that its count and position arrive. Each
    batch carries ``skipped_records``, ``skip_notes`` (the first line per shard), ``records`` (the
    numbers of its records in the source) and ``position`` (logical worker, visit, slot after it).
    A batch that holds records ends the guard's run of records without a good one."""

    def stage(batches):
        worker = _worker_identity(offset)[2]
        for records, markers, (visit, slot) in batches:
            skipped = sum(m["__skipped__"] for m in markers)
            notes = {}
            for m in markers:
                notes.setdefault(m["__shard__"], m["__note__"])
            batch, exc = _collate(records, max_spd, max_path, labels)
            if batch is None:
                good = []
                for r in records:
                    why = value_problem(r) or label_problem(r, labels)
                    if why:
                        notes.setdefault(Path(r["__url__"]).name, guard.problem(r["__url__"], r["__key__"], why))
                        skipped += 1
                    else:
                        good.append(r)
                batch, exc = _collate(good, max_spd, max_path, labels) if good else (None, None)
                if batch is None and good:  # no record to blame: the batch as a whole
                    shards = sorted({r["__url__"] for r in good})
                    why = f"({type(exc).__name__}: {exc})" if exc else "(values out of range)"
                    notes.setdefault(Path(shards[0]).name, guard.problem(
                        shards[0], None, f"a batch of {len(good)} records from {len(shards)} shard(s) does not "
                                         f"collate {why}", count=len(good)))
                    skipped += len(good)
                records = good if batch is not None else []
            if batch is None:
                batch = {}
            else:
                guard.delivered()
            batch.update(skipped_records=skipped, position=(worker, visit, slot),
                         records=torch.tensor([r["__index__"] for r in records], dtype=torch.int64))
            if notes:
                batch["skip_notes"] = notes
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


def source_pipeline(plan: SourcePlan, *, starts: Sequence[tuple[int, int]], taken: int, max_atoms: int,
                    num_workers: int, max_spd: int = 8, max_path: int = 5, source: str = "paired",
                    on_bad_record: str = "stop", labels: Sequence[str] = ()) -> wds.DataPipeline:
    """The batches of one source, each logical worker from its position in ``starts``; ``taken``
    batches of the stream were handed out before (see the module docstring for how the workers
    are numbered then). ``labels``: the record label keys each batch carries (``collate``)."""
    offset = taken % max(num_workers, 1)
    guard = RecordGuard(source, MODALITY_OF_SOURCE.get(source, source), plan.subset_records, on_bad_record)
    return wds.DataPipeline(_read(plan, guard, starts, offset), _decode(guard), _batches(max_atoms),
                            _collate_checked(guard, max_spd, max_path, offset, labels), _deliver())


class Coverage:
    """Which of a source's records a run has trained on, for its count of unique molecules: one bit
    per record (12.5 MB for 100M molecules), set from the record numbers each batch carries.

    A single process sets the bits as batches come. With ``deferred`` (several ranks), numbers wait
    until :meth:`merge` (a few steps' worth: the trainer merges when it logs and checkpoints), which
    sets the bits of every rank's numbers, so that every rank holds the same map and ``unique``
    counts the distinct records all ranks have seen."""

    _POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)

    def __init__(self, size: int, deferred: bool = False):
        self.size, self.unique, self.deferred = size, 0, deferred
        self.bits = np.zeros((size + 7) // 8, dtype=np.uint8)
        self._pending: list[np.ndarray] = []

    def add(self, records) -> None:
        records = np.array(records, dtype=np.int64)  # a copy: a batch's shared-memory tensor is not kept
        if self.deferred:
            self._pending.append(records)
        else:
            self.merge([records])

    def take_pending(self) -> np.ndarray:
        """The numbers added since the last call (this rank's share of a merge)."""
        out = np.concatenate(self._pending) if self._pending else np.zeros(0, dtype=np.int64)
        self._pending = []
        return out

    def merge(self, parts: Optional[Sequence[np.ndarray]] = None) -> int:
        """Sets the bits of ``parts`` (every rank's :meth:`take_pending`; by default this one's);
        returns ``unique``."""
        parts = [self.take_pending()] if parts is None else parts
        records = np.unique(np.concatenate([np.zeros(0, dtype=np.int64), *parts]))
        byte, bit = records >> 3, np.left_shift(1, records & 7).astype(np.uint8)
        self.unique += int(((self.bits[byte] & bit) == 0).sum())
        np.bitwise_or.at(self.bits, byte, bit)
        return self.unique

    def state_dict(self) -> torch.Tensor:
        return torch.from_numpy(self.bits.copy())

    def load_state_dict(self, bits: torch.Tensor) -> None:
        if not isinstance(bits, torch.Tensor) or bits.dtype != torch.uint8 or tuple(bits.shape) != self.bits.shape:
            raise ValueError(f"a map of the records seen for {self.size} records must be {self.bits.shape[0]} bytes")
        self.bits = bits.numpy().copy()
        self.unique = int(self._POPCOUNT[self.bits].sum(dtype=np.int64))


class SourceStream:
    """The endless batch stream of one source. Its state (:meth:`state_dict`) is the number of
    batches taken (empty ones of skipped data included) and each logical worker's position;
    ``skipped`` counts the records skipped since this object started (``on_bad_record="skip"``) and
    ``coverage`` the records its batches held. ``subset``: train on the first ``subset`` records of
    the source's fixed permutation keyed by ``subset_seed`` (module docstring). Besides the model's
    tensors, a batch holds ``records``: the numbers of its molecules in the source, row by row,
    and with ``labels`` (record label keys) ``labels`` [B, L], NaN where a molecule lacks one
    (:func:`flexmol.data.collate.collate`)."""

    def __init__(self, name: str, urls: Sequence[str], *, max_atoms: int, seed: int, shuffle_buffer: int = 1000,
                 num_workers: int = 2, max_spd: int = 8, max_path: int = 5, on_bad_record: str = "stop",
                 subset: Optional[int] = None, subset_seed: int = 0, log=None, labels: Sequence[str] = ()):
        self.name, self.urls = name, list(urls)
        self.plan = SourcePlan(self.urls, _shard_sizes(self.urls), seed=seed, block=shuffle_buffer, subset=subset,
                               subset_seed=subset_seed)
        self.workers = max(1, num_workers)
        self.taken, self.skipped = 0, 0
        self.positions = [(0, 0)] * self.workers
        self.coverage = Coverage(self.plan.records)
        self._kw = dict(max_atoms=max_atoms, num_workers=num_workers, max_spd=max_spd, max_path=max_path, source=name,
                        on_bad_record=on_bad_record, labels=tuple(labels))
        self._it: Optional[Iterator] = None
        self._noted: set[str] = set()
        self._log = log

    def state_dict(self) -> dict:
        return {"taken": self.taken, "positions": [list(p) for p in self.positions]}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` (of :meth:`state_dict`), before the first batch is drawn."""
        if self._it is not None:
            raise RuntimeError("a stream's state is loaded before its first batch")
        positions = state["positions"]
        if len(positions) != self.workers:
            raise ValueError(f"the state holds the positions of {len(positions)} loader worker(s); this stream has "
                             f"{self.workers}")
        self.taken, self.positions = int(state["taken"]), [(int(v), int(c)) for v, c in positions]

    def _start(self) -> Iterator:
        workers = self._kw["num_workers"]
        pipe = source_pipeline(self.plan, starts=list(self.positions), taken=self.taken, **self._kw)
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
            worker, visit, slot = batch.pop("position")
            self.positions[int(worker)] = (int(visit), int(slot))
            self.taken += 1
            self.skipped += int(batch.pop("skipped_records"))
            for shard, note in batch.pop("skip_notes", {}).items():
                if shard not in self._noted:
                    self._noted.add(shard)
                    if self._log is not None:
                        self._log(f"skipping bad data: {note}")
            self.coverage.add(batch["records"])
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
        return {"step": self.step, "sources": {k: s.state_dict() for k, s in self.sources.items()}}

    def load_state_dict(self, state: dict) -> None:
        """``state`` of :meth:`state_dict`; a source it does not hold starts afresh."""
        self.step = int(state["step"])
        for name, source in state["sources"].items():
            if name in self.sources:
                self.sources[name].load_state_dict(source)


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
                  max_path: int = 5, on_bad_record: str = "stop", notes: Optional[list] = None,
                  labels: Sequence[str] = ()) -> list[dict]:
    """Evaluation batches of :func:`heldout_records`, each molecule with its first conformer,
    batched by atom budget; with ``labels``, each carries ``labels`` [B, L] (``collate``), and a
    molecule whose label is not a number raises :class:`DataError`, or with ``on_bad_record="skip"``
    is left out (its description goes to ``notes``)."""
    records = heldout_records(urls, max_molecules, on_bad_record=on_bad_record, notes=notes)
    if labels:
        kept = []
        for r in records:
            why = label_problem(r, labels)
            if why is None:
                kept.append(r)
                continue
            message = f"held-out data: molecule {r.get('id', '?')!r} (record {r.get('index', '?')}): {why}"
            if on_bad_record == "stop":
                raise DataError(message)
            if notes is not None:
                notes.append(message)
        records = kept
    return [collate(b, max_spd=max_spd, max_path=max_path, labels=labels)
            for b in atom_budget_batches(records, max_atoms)]
