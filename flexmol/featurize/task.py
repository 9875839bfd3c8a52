"""The bodies of the featurisation job's tasks. Each runs the same in a Ray worker and in-process,
touches only files of the dataset directory, writes each through a temporary name, and is
idempotent: run again (a retry after its worker or node died), it writes the same bytes.

1. :func:`featurize_shard`: a slice of the input -> ``shard-N.tar``; ``parts/shard-N.keys``, one
   line per record with its InChIKey and what rejecting it as a duplicate takes, grouped into
   :data:`KEY_BUCKETS` buckets by a hash of the key behind a table of their offsets; and, last,
   ``parts/shard-N.json``, the shard's summary and rejects, whose presence marks it finished.
2. :func:`find_duplicates`: one range of key buckets, read from every shard's key file in shard
   order -> ``parts/dups/shard-N.bLO-HI.jsonl``, the records whose InChIKey an earlier shard
   holds. Each of these tasks holds only its buckets' share of the dataset's keys.
3. :func:`remove_duplicates`: one shard and its duplicates -> the shard without them and the
   duplicates among its rejects (``parts/shard-N.json``, marked done).

In task 1, per-molecule failures become rejections; what cannot be caught in Python (a segfault in
RDKit, a hang in C++) kills the worker, and the progress file written here tells the driver which
molecule was being processed at the time.
"""
from __future__ import annotations

import faulthandler
import itertools
import json
import os
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

from flexmol import faults
from flexmol.chem import Featurizer, RawInput, Rejected
from flexmol.config import FeaturizerConfig
from flexmol.data import schema
from flexmol.data.shards import atomic_write_text, atomic_writer, filter_shard, shard_name, write_encoded_shard

# Hash buckets of the key files. A duplicate search task reads a range of them, so they bound how
# finely the keys can be split: 256 ranges hold ~4M keys each at a billion molecules.
KEY_BUCKETS = 256
_OFFSET = struct.Struct("<Q")
# What the driver keeps of a shard (the rejects stay in the part file).
SUMMARY_KEYS = ("shard", "shard_id", "first_index", "num_inputs", "samples", "bytes", "sha256", "atoms",
                "conformers", "fragments_stripped")


@dataclass
class ShardSpec:
    shard_id: int
    first_index: int
    num_inputs: int

    @property
    def name(self) -> str:
        return shard_name(self.shard_id)


def parts_dir(out: Path) -> Path:
    return Path(out) / "parts"


def part_path(out: Path, shard_id: int) -> Path:
    return parts_dir(out) / f"shard-{shard_id:06d}.json"


def progress_path(out: Path, shard_id: int) -> Path:
    return parts_dir(out) / f"shard-{shard_id:06d}.progress"


def keys_path(out: Path, shard_id: int) -> Path:
    return parts_dir(out) / f"shard-{shard_id:06d}.keys"


def dups_dir(out: Path) -> Path:
    return parts_dir(out) / "dups"


def part_summary(part: dict) -> dict:
    """What the driver keeps of a shard's part file: its counts, not its rejects."""
    return {**{k: part[k] for k in SUMMARY_KEYS}, "rejected": len(part["rejects"])}


def featurize_shard(
    spec: ShardSpec,
    inputs: list[RawInput],
    cfg: FeaturizerConfig,
    modality: str,
    out: str,
    skip: dict[int, str] | None = None,
    watchdog: bool = True,
) -> dict:
    """Featurise ``inputs`` into ``<out>/shard-NNNNNN.tar`` and its key and part files; return the
    shard's :func:`part_summary`.

    ``skip`` maps input indices to a rejection reason decided by the driver (molecules that killed
    their worker before). With ``watchdog``, a molecule still running after
    ``cfg.hard_timeout_s`` makes the process exit (the only way out of a hung C++ call).
    """
    out_dir = Path(out)
    skip = skip or {}
    featurize = Featurizer(cfg, modality)
    started = time.perf_counter()
    encoded: list[tuple[int, bytes]] = []  # (input index, record bytes), what the shard holds
    keys: list[list] = []  # a key file line per record (see write_keys)
    rejects: list[dict] = []
    seen: dict[str, tuple[int, str]] = {}
    atoms = conformers = stripped = 0
    fd = os.open(progress_path(out_dir, spec.shard_id), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
    # Where the watchdog writes the stack of a molecule that overran its time, before it exits.
    watchdog_log = open(parts_dir(out_dir) / f"shard-{spec.shard_id:06d}.watchdog.log", "a") if watchdog else None
    dog = _Watchdog(cfg.hard_timeout_s, watchdog_log) if watchdog else None
    try:
        for raw in inputs:
            if raw.index in skip:
                rejects.append(_reject(raw, "worker_died", skip[raw.index], raw.text))
                continue
            # Unbuffered: this line survives the process dying in the very next call.
            os.write(fd, f"{raw.index}\n".encode())
            if dog is not None:
                dog.tick()
            try:
                faults.maybe_inject(raw.id)
                rec = featurize(raw)
            except Rejected as exc:
                rejects.append(_reject(raw, exc.code, exc.reason, exc.smiles or _input_smiles(raw)))
                continue
            except Exception as exc:  # a featuriser bug must not lose the other molecules
                rejects.append(_reject(raw, "error", f"{type(exc).__name__}: {str(exc).strip()[:200]}", _input_smiles(raw)))
                continue
            try:
                # Every record is checked against the schema before it is written, so a featuriser
                # bug costs its molecule (rejected with the reason), never a dataset that fails its
                # check or a training run. Measured on 1000 NCI molecules: validate takes ~8 us
                # per record, 1.3% of 2D featurisation (~0.63 ms per molecule), 0.02% of paired
                # (~20 ms). Encoding moved here from the shard writer: done once, costs nothing more.
                schema.validate(rec)
                if rec["index"] != raw.index:
                    raise schema.SchemaError(f"index {rec['index']} for input {raw.index}")
                data = schema.encode(rec)
            except Exception as exc:  # SchemaError, or a value msgpack cannot encode (TypeError)
                why = str(exc).strip()[:200]
                if not isinstance(exc, schema.SchemaError):
                    why = f"{type(exc).__name__}: {why}"
                rejects.append(_reject(raw, "schema", f"the featurised record breaks the sample schema: {why}",
                                       _input_smiles(raw)))
                continue
            key = rec["inchikey"]
            if key in seen:
                first_index, first_id = seen[key]
                rejects.append(_reject(raw, "duplicate", _duplicate_reason(first_index, first_id, key), rec["smiles"]))
                continue
            seen[key] = (raw.index, raw.id)
            encoded.append((raw.index, data))
            n_atoms = len(rec["z"])
            n_conformers = len(rec["pos"]) if "pos" in rec else 0
            frags = bool(rec.get("fragments_stripped"))
            keys.append([key, rec["index"], rec["id"], rec["smiles"], n_atoms, n_conformers, frags])
            atoms += n_atoms
            conformers += n_conformers
            stripped += frags
    finally:
        os.close(fd)
        if dog is not None:
            faulthandler.cancel_dump_traceback_later()
            watchdog_log.close()

    samples, size, digest = write_encoded_shard(out_dir / spec.name, encoded)
    if samples + len(rejects) != spec.num_inputs or len(inputs) != spec.num_inputs:
        raise RuntimeError(f"{spec.name}: {samples} written + {len(rejects)} rejected != {spec.num_inputs} inputs")
    part = {
        "shard": spec.name,
        "shard_id": spec.shard_id,
        "first_index": spec.first_index,
        "num_inputs": spec.num_inputs,
        "samples": samples,
        "bytes": size,
        "sha256": digest,
        "atoms": atoms,
        "conformers": conformers,
        "fragments_stripped": stripped,
        "keys_bytes": write_keys(keys_path(out_dir, spec.shard_id), keys),
        "rejects": rejects,
        "seconds": round(time.perf_counter() - started, 3),
    }
    # The part file is written last: its presence is what marks the shard as finished.
    atomic_write_text(part_path(out_dir, spec.shard_id), json.dumps(part))
    progress_path(out_dir, spec.shard_id).unlink(missing_ok=True)
    log_path = parts_dir(out_dir) / f"shard-{spec.shard_id:06d}.watchdog.log"
    if log_path.exists() and log_path.stat().st_size == 0:
        log_path.unlink()
    return part_summary(part)


def _duplicate_reason(first_index: int, first_id: str, key: str) -> str:
    return f"duplicate of input {first_index} ({first_id}) by InChIKey {key}"


# ------------------------------------------------------------------------------------- key files

def key_bucket(key: str) -> int:
    return zlib.crc32(key.encode()) % KEY_BUCKETS


def write_keys(path: Path, entries: list[list]) -> int:
    """Write a shard's key file; return its size in bytes.

    ``entries`` are ``[InChIKey, index, id, smiles, atoms, conformers, fragments_stripped]``, one
    per record in input order. They become JSON lines, grouped by :func:`key_bucket` (input order
    within a bucket), after a table of KEY_BUCKETS + 1 little-endian uint64 file offsets: bucket
    ``b`` spans ``[offset[b], offset[b + 1])``, so a reader of a bucket range seeks to it.
    """
    buckets: list[list[bytes]] = [[] for _ in range(KEY_BUCKETS)]
    for entry in entries:
        buckets[key_bucket(entry[0])].append(json.dumps(entry, ensure_ascii=True).encode() + b"\n")
    blocks = [b"".join(lines) for lines in buckets]
    offsets = itertools.accumulate(map(len, blocks), initial=_OFFSET.size * (KEY_BUCKETS + 1))
    table = b"".join(map(_OFFSET.pack, offsets))
    with atomic_writer(path, "wb") as f:
        f.write(table)
        f.writelines(blocks)
    return len(table) + sum(map(len, blocks))


def read_keys(path: Path, lo: int, hi: int) -> list[list]:
    """The entries of buckets ``lo`` to ``hi - 1`` of a key file (see :func:`write_keys`)."""
    with open(path, "rb") as f:
        start, end = _offset(f, lo), _offset(f, hi)
        f.seek(start)
        data = f.read(end - start)
    if len(data) != end - start:
        raise ValueError(f"{path}: truncated key file ({len(data)} of {end - start} bytes of buckets {lo}-{hi - 1})")
    return [json.loads(line) for line in data.splitlines()]


def _offset(f, bucket: int) -> int:
    f.seek(_OFFSET.size * bucket)
    raw = f.read(_OFFSET.size)
    if len(raw) != _OFFSET.size:
        raise ValueError(f"{f.name}: truncated key file (its offset table ends before bucket {bucket})")
    return _OFFSET.unpack(raw)[0]


# ------------------------------------------------------------------------- cross-shard duplicates

def dups_path(out: Path, shard_id: int, lo: int, hi: int) -> Path:
    return dups_dir(out) / f"shard-{shard_id:06d}.b{lo:03d}-{hi - 1:03d}.jsonl"


def find_duplicates(out: str, num_shards: int, lo: int, hi: int) -> dict[int, int]:
    """Find the records of key buckets ``lo`` to ``hi - 1`` whose InChIKey an earlier shard holds
    (the first occurrence in input order stays); write them per shard to ``parts/dups/`` and
    return {shard id: how many}. Duplicates within a shard were rejected by its own task."""
    out_dir = Path(out)
    first: dict[str, tuple[int, str]] = {}  # InChIKey -> (index, id) of its first record
    found: dict[int, int] = {}
    for shard_id in range(num_shards):
        dups = []
        for key, index, ident, smiles, atoms, conformers, stripped in read_keys(keys_path(out_dir, shard_id), lo, hi):
            earlier = first.setdefault(key, (index, ident))
            if earlier[0] != index:
                dups.append([index, ident, smiles, _duplicate_reason(*earlier, key), atoms, conformers, stripped])
        if dups:
            with atomic_writer(dups_path(out_dir, shard_id, lo, hi)) as f:
                f.writelines(json.dumps(d, ensure_ascii=True) + "\n" for d in dups)
            found[shard_id] = len(dups)
    return found


def remove_duplicates(out: str, shard_id: int) -> dict:
    """Remove from a shard the records :func:`find_duplicates` found in it, add them to its
    rejects and mark its part file done; return its :func:`part_summary`.

    Run again after its worker died, it redoes what is left: the part file is the last thing it
    writes, and filtering a shard already without the duplicates rewrites the same bytes.
    """
    out_dir = Path(out)
    path = part_path(out_dir, shard_id)
    part = json.loads(path.read_text())
    if "duplicates_removed" in part:
        return part_summary(part)
    dups = sorted((json.loads(line) for file in sorted(dups_dir(out_dir).glob(f"shard-{shard_id:06d}.*.jsonl"))
                   for line in file.read_text().splitlines()), key=lambda d: d[0])
    samples, size, digest = filter_shard(out_dir / part["shard"], {d[0] for d in dups})
    if samples != part["samples"] - len(dups):
        raise RuntimeError(f"{part['shard']}: {samples} records left after removing {len(dups)} duplicate(s) "
                           f"from {part['samples']}")
    rejects = part["rejects"] + [{"index": index, "id": ident, "smiles": smiles, "code": "duplicate", "reason": reason}
                                 for index, ident, smiles, reason, *_ in dups]
    part.update(samples=samples, bytes=size, sha256=digest,
                atoms=part["atoms"] - sum(d[4] for d in dups),
                conformers=part["conformers"] - sum(d[5] for d in dups),
                fragments_stripped=part["fragments_stripped"] - sum(d[6] for d in dups),
                rejects=sorted(rejects, key=lambda r: r["index"]), duplicates_removed=len(dups))
    atomic_write_text(path, json.dumps(part))
    return part_summary(part)


class _Watchdog:
    """Ends the process when one molecule runs for too long, from a C thread that needs no GIL
    (RDKit can hang inside C++, where no Python-level timeout reaches).

    Re-arming faulthandler's timer costs ~0.1 ms (it restarts a thread): done per molecule it
    would add 10% to 2D featurisation. So the timer runs for 2 x ``limit`` and is re-armed only
    when it was armed more than ``limit`` ago: every molecule gets at least ``limit`` seconds and
    at most 2 x ``limit`` before its worker is killed.
    """

    def __init__(self, limit: float, log):
        self.limit, self.log, self.armed_at = limit, log, -float("inf")

    def tick(self) -> None:
        now = time.monotonic()
        if now - self.armed_at > self.limit:
            faulthandler.dump_traceback_later(2 * self.limit, exit=True, file=self.log)
            self.armed_at = now


def _input_smiles(raw: RawInput) -> str | None:
    return raw.text if raw.kind in ("smiles", "smiles+geometry") else None


def _reject(raw: RawInput, code: str, reason: str, smiles: str | None) -> dict:
    return {"index": raw.index, "id": raw.id, "smiles": smiles or None, "code": code, "reason": reason}


def last_started(out: Path, shard_id: int) -> int | None:
    """Index of the molecule a dead worker was featurising (the last one it announced)."""
    path = progress_path(out, shard_id)
    try:
        lines = path.read_text().split()
        return int(lines[-1]) if lines else None
    except (OSError, ValueError):  # gone, or its last line cut short by the death it records
        return None
