"""What training checks of its datasets: at start-up, every shard the manifests list; while it
reads, every record.

At start-up (:func:`dataset_shards`, :func:`verify_checksums`): the directory exists and holds a
readable manifest of this modality, and every shard the manifest lists is there with the size it
records; with ``data.verify_checksums`` (the default) also its sha256. The ranks share the hashing
(rank r hashes every world-th shard) and agree on the result.

Hashing costs about a second per GB once the files are in the page cache and two on a first read
(``file_sha256`` of ``flexmol.data.shards``, 4 MiB blocks, 2-core CPU with SHA extensions)::

    python -c "import time; from pathlib import Path; from flexmol.data.shards import file_sha256, load_manifest
    d = Path('outputs/bench9/shards/moses_2d'); t = time.perf_counter()
    n = sum(s['bytes'] for s in load_manifest(d)['shards'] if file_sha256(d / s['name']) == s['sha256'])
    print(n / 1e6, 'MB', time.perf_counter() - t, 's')"

measured 151 MB of MOSES 2D shards (100k molecules) in 0.33 s on a first read and 0.19 s after
(461 and 802 MB/s), 70 MB of QM9 paired shards (46k molecules) in 0.20 s and 0.06 s; the test
datasets (0.1 MB) take under 10 ms. At these rates a PCQM4Mv2-scale paired set (some 6 GB) would
take 8-13 s per start, shared by the ranks: small against DeepSpeed's own start-up and nothing
against a run, so checksums are on by default; ``data.verify_checksums=false`` skips them for
datasets too large to read at each start.

While training (:class:`ShardReader` and :class:`RecordGuard`, run inside the DataLoader
workers, and :func:`checked_records` for the held-out data): a shard that cannot be opened or
read to its end, one that holds fewer or more records than its manifest says (a damaged tar
header ends a tar stream silently), and a record that does not decode or does not make a valid
batch (schema, shapes, vocabulary ranges, finite coordinates) are problems naming the dataset,
the shard and the record. ``data.on_bad_record=stop`` (the default) stops the run with one line
(:class:`DataError`); ``skip`` drops the record and counts it (training records of
``metrics.jsonl`` carry ``skipped_records`` per source).
"""
from __future__ import annotations

import json
import os
import re
import tarfile
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np
import webdataset as wds
from webdataset.tariterators import base_plus_ext

from flexmol.chem.vocab import ATOM_FEATURE_SIZES, BOND_FEATURE_SIZES
from flexmol.config import ConfigError
from flexmol.data import schema
from flexmol.data.shards import MANIFEST, file_sha256

ON_BAD_RECORD = ("stop", "skip")
MODALITY_OF_SOURCE = {"paired": "paired", "single_2d": "2d", "single_3d": "3d"}
_META = r"__[^/]*__($|/)"  # WebDataset's metadata members, not samples


class DataError(Exception):
    """Data that cannot be trained on; the message (one line) names the dataset, shard and record."""


def _inspect_hint(directory: Path) -> str:
    return f"`flexmol shards inspect {directory}` lists every problem"


# -- start-up --------------------------------------------------------------------------------

def read_manifest(directory: str | Path, key: str) -> dict:
    """The manifest of the dataset directory given as config key ``key``, or a :class:`ConfigError`
    naming the key and the path."""
    d = Path(directory)

    def fail(why: str):
        raise ConfigError(f"config key '{key}': {d} {why}")

    if not d.exists():
        fail("does not exist")
    if not d.is_dir():
        fail("is a file, not a dataset directory")
    path = d / MANIFEST
    if not path.is_file():
        fail(f"is not a finished dataset (no {MANIFEST})")
    try:
        m = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        fail(f"has an unreadable {MANIFEST} ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})")
    shards = m.get("shards") if isinstance(m, dict) else None
    if not isinstance(shards, list) or not all(
            isinstance(s, dict) and isinstance(s.get("name"), str) and "/" not in s["name"]
            and isinstance(s.get("samples"), int) and isinstance(s.get("bytes"), int) for s in shards):
        fail(f"has a {MANIFEST} without a valid shard list (name, samples, bytes per shard)")
    return m


def dataset_shards(directory: str | Path, key: str, modality: str) -> list[dict]:
    """Every shard the manifest of ``directory`` lists, each present with its recorded size, as
    dicts {url, name, samples, bytes, sha256, directory, key}; a :class:`ConfigError` naming the
    key, the dataset and the first bad shard (and how many more there are) otherwise."""
    d = Path(directory)
    m = read_manifest(d, key)
    held = m.get("modality")
    if held != modality:
        raise ConfigError(f"config key '{key}': {d} holds {held} data; this slot takes {modality} datasets")
    problems, out = [], []
    for s in m["shards"]:
        path = d / s["name"]
        if not path.is_file():
            problems.append(f"{s['name']} is missing (listed in {MANIFEST})")
            continue
        size = path.stat().st_size
        if size != s["bytes"]:
            problems.append(f"{s['name']} has {size} bytes, {MANIFEST} says {s['bytes']} (truncated or altered)")
            continue
        out.append({"url": str(path), "name": s["name"], "samples": s["samples"], "bytes": s["bytes"],
                    "sha256": s.get("sha256"), "directory": str(d), "key": key})
    if problems:
        raise ConfigError(_shard_problems(key, d, problems))
    if not any(s["samples"] > 0 for s in out):
        raise ConfigError(f"config key '{key}': {d} holds no molecules")
    return out


def _shard_problems(key: str, directory: Path, problems: list[str]) -> str:
    more = f" (and {len(problems) - 1} more shard(s))" if len(problems) > 1 else ""
    return f"config key '{key}': {directory}: {problems[0]}{more}; {_inspect_hint(directory)}"


def verify_checksums(shards: Sequence[dict], rank: int = 0, world: int = 1, gather=None) -> None:
    """sha256 of every shard in ``shards`` (dicts of :func:`dataset_shards`) against its manifest;
    rank ``rank`` of ``world`` hashes every world-th one and ``gather`` (a function list -> list of
    every rank's lists) shares the findings, so every rank raises the same :class:`ConfigError`."""
    bad = []
    for i, s in enumerate(shards):
        if i % world != rank:
            continue
        if not s.get("sha256"):
            bad.append((i, f"{s['name']} has no sha256 in {MANIFEST} (data.verify_checksums=false skips the check)"))
        elif file_sha256(Path(s["url"])) != s["sha256"]:
            bad.append((i, f"{s['name']}: sha256 differs from {MANIFEST} (corrupted since it was written)"))
    if world > 1 and gather is not None:
        bad = sorted(b for part in gather(bad) for b in part)
    if bad:
        first = shards[bad[0][0]]
        same = [why for i, why in bad if shards[i]["directory"] == first["directory"] and shards[i]["key"] == first["key"]]
        raise ConfigError(_shard_problems(first["key"], Path(first["directory"]), same)
                          + (f"; {len(bad) - len(same)} bad shard(s) in other datasets" if len(bad) > len(same) else ""))


# -- records ---------------------------------------------------------------------------------

_ATOM_SIZES = np.array(ATOM_FEATURE_SIZES)
_BOND_SIZES = np.array(BOND_FEATURE_SIZES)


def structure_problem(rec: dict, modality: str) -> Optional[str]:
    """Why ``rec`` cannot be batched with records of ``modality`` (None when it can): the schema
    (fields, types, shapes), its modality, integer atomic numbers and features, float coordinates.
    About 11 us a record, nearly all of it ``schema.validate`` (decoding takes 13 us and collating
    37 us a QM9 record, measured on shard-000000 of outputs/bench9/shards/qm9); the values are
    checked a batch at a time (:func:`batch_problem`, 0.4-1.5 us a record)."""
    try:
        schema.validate(rec)
    except schema.SchemaError as exc:
        return str(exc)
    if rec["modality"] != modality:
        return f"a {rec['modality']} record in a {modality} dataset"
    if not len(rec["z"]):
        return "no atoms"
    if any(k in rec and rec[k].dtype.kind not in "iu" for k in ("z", "atom_feat", "bond_index", "bond_feat")):
        return "atomic numbers or graph features are not integers"
    if "pos" in rec and rec["pos"].dtype.kind != "f":
        return "coordinates are not floating-point numbers"
    return None


def value_problem(rec: dict) -> Optional[str]:
    """Why the values of a well-formed record (:func:`structure_problem`) cannot go to the model:
    atomic numbers and categorical features outside their vocabularies, coordinates that are not
    finite."""
    z = rec["z"]
    if z.min() < 1 or z.max() >= ATOM_FEATURE_SIZES[0]:
        return f"atomic number {int(z.max()) if z.max() >= ATOM_FEATURE_SIZES[0] else int(z.min())} out of range"
    if "atom_feat" in rec:
        feat, bond_feat = rec["atom_feat"], rec["bond_feat"]
        if feat.min() < 0 or (feat.max(axis=0) >= _ATOM_SIZES).any():
            return "atom feature out of its vocabulary"
        if len(bond_feat) and (bond_feat.min() < 0 or (bond_feat.max(axis=0) >= _BOND_SIZES).any()):
            return "bond feature out of its vocabulary"
    if "pos" in rec and not np.isfinite(rec["pos"]).all():
        return "coordinates are not finite numbers"
    return None


def check_record(rec: dict, modality: str) -> Optional[str]:
    """Why ``rec`` cannot go into a batch of ``modality`` (None when it can): its structure, then
    its values."""
    return structure_problem(rec, modality) or value_problem(rec)


def batch_problem(batch: dict) -> bool:
    """Whether a collated batch holds a value the model cannot take (one check per tensor);
    :func:`value_problem` then finds the record. About 80-240 us a batch of ``max_atoms`` 2048,
    0.4-1.5 us a record (measured on shard-000000 of outputs/bench9/shards/{qm9,moses_2d,
    moses_paired}: 270, 80 and 70 molecules a batch)."""
    mask = batch["mask"].numpy()
    z = batch["z"].numpy()
    if z.max() >= ATOM_FEATURE_SIZES[0] or (z[mask] < 1).any():
        return True
    if "atom_feat" in batch:
        feat = batch["atom_feat"].numpy()
        if feat.min() < 0 or (feat.max(axis=(0, 1)) >= _ATOM_SIZES).any():
            return True
        edges = batch["edge_feat"].numpy() if "edge_feat" in batch else None
        if edges is not None and len(edges) and (edges.min() < 0 or (edges.max(axis=0) >= _BOND_SIZES).any()):
            return True
    return "pos" in batch and not np.isfinite(batch["pos"].numpy()).all()


def decode_checked(data: bytes, modality: str, values: bool = True) -> tuple[Optional[dict], Optional[str]]:
    """(record, None) or (None, why); ``values=False`` leaves the values to a batch check."""
    try:
        rec = schema.decode(data)
    except schema.SchemaError as exc:
        return None, str(exc).rstrip(": ") or "not a msgpack record"
    why = check_record(rec, modality) if values else structure_problem(rec, modality)
    return (None, why) if why else (rec, None)


def record_problem(url: str, key: Optional[str], why: str, source: Optional[str] = None) -> str:
    path = Path(url)
    where = f"record {key}: " if key else ""
    slot = f"data.{source}: " if source else ""
    return f"{slot}dataset {path.parent}: shard {path.name}: {where}{why}"


class RecordGuard:
    """The verdict on the problems one source's stream meets inside a loader worker (state per
    worker: the pipeline is copied into each). ``stop`` raises :class:`DataError` at the first;
    ``skip`` returns its one-line message, for the stream to count with the batch it falls in.
    ``delivered`` marks a batch with records handed on: in skip mode, a run of more than ten times
    the records the stream can yield skipped without one stops the stream."""

    def __init__(self, source: str, modality: str, records: int, on_bad_record: str = "stop"):
        if on_bad_record not in ON_BAD_RECORD:
            raise ValueError(f"on_bad_record '{on_bad_record}' is not one of {', '.join(ON_BAD_RECORD)}")
        self.source, self.modality, self.on_bad = source, modality, on_bad_record
        # Skip mode on a source with no good record at all would read forever: it stops after ten
        # times its records in a row skipped without a batch of good ones (a record that decodes
        # may still fail the value checks of its batch: only a batch handed on counts).
        self._streak, self._limit = 0, 10 * max(1, records) + 100

    def problem(self, url: str, key: Optional[str], why: str, count: int = 1) -> str:
        message = record_problem(url, key, why, self.source)
        if self.on_bad == "stop":
            raise DataError(f"{message}; {_inspect_hint(Path(url).parent)}; data.on_bad_record=skip trains past "
                            "bad records")
        self._streak += count
        if self._streak > self._limit:
            raise DataError(f"data.{self.source}: no good record in the last {self._streak} records read (data."
                            f"on_bad_record=skip; the last problem: {message}); {_inspect_hint(Path(url).parent)}")
        return message

    def delivered(self) -> None:
        """A batch holding records was handed on: the run of skipped records starts again."""
        self._streak = 0


_USTAR_MAGIC = b"ustar\x0000"  # POSIX ustar, as tarfile and the shard writer (flexmol.data.shards) write it


def _plain_member(header: bytes) -> Optional[tuple[str, int]]:
    """(name, size) from a plain ustar header of a regular file with a short ASCII name, the kind
    shards are made of; None for anything else (another member type, pax or GNU extensions, a
    prefixed name, a checksum that fails, the end of the archive), which :mod:`tarfile` decides.
    Parsed here in about a fifth of the time tarfile's general parser takes."""
    if len(header) != tarfile.BLOCKSIZE or header[156] not in b"0\0" or header[257:265] != _USTAR_MAGIC \
            or header[345] or header[124] & 0x80:
        return None
    try:
        size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
        checksum = int(header[148:156].split(b"\0", 1)[0].strip() or b"0", 8)
        name = header[:100].split(b"\0", 1)[0].decode("ascii")
    except (ValueError, UnicodeDecodeError):
        return None
    if not name or checksum != sum(header) - sum(header[148:156]) + 8 * ord(" "):
        return None
    return name, size


class ShardReader:
    """The samples of one shard, read forward by position: a sample is the run of tar members
    sharing a key (as WebDataset groups them), its record the ``.msgpack`` member. Samples not
    asked for are passed over by their tar headers alone, without reading their data, so reaching
    position p costs p header reads (about 5 us each), never a decode. Plain ustar headers are
    parsed by :func:`_plain_member`; from the first header of another kind on, :mod:`tarfile`
    reads the shard (and ends it where it would, e.g. silently at a header whose checksum fails).

    ``failure`` says why the shard could not be read as its manifest describes (unreadable, or
    fewer or more samples than ``expected``: a damaged tar header ends a tar without an error), and
    ``readable`` how many samples from its start could be read then."""

    _READ_ERRORS = (OSError, tarfile.TarError, EOFError, ValueError)

    def __init__(self, url: str, expected: int):
        self.url, self.expected = url, expected
        self.count = 0  # samples passed so far
        self.failure: Optional[str] = None
        self.readable: Optional[int] = None
        self._file = None
        self._samples = self._grouped()

    def _members(self) -> Iterator[tuple[str, int, int]]:
        """(name, data offset, size) of each regular member."""
        self._file = f = open(self.url, "rb")
        offset = 0
        while True:
            f.seek(offset)
            plain = _plain_member(f.read(tarfile.BLOCKSIZE))
            if plain is None:
                break
            name, size = plain
            yield name, offset + tarfile.BLOCKSIZE, size
            offset += tarfile.BLOCKSIZE + -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
        f.seek(offset)
        tar = tarfile.open(fileobj=f, mode="r:")  # from here on, at this offset
        while (member := tar.next()) is not None:
            tar.members = []  # passed members are not kept (a shard's worth of headers otherwise)
            if member.isreg():
                yield member.name, member.offset_data, member.size

    def _grouped(self) -> Iterator[tuple[str, Optional[tuple[int, int]]]]:
        """(key, (data offset, size) of its record member or None) of each sample."""
        key, record = None, None
        for name, offset, size in self._members():
            if re.match(_META, name):
                continue
            prefix, suffix = base_plus_ext(name)
            if prefix is None:
                continue
            if prefix != key:
                if key is not None:
                    yield key, record
                key, record = prefix, None
            if suffix.lower() == schema.SAMPLE_EXTENSION:
                record = offset, size
        if key is not None:
            yield key, record

    def _next(self) -> Optional[tuple[str, Optional[tuple[int, int]]]]:
        try:
            sample = next(self._samples, None)
        except self._READ_ERRORS as exc:
            self._fail(self.count, f"unreadable after {self.count} of {self.expected} records ({exc})")
            return None
        if sample is None:
            if self.count != self.expected:
                self._fail(self.count, f"{self.count} records read, {MANIFEST} says {self.expected} (damaged tar)")
        else:
            self.count += 1
        return sample

    def take(self, positions: Sequence[int]) -> dict[int, tuple[str, Optional[bytes]]]:
        """{position: (key, record bytes, or None for a sample without a record member)} for
        ``positions`` (ascending, after every position taken before) that the shard holds; reading
        stops at the first failure."""
        out = {}
        for p in positions:
            while self.failure is None and self.count <= p:
                sample = self._next()
                if sample is None:
                    return out
                if self.count - 1 == p:
                    key, record = sample
                    try:  # read where the header says, without moving the header reader
                        data = os.pread(self._file.fileno(), record[1], record[0]) if record else None
                        if data is not None and len(data) != record[1]:
                            raise EOFError(f"record {key} cut short")
                    except self._READ_ERRORS as exc:
                        self._fail(p, f"unreadable after {p} of {self.expected} records ({exc})")
                        return out
                    out[p] = key, data
            if self.failure is not None:
                break
        return out

    def _fail(self, readable: int, why: str) -> None:
        self.readable, self.failure = readable, why

    def finish(self) -> Optional[str]:
        """Passes over the remaining headers; why the shard differs from its manifest, if it does."""
        while self.failure is None and self._next() is not None:
            pass
        return self.failure

    def close(self) -> None:
        self._samples.close()
        if self._file is not None:
            self._file.close()


def members(url: str) -> Iterator[tuple[str, Optional[bytes]]]:
    """(key, record bytes or None when the sample has no record member) of each sample of a shard,
    in order, read by WebDataset."""
    for sample in wds.tarfile_to_samples()([{"url": url}]):
        yield sample["__key__"], sample.get(schema.SAMPLE_EXTENSION)


def checked_records(url: str, modality: str, on_bad_record: str = "stop", what: str = "held-out data",
                    notes: Optional[list] = None) -> Iterator[dict]:
    """The records of one shard in order (main process, for evaluation), checked as in training:
    ``stop`` raises :class:`DataError` at the first bad one, ``skip`` leaves it out (its
    description goes to ``notes``). Only the first records of a shard may be read, so the count
    is not checked here."""

    def problem(key, why):
        message = f"{what}: {record_problem(url, key, why)}"
        if on_bad_record == "stop":
            raise DataError(f"{message}; {_inspect_hint(Path(url).parent)}")
        if notes is not None:
            notes.append(message)

    count = 0
    try:
        for key, data in members(url):
            count += 1
            rec, why = decode_checked(data, modality) if data is not None else (None, "not a record member")
            if rec is None:
                problem(key, why)
                continue
            yield rec
    except (OSError, tarfile.TarError, EOFError, ValueError) as exc:
        problem(None, f"unreadable after {count} records ({exc})")
