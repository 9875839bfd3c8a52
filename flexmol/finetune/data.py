"""A labelled set for fine-tuning: read, featurised once (in worker processes), labels checked.

Every input row ends up either in the set or in the rejects with its reason (unparseable SMILES,
a failed conformer, a non-numeric label, no label at all); the counts are printed and the rejects
written beside the results. The featurised set is cached (msgpack, no pickle) in the output
directory, keyed by everything it depends on, so reruns and further seeds skip the RDKit work.
"""
from __future__ import annotations

import hashlib
import json
import math
import multiprocessing as mp
import sys
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import msgpack
import numpy as np

from flexmol.config import FeaturizerConfig, SourceOptions
from flexmol.data import schema

CHUNK = 256


@dataclass
class TaskData:
    records: list[dict]  # featurised molecules (schema v1), in input order
    labels: np.ndarray  # [n, T] float64, NaN where a label is missing
    targets: list[str]
    task: str
    rejects: list[dict] = field(default_factory=list)
    read: int = 0  # input rows

    @property
    def smiles(self) -> list[str]:
        return [r["smiles"] for r in self.records]

    def summary(self) -> str:
        counts = Counter(r["code"] for r in self.rejects)
        why = ", ".join(f"{c} {k}" for k, c in counts.most_common()) or "none"
        return f"{self.read} rows -> {len(self.records)} molecules; rejected {len(self.rejects)} ({why})"


# --------------------------------------------------------------------------- featurising workers

_featurizer = None


def _init(cfg: dict, modality: str) -> None:
    global _featurizer
    from flexmol.chem.featurizer import Featurizer

    _featurizer = Featurizer(FeaturizerConfig(**cfg), modality)


def _reject(index: int, ident: str, smiles: str, code: str, reason: str) -> dict:
    """One rejects.jsonl entry."""
    return {"index": index, "id": ident, "smiles": smiles, "code": code, "reason": reason}


def _featurize_chunk(raws: list) -> list[tuple[str, object]]:
    from flexmol.chem.errors import Rejected

    out = []
    for raw in raws:
        try:
            out.append(("ok", schema.encode(_featurizer(raw))))
        except Rejected as exc:
            out.append(("rejected", _reject(raw.index, raw.id, raw.text, exc.code, exc.reason)))
        except Exception as exc:  # RDKit raising on a pathological molecule must not stop the job
            out.append(("rejected", _reject(raw.index, raw.id, raw.text, "error", f"{type(exc).__name__}: {exc}")))
    return out


def _chunks(it, size):
    chunk = []
    for x in it:
        chunk.append(x)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def featurize_inputs(raws, cfg: FeaturizerConfig, modality: str, workers: int, progress: bool = True):
    """Records and rejects of ``raws`` (any iterable of RawInput), in input order."""
    encoded, rejects, done = [], [], 0
    chunks = _chunks(raws, CHUNK)
    if workers <= 1:
        _init(asdict(cfg), modality)
        results = map(_featurize_chunk, chunks)
        pool = None
    else:
        # fork: the workers only run RDKit (never torch), and unlike spawn it needs no
        # ``if __name__ == "__main__"`` guard in the caller's script.
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        pool = ProcessPoolExecutor(workers, mp_context=mp.get_context(method), initializer=_init,
                                   initargs=(asdict(cfg), modality))
        results = pool.map(_featurize_chunk, chunks)
    try:
        for chunk in results:
            for status, item in chunk:
                (encoded if status == "ok" else rejects).append(item)
            done += len(chunk)
            if progress:
                print(f"\r[finetune] featurised {done} molecules ({len(rejects)} rejected)", end="", file=sys.stderr,
                      flush=True)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    if progress and done:
        print(file=sys.stderr)
    return [schema.decode(e) for e in encoded], rejects


# ----------------------------------------------------------------------------------------- labels

def _label(value, target: str, task: str) -> float:
    if value is None:
        return math.nan
    if isinstance(value, str):
        raise ValueError(f"target {target!r}: {value!r} is not a number")
    v = float(value)
    if math.isnan(v):
        return v
    if math.isinf(v):
        raise ValueError(f"target {target!r}: {value!r} is not a finite number")
    if task == "classification" and v not in (0.0, 1.0):
        raise ValueError(f"target {target!r}: {value!r} is not a class label (0 or 1)")
    return v


def attach_labels(records: list[dict], targets: list[str], task: str,
                  rejects: list[dict]) -> tuple[list[dict], np.ndarray]:
    kept, rows = [], []
    for rec in records:
        labels = rec.get("labels") or {}
        try:
            missing = [t for t in targets if t not in labels]
            if missing:
                raise ValueError(f"no column {missing}")
            row = [_label(labels[t], t, task) for t in targets]
        except ValueError as exc:
            rejects.append(_reject(rec["index"], rec["id"], rec["smiles"], "bad_label", str(exc)))
            continue
        if all(math.isnan(v) for v in row):
            why = f"no value for any of {targets}"
            rejects.append(_reject(rec["index"], rec["id"], rec["smiles"], "no_label", why))
            continue
        kept.append(rec)
        rows.append(row)
    return kept, np.array(rows, dtype=np.float64).reshape(len(rows), len(targets))


# ------------------------------------------------------------------------------------------ load

def content_fingerprint(source) -> dict:
    """What identifies ``source``'s rows: for a file, its path, size and sha256 (hashed once per
    version of the file: path, size and modification time), so that an edited file, even one
    edited within the same second or at the same size, is other data; named sets are identified by
    their pinned wheel."""
    from flexmol.model.export import cached_sha256

    fp = dict(source.fingerprint)
    fp.pop("mtime_ns", None)
    if "path" in fp:
        fp["sha256"] = cached_sha256(fp["path"])
    return fp


def source_fingerprint(source_spec: str, targets: list[str], smiles_column=None, id_column=None) -> dict:
    """:func:`content_fingerprint` of ``source_spec`` opened as :func:`load_task_data` opens it."""
    from flexmol.data.sources import open_source

    opts = SourceOptions(smiles_column=smiles_column, id_column=id_column, label_columns=list(targets))
    return content_fingerprint(open_source(source_spec, opts))


def _cache_key(source, opts: SourceOptions, cfg: FeaturizerConfig, modality: str, limit) -> str:
    blob = json.dumps({"source": content_fingerprint(source), "options": asdict(opts), "featurizer": cfg.digest(),
                       "modality": modality, "limit": limit, "schema": schema.SCHEMA_VERSION},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_task_data(source_spec: str, targets: list[str], task: str, *, smiles_column=None, id_column=None,
                   modality: str = "2d",
                   featurizer: FeaturizerConfig | None = None, limit=None, subsample=None, subsample_seed: int = 0,
                   workers: int = 2,
                   cache_dir: Path | None = None, progress: bool = True) -> TaskData:
    """Read ``source_spec`` (a CSV/TSV path or a named set), featurise it for ``modality``
    (``2d``; ``paired`` for the 3D input modes) and attach ``targets`` as a label matrix.
    ``limit`` keeps the first N rows; ``subsample`` then a seeded random N of them."""
    from itertools import islice

    from flexmol.data.sources import open_source

    cfg = featurizer or FeaturizerConfig(num_conformers=1)
    opts = SourceOptions(smiles_column=smiles_column, id_column=id_column, label_columns=list(targets))
    source = open_source(source_spec, opts)
    cache = None
    if cache_dir is not None:
        key = _cache_key(source, opts, cfg, modality, [limit, subsample, subsample_seed])
        cache = Path(cache_dir) / f"features-{key}.msgpack"
        if cache.is_file():
            blob = msgpack.unpackb(cache.read_bytes(), raw=False)
            records = [schema.decode(b) for b in blob["records"]]
            rejects, read = blob["rejects"], blob["read"]
            return _finish(records, rejects, read, targets, task)
    counter = {"n": 0}

    def counted():
        rows = islice(iter(source), limit)
        if subsample is not None:  # a seeded random subset, in input order (files are often sorted by label)
            rows = list(rows)
            keep = np.sort(np.random.default_rng(subsample_seed).permutation(len(rows))[:subsample])
            rows = [rows[i] for i in keep]
        for raw in rows:
            counter["n"] += 1
            yield raw

    records, rejects = featurize_inputs(counted(), cfg, modality, workers, progress)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        tmp.write_bytes(msgpack.packb({"records": [schema.encode(r) for r in records], "rejects": rejects,
                                       "read": counter["n"]}, use_bin_type=True))
        tmp.replace(cache)
    return _finish(records, rejects, counter["n"], targets, task)


def _finish(records, rejects, read, targets, task) -> TaskData:
    rejects = list(rejects)
    kept, labels = attach_labels(records, list(targets), task, rejects)
    rejects.sort(key=lambda r: r["index"])
    return TaskData(kept, labels, list(targets), task, rejects, read)
