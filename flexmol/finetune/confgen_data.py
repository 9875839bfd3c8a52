"""The conformer task's data: reference geometries (QM9's DFT structures, or a user's SDF of
reference conformers), seeded RDKit input conformers for each molecule, and the InChIKey split.

Each input row is featurised (paired: the graph and the reference's heavy-atom coordinates) in
worker processes; rows of one InChIKey are one molecule with several references (SDF), matched
onto the first one's atom order. Molecules in ``data.exclude`` (an evaluation set) are dropped
before anything else is done with them. Input conformers (``input.num_confs`` ETKDGv3 conformers,
MMFF94-optimised with ``input.mmff``, seeded per molecule exactly as :func:`flexmol.evaluate.confgen.etkdg`
seeds them) are made once, in worker processes, and cached in the output directory or
``data.cache_dir`` (``inputs.npz``, read with ``allow_pickle=False``, and ``inputs.json``, the generator's
definition; each molecule keyed by its InChIKey and its atom order): a rerun with the same definition
reuses them and embeds only molecules it lacks, one with another definition rebuilds them and says so.
Every rejected row is kept with its reason.
"""
from __future__ import annotations

import hashlib
import json
import math
import multiprocessing as mp
import re
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from itertools import islice
from pathlib import Path

import numpy as np

from flexmol.config import ConfigError, FeaturizerConfig
from flexmol.data import schema
from flexmol.finetune.data import _chunks  # the property fine-tuning's chunker

CHUNK = 64
CACHE = "inputs.npz"
CACHE_META = "inputs.json"
MAX_SYMMETRIES = 1000  # graph symmetries tried when a reference is matched to an input conformer
PROGRESS_S = 10.0  # seconds between progress lines while the data are made
INCHIKEY = re.compile(r"[A-Z]{14}-[A-Z]{10}-[A-Z]")


@dataclass
class Molecule:
    """One molecule of the task: its record (graph; ``pos`` [R, n, 3] its references), its RDKit
    heavy-atom molecule in the record's atom order, its input conformers [K, n, 3] and, for each,
    its training target [K, n, 3] (:func:`nearest_references`)."""

    record: dict
    mol: object
    inputs: np.ndarray
    targets: np.ndarray

    @property
    def key(self) -> str:
        return self.record["inchikey"]

    @property
    def references(self) -> np.ndarray:
        return self.record["pos"]

    @cached_property
    def candidates(self) -> np.ndarray:
        """[R * S, n, 3] float64: every reference under every relabelling by the graph's
        symmetries (:func:`symmetries`), the unrelabelled references first."""
        refs = self.references.astype(np.float64)
        return refs[:, symmetries(self.mol)].transpose(1, 0, 2, 3).reshape(-1, *refs.shape[1:])

    def nearest(self, coords: np.ndarray) -> np.ndarray:
        """The candidate (:attr:`candidates`) with the least RMSD to ``coords`` [n, 3] after superposition."""
        return self.candidates[int(np.argmin(best_fit_rmsd(np.asarray(coords, dtype=np.float64), self.candidates)))]


@dataclass
class ConfgenData:
    molecules: list[Molecule]
    rejects: list[dict] = field(default_factory=list)
    counts: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------ the workers

def _featurize_chunk(raws: list) -> list[tuple]:
    from flexmol.chem.errors import Rejected
    from flexmol.chem.featurizer import Featurizer

    feat = Featurizer(FeaturizerConfig(), "paired")
    out = []
    for raw in raws:
        try:
            record, mol = feat.with_molecule(raw)
            out.append(("ok", schema.encode(record), mol.ToBinary()))
        except Rejected as exc:
            out.append(("rejected", _reject(raw, exc.code, exc.reason), None))
        except Exception as exc:  # noqa: BLE001 -- RDKit raising on a pathological molecule must not stop the job
            out.append(("rejected", _reject(raw, "error", f"{type(exc).__name__}: {exc}"), None))
    return out


def _embed_chunk(items: list, generator: dict) -> list[tuple]:
    from rdkit import Chem

    from flexmol.chem.errors import Rejected
    from flexmol.evaluate.confgen import ConfgenConfig, etkdg

    cfg = ConfgenConfig(num_confs=generator["num_confs"], seed=generator["seed"], mmff=generator["mmff"],
                        embed_timeout_s=generator["embed_timeout_s"])
    out = []
    for key, binary in items:
        inchikey = key.split("/")[0]  # the seed is the InChIKey's, as flexmol evaluate confgen's
        try:
            out.append((key, etkdg(Chem.Mol(binary), cfg, inchikey), None))
        except Rejected as exc:
            out.append((key, None, f"{exc.code}: {exc.reason}"))
        except Exception as exc:  # noqa: BLE001
            out.append((key, None, f"error: {type(exc).__name__}: {exc}"))
    return out


def _reject(raw, code: str, reason: str) -> dict:
    """One rejects.jsonl entry."""
    return {"index": raw.index, "id": raw.id, "input": (raw.text or "")[:200], "code": code, "reason": reason}


def _quiet(message: str) -> None:
    """The ``log`` of a caller that wants no progress lines (``log=None``)."""


class _Every:
    """``due()`` is true at most once per ``seconds`` (the first call included)."""

    def __init__(self, seconds: float):
        self.seconds, self.last = seconds, -math.inf

    def due(self) -> bool:
        now = time.monotonic()
        if now - self.last < self.seconds:
            return False
        self.last = now
        return True


def _pool_map(fn, chunks, workers: int, *args):
    """``fn(chunk, *args)`` for every chunk, in order; in ``workers`` processes when more than one."""
    if workers <= 1:
        yield from (fn(c, *args) for c in chunks)
        return
    # fork: the workers only run RDKit, and unlike spawn it needs no __main__ guard in the caller.
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    with ProcessPoolExecutor(workers, mp_context=mp.get_context(method)) as pool:
        futures = [pool.submit(fn, c, *args) for c in chunks]
        try:
            for f in futures:
                yield f.result()
        finally:
            for f in futures:
                f.cancel()


# ----------------------------------------------------------------------------------- the molecules

def excluded_inchikeys(entries) -> set[str]:
    """InChIKeys never to train on: from each entry of ``data.exclude``, a featurised dataset
    directory (every molecule of its shards) or a text file of InChIKeys (one per line; blank lines
    and ``#`` comments skipped; the first word of a line, which must be an InChIKey). A missing or
    unreadable entry, or a line that is not an InChIKey, is a :class:`ConfigError` naming it."""
    from flexmol.evaluate.confgen import seen_inchikeys

    keys: set[str] = set()
    for entry in entries:
        path = Path(entry)
        if path.is_dir():
            try:
                keys |= seen_inchikeys([path])
            except (ValueError, OSError) as exc:
                raise ConfigError(f"config key 'data.exclude': {path}: {exc}") from None
        elif path.is_file():
            try:
                lines = path.read_text().splitlines()
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(f"config key 'data.exclude': {path}: not a readable text file ({exc})") from None
            for number, line in enumerate(lines, 1):
                if not line.strip() or line.lstrip().startswith("#"):
                    continue
                key = line.split()[0]
                if not INCHIKEY.fullmatch(key):  # a SMILES or CSV file would exclude nothing, silently
                    raise ConfigError(f"config key 'data.exclude': {path}:{number}: {key[:40]!r} is not an InChIKey "
                                      "(one per line: XXXXXXXXXXXXXX-YYYYYYYYYY-Z)")
                keys.add(key)
        else:
            raise ConfigError(f"config key 'data.exclude': {path}: no such dataset directory or InChIKey file")
    return keys


def _renumbered(mol, first_mol, pos: np.ndarray):
    """``pos`` [C, n, 3] of ``mol`` in ``first_mol``'s atom order (the same molecule read from
    another record), or None when the two graphs do not match."""
    match = mol.GetSubstructMatch(first_mol, useChirality=False)
    if len(match) != first_mol.GetNumAtoms() or mol.GetNumAtoms() != first_mol.GetNumAtoms():
        return None
    return pos[:, list(match)]


def read_references(raws, exclude: set[str], workers: int, log=print):
    """Featurise ``raws`` and group them by InChIKey: ([(record, mol)], rejects, counts), each
    record's ``pos`` [R, n, 3] holding every reference of its molecule; molecules in ``exclude``
    left out (counted)."""
    from rdkit import Chem

    log = log or _quiet
    groups: dict[str, list] = {}
    rejects, read, excluded = [], 0, 0
    progress = _Every(PROGRESS_S)
    for chunk in _pool_map(_featurize_chunk, _chunks(raws, CHUNK), workers):
        for status, item, binary in chunk:
            read += 1
            if status != "ok":
                rejects.append(item)
                continue
            record = schema.decode(item)
            if record.get("conf_method") != "input":  # the featuriser embedded it: no reference to learn
                rejects.append({"index": record["index"], "id": record["id"], "input": record["smiles"],
                                "code": "no_reference_geometry", "reason": "the record carries no 3D geometry "
                                "(a reference conformer needs coordinates: QM9 rows or a 3D SDF)"})
                continue
            if record["inchikey"] in exclude:
                excluded += 1
                continue
            mol = Chem.Mol(binary)
            group = groups.setdefault(record["inchikey"], [])
            if group:
                pos = _renumbered(mol, group[0][1], record["pos"])
                if pos is None:
                    rejects.append({"index": record["index"], "id": record["id"], "input": record["smiles"],
                                    "code": "reference_mismatch", "reason": "same InChIKey as an earlier record "
                                    "but its heavy-atom graph does not map onto it"})
                    continue
                record = {**record, "pos": pos}
            group.append((record, mol))
        if progress.due():
            log(f"[finetune-confgen] featurised {read} references ({len(rejects)} rejected, {excluded} excluded)")
    log(f"[finetune-confgen] featurised {read} references: {len(groups)} molecules, {len(rejects)} rejected, "
        f"{excluded} excluded")
    molecules = []
    for group in groups.values():
        record, mol = group[0]
        molecules.append(({**record, "pos": np.concatenate([r["pos"] for r, _ in group]).astype(np.float32)}, mol))
    counts = {"rows_read": read, "rejected": len(rejects), "excluded": excluded, "molecules": len(molecules),
              "references": int(sum(len(r["pos"]) for r, _ in molecules))}
    return molecules, rejects, counts


def _load_cache(out: Path, generator: dict, log=print) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Cached input conformers by InChIKey and the molecules ETKDG could not embed (InChIKey ->
    reason), when ``inputs.json`` describes ``generator``; empty (with a message) when the cache was
    made otherwise or cannot be read."""
    meta, data = out / CACHE_META, out / CACHE
    if not meta.is_file() or not data.is_file():
        return {}, {}
    try:
        described = json.loads(meta.read_text())
        if described.get("generator") != generator:
            log(f"[finetune-confgen] {data}: made with {described.get('generator')}, not {generator}: rebuilding "
                "the input conformers")
            return {}, {}
        failed = {str(k): str(v) for k, v in dict(described.get("failed", {})).items()}
        with np.load(data, allow_pickle=False) as z:
            keys, counts, atoms, coords = z["keys"], z["counts"], z["atoms"], z["coords"]
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as exc:
        log(f"[finetune-confgen] {data}: unreadable ({type(exc).__name__}: {exc}): rebuilding the input conformers")
        return {}, {}
    out_map, start = {}, 0
    for key, k, n in zip(keys.tolist(), counts.tolist(), atoms.tolist()):
        out_map[key] = coords[start:start + k * n].reshape(k, n, 3)
        start += k * n
    return out_map, failed


def _save_cache(out: Path, generator: dict, inputs: dict[str, np.ndarray], failed: dict[str, str]) -> None:
    keys = sorted(inputs)
    coords = np.concatenate([inputs[k].reshape(-1, 3) for k in keys]) if keys else np.zeros((0, 3), np.float32)
    import os

    tmp = out / f".{CACHE}.{os.getpid()}.tmp.npz"  # runs sharing a cache_dir never write one file
    np.savez(tmp, keys=np.array(keys, dtype=str), counts=np.array([len(inputs[k]) for k in keys], dtype=np.int64),
             atoms=np.array([inputs[k].shape[1] for k in keys], dtype=np.int64), coords=coords.astype(np.float32))
    meta = out / f".{CACHE_META}.{os.getpid()}.tmp"
    meta.write_text(json.dumps({"generator": generator, "molecules": len(keys), "failed": failed}, indent=1) + "\n")
    tmp.replace(out / CACHE)
    meta.replace(out / CACHE_META)


def input_conformers(molecules, generator: dict, out: Path, workers: int, log=print):
    """Input conformers [K, n, 3] by InChIKey for ``molecules`` ([(record, mol)]), from the cache in
    the directory ``out`` where it has them (or has them as failed: ETKDG is not tried again),
    embedded (in ``workers`` processes) otherwise; and the rejects (molecules ETKDG could not
    embed). The cache is rewritten with every molecule's conformers, those of other molecules it
    held kept (runs on other rows can share it)."""
    from rdkit import Chem

    log = log or _quiet
    cached, failed = _load_cache(out, generator, log)
    # cached by InChIKey and atom order: the same molecule read from another source (another atom
    # order) must not get conformers whose rows are other atoms
    ckey = {r["inchikey"]: cache_key(r["inchikey"], mol) for r, mol in molecules}
    todo = [(ckey[r["inchikey"]], mol) for r, mol in molecules
            if ckey[r["inchikey"]] not in failed and ckey[r["inchikey"]] not in cached]
    if len(todo) < len(molecules):
        log(f"[finetune-confgen] {len(molecules) - len(todo)} molecules' input conformers from {out / CACHE}")
    done, fresh, fresh_failed = 0, {}, {}
    progress = _Every(PROGRESS_S)
    by_key = {ckey[r["inchikey"]]: r for r, _ in molecules}
    items = ((key, Chem.Mol(mol).ToBinary()) for key, mol in todo)
    for chunk in _pool_map(_embed_chunk, _chunks(items, CHUNK), workers, generator):
        for key, coords, why in chunk:
            if coords is None:
                fresh_failed[key] = why
            else:
                fresh[key] = coords.astype(np.float32)
        done += len(chunk)
        if progress.due() or done == len(todo):
            log(f"[finetune-confgen] embedded {done}/{len(todo)} molecules ({len(fresh_failed)} rejected)")
    inputs = {k: v for k, v in cached.items() if k in by_key and k not in fresh_failed}
    inputs.update(fresh)
    failed.update(fresh_failed)
    if fresh or fresh_failed:
        _save_cache(out, generator, {**cached, **fresh}, failed)
    rejects = []
    for key in by_key:
        if key in failed and key not in inputs:
            rec = by_key[key]
            code, _, reason = failed[key].partition(": ")
            rejects.append({"index": rec["index"], "id": rec["id"], "input": rec["smiles"], "code": code,
                            "reason": reason})
    return {by_key[k]["inchikey"]: v for k, v in inputs.items()}, rejects


def cache_key(inchikey: str, mol) -> str:
    """The input-conformer cache's key of ``mol`` (heavy atoms, in its record's order): its
    InChIKey and a digest of its elements and bonds in that order."""
    bonds = sorted(tuple(sorted((b.GetBeginAtomIdx(), b.GetEndAtomIdx()))) for b in mol.GetBonds())
    graph = ",".join(str(a.GetAtomicNum()) for a in mol.GetAtoms()) + ";" + ",".join(f"{i}-{j}" for i, j in bonds)
    return f"{inchikey}/{hashlib.sha256(graph.encode()).hexdigest()[:16]}"


def symmetries(mol, limit: int = MAX_SYMMETRIES) -> np.ndarray:
    """[S, n] atom orderings of ``mol`` that leave its graph unchanged (elements, bonds; the identity
    first), at most ``limit``."""
    matches = mol.GetSubstructMatches(mol, uniquify=False, useChirality=False, maxMatches=limit)
    identity = tuple(range(mol.GetNumAtoms()))
    return np.array([identity] + [m for m in matches if m != identity], dtype=np.int64)


def best_fit_rmsd(mobile: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """RMSD of ``mobile`` [n, 3] to each of ``targets`` [T, n, 3] after optimal superposition."""
    a = mobile - mobile.mean(0)
    b = targets - targets.mean(1, keepdims=True)
    h = np.einsum("ni,tnj->tij", a, b)
    u, sv, vt = np.linalg.svd(h)
    sign = np.sign(np.linalg.det(u @ vt))
    sv[:, -1] *= np.where(sign == 0, 1.0, sign)
    msd = ((a * a).sum() + (b * b).sum((1, 2)) - 2 * sv.sum(1)) / len(mobile)
    return np.sqrt(np.clip(msd, 0, None))


def reference_rmsd(coords: np.ndarray, molecule: Molecule) -> float:
    """Heavy-atom RMSD (Å) of ``coords`` [n, 3] to the nearest reference of ``molecule`` after
    superposition, over the graph's symmetries (as RDKit's GetBestRMS counts it)."""
    return float(best_fit_rmsd(np.asarray(coords, dtype=np.float64), molecule.candidates).min())


def nearest_references(inputs: np.ndarray, references: np.ndarray, mol) -> np.ndarray:
    """[K, n, 3]: for each input conformer, the reference, its atoms relabelled by the graph
    symmetry of ``mol`` (:func:`symmetries`), with the least RMSD to it after superposition: the
    training target. A relabelling is the same geometry; without it a rotated tert-butyl or a
    flipped ring would be a wrong answer to learn."""
    probe = Molecule({"pos": references}, mol, inputs, inputs)
    return np.stack([probe.nearest(c) for c in inputs]).astype(np.float32)


def load_data(cfg, out: Path, log=print) -> ConfgenData:
    """The task's molecules for the config ``cfg`` (:class:`~flexmol.finetune.confgen_train.ConfgenTaskConfig`)."""
    from flexmol.data.sources import open_source

    log = log or _quiet
    d = cfg.data
    exclude = excluded_inchikeys(d.exclude)
    if exclude:
        log(f"[finetune-confgen] {len(exclude)} InChIKeys excluded (data.exclude)")
    source = open_source(d.source)
    raws = islice(iter(source), d.start, d.stop, d.stride)
    molecules, rejects, counts = read_references(raws, exclude, d.workers, log)
    cache = Path(d.cache_dir) if d.cache_dir else out
    cache.mkdir(parents=True, exist_ok=True)
    inputs, embed_rejects = input_conformers(molecules, generator(cfg), cache, d.workers, log)
    rejects += embed_rejects
    kept = []
    for record, mol in molecules:
        coords = inputs.get(record["inchikey"])
        if coords is not None:
            kept.append(Molecule(record, mol, coords, nearest_references(coords, record["pos"], mol)))
    counts.update({"rejected": len(rejects), "embed_rejected": len(embed_rejects), "molecules": len(kept)})
    if not kept:
        raise ValueError(f"data: no molecule left to train on (rows [{d.start}, {d.stop}) step {d.stride} of {d.source}: "
                         f"{counts['rows_read']} read, {len(rejects)} rejected, {counts['excluded']} excluded)")
    return ConfgenData(kept, rejects, counts)


def generator(cfg) -> dict:
    """The input conformers' definition (what the cache is keyed by; recorded in ``task.json``)."""
    from rdkit import rdBase

    i = cfg.input
    return {"generator": "etkdg", "mmff": i.mmff, "num_confs": i.num_confs, "seed": i.seed,
            "embed_timeout_s": i.embed_timeout_s, "rdkit": rdBase.rdkitVersion}


def split_keys(keys: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Train and validation InChIKeys: a seeded permutation of the sorted keys, the first
    ``round(val_fraction * n)`` (at least one when the fraction is positive and there are two
    molecules or more) for validation."""
    keys = sorted(keys)
    order = np.random.default_rng(seed).permutation(len(keys))
    n_val = int(round(val_fraction * len(keys)))
    if val_fraction > 0 and len(keys) > 1:
        n_val = min(max(n_val, 1), len(keys) - 1)
    val = sorted(keys[i] for i in order[:n_val])
    train = sorted(keys[i] for i in order[n_val:])
    return train, val
