"""The featurisation job: a source -> a dataset directory of shards, resumable, every input accounted for.

The driver reads the source (no chemistry), cuts it into fixed slices of ``shard_size`` inputs and
runs one task per slice (:func:`flexmol.featurize.task.featurize_shard`) on Ray or in-process. A
slice's output name depends only on its position, a shard is written under a temporary name and
renamed, and its summary in ``parts/`` is written last: a rerun skips finished shards, so a killed
job resumes. Duplicates across shards are removed at the end by InChIKey (the first occurrence in
input order stays), then ``rejects.jsonl`` and ``manifest.json`` are written, the counts
reconciled (input = written + rejected) and the directory checked as ``flexmol shards inspect
--no-decode`` checks it: a dataset that fails that check is a failed job, never a success.

What cannot become a dataset is refused before any work, in one line naming the key or the file: a
source with no inputs, an output path that is a file or not writable, a config value RDKit or Ray
cannot take, a source option the source's reader does not read.
"""
from __future__ import annotations

import itertools
import json
import os
import sys
import time
from collections import Counter, defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator, Optional

from flexmol import __version__
from flexmol.chem import RawInput
from flexmol.config import FeaturizeConfig, to_dict, validate_featurize
from flexmol.data import schema
from flexmol.data.shards import FORMAT, MANIFEST, REJECTS, atomic_write_text, encode_rejects, filter_shard, inspect
from flexmol.data.sources import open_source
from flexmol.featurize.executors import make_executor
from flexmol.featurize.task import ShardSpec, last_started, part_path, parts_dir

PLAN = "plan.json"


class FeaturizeError(RuntimeError):
    """The job cannot start or cannot finish; the message says why and what to do."""


def default_shard_size(modality: str) -> int:
    # 2D records are ~0.5 kB and featurise at ~1k/s per core; 3D ones take ~30 ms each. Both
    # sizes give shards of a few MB and tasks of tens of seconds.
    return 20000 if modality == "2d" else 1000


def _plan(cfg: FeaturizeConfig, fingerprint: dict, source_name: str, shard_size: int) -> dict:
    return {
        "format": FORMAT,
        "schema_version": schema.SCHEMA_VERSION,
        "modality": cfg.modality,
        "featurizer": to_dict(cfg.featurizer),
        "featurizer_hash": cfg.featurizer.digest(),
        "source": {"name": source_name, **fingerprint},
        "limit": cfg.limit,
        "shard_size": shard_size,
    }


def _check_plan(out: Path, plan: dict) -> None:
    path = out / PLAN
    if not path.exists():
        if any(out.glob("shard-*.tar")) or (out / MANIFEST).exists():
            raise FeaturizeError(f"refusing to write into {out}: it holds shards but no {PLAN} (not made by this job)")
        return
    try:
        old = json.loads(path.read_text())
    except (ValueError, OSError) as exc:
        old = exc
    if not isinstance(old, dict):
        raise FeaturizeError(f"refusing to resume in {out}: its {PLAN} is unreadable or damaged. "
                             "Use another output directory, or delete this one to rebuild it.")
    diffs = []
    for key in sorted(set(old) | set(plan)):
        if old.get(key) == plan.get(key):
            continue
        if key == "featurizer":
            sub = old.get(key) or {}
            for k in sorted(set(sub) | set(plan[key])):
                if sub.get(k) != plan[key].get(k):
                    diffs.append(f"featurizer.{k}: {sub.get(k)!r} -> {plan[key].get(k)!r}")
        elif key != "featurizer_hash":
            diffs.append(f"{key}: {old.get(key)!r} -> {plan.get(key)!r}")
    if diffs:
        what = "featuriser config" if any(d.startswith("featurizer") for d in diffs) else "job"
        raise FeaturizeError(
            f"refusing to resume in {out}: it was built with a different {what} ({'; '.join(diffs)}). "
            "Use another output directory, or delete this one to rebuild it."
        )


def _check_limits(cfg: FeaturizeConfig) -> None:
    """Limits of the job's own keys (the featuriser's are checked with its config)."""
    from flexmol.config import ConfigError

    def fail(key: str, why: str) -> None:
        raise ConfigError(f"config key '{key}': {why}")

    for key, value in (("limit", cfg.limit), ("job.shard_size", cfg.job.shard_size)):
        if value is not None and value > sys.maxsize:
            fail(key, f"{value} is more than {sys.maxsize}")
    if cfg.job.num_cpus is not None and cfg.job.num_cpus < 1:
        fail("job.num_cpus", f"{cfg.job.num_cpus}: must be at least 1 (or unset for all cores)")


def _check_out(out: Path) -> None:
    """Refuse an output path that cannot become a dataset directory, before any work."""
    if out.exists() and not out.is_dir():
        raise FeaturizeError(f"--out {out}: exists and is not a directory")
    parent = next((p for p in [out, *out.parents] if p.exists()), Path("."))
    if not parent.is_dir():
        raise FeaturizeError(f"--out {out}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise FeaturizeError(f"--out {out}: {parent} is not writable")


def _read(inputs: Iterator[RawInput]) -> Iterator[RawInput]:
    from flexmol.data.sources import SourceError

    try:
        yield from inputs
    except SourceError as exc:  # unreadable, binary, truncated or corrupt gzip: it names the file
        raise FeaturizeError(str(exc)) from None


def _count_inputs(source, cfg: FeaturizeConfig) -> int:
    """The first pass over the source: how many inputs it holds (up to ``limit``)."""
    total = sum(1 for _ in _read(itertools.islice(iter(source), cfg.limit)))
    if total == 0:
        raise FeaturizeError(f"{cfg.source}: holds no molecules (no input line or record): nothing to featurise")
    return total


def _slices(inputs: Iterator[RawInput], size: int) -> Iterator[tuple[ShardSpec, list[RawInput]]]:
    for shard_id in itertools.count():
        chunk = list(itertools.islice(inputs, size))
        if not chunk:
            return
        yield ShardSpec(shard_id, chunk[0].index, len(chunk)), chunk


_PART_KEYS = {"shard", "shard_id", "first_index", "num_inputs", "samples", "bytes", "sha256", "atoms", "conformers",
              "fragments_stripped", "keys", "rejects"}


def _load_part(out: Path, spec: ShardSpec) -> Optional[dict]:
    """The summary of a finished shard, or None when the shard must be (re)made."""
    path = part_path(out, spec.shard_id)
    if not path.exists():
        return None
    try:
        part = json.loads(path.read_text())
    except (ValueError, OSError):
        return None
    if not isinstance(part, dict) or not _PART_KEYS <= part.keys():
        return None
    shard = out / spec.name
    if part.get("num_inputs") != spec.num_inputs or not shard.exists() or shard.stat().st_size != part.get("bytes"):
        return None
    return part


def run_featurize(cfg: FeaturizeConfig, log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> dict:
    """Run the job described by ``cfg``; return the manifest. Raises :class:`FeaturizeError`."""
    from flexmol.config import ConfigError
    from flexmol.data.registry import DatasetUnavailable
    from flexmol.data.sources import SourceError

    started = time.perf_counter()
    try:
        validate_featurize(cfg)
        _check_limits(cfg)
        source = open_source(cfg.source, cfg.source_options, Path(cfg.data_dir) if cfg.data_dir else None)
    except (ConfigError, SourceError, DatasetUnavailable) as exc:
        raise FeaturizeError(str(exc)) from None
    opts = cfg.source_options
    ignored = [k for k in ("smiles_column", "id_column", "label_columns", "delimiter")
               if getattr(opts, k) and k not in source.options]
    if ignored:
        takes = f"it takes {', '.join(source.options)}" if source.options else "it takes no source options"
        raise FeaturizeError(f"config key 'source_options.{ignored[0]}': {source.name} does not read it ({takes})")
    if cfg.modality != "3d" and not source.has_graph():
        raise FeaturizeError(f"{source.name} holds geometries without bonds: only --modality 3d applies")
    shard_size = cfg.job.shard_size or default_shard_size(cfg.modality)
    out = Path(cfg.out)
    plan = _plan(cfg, source.fingerprint, source.name, shard_size)
    _check_out(out)
    _check_plan(out, plan)
    total = _count_inputs(source, cfg)
    try:
        out.mkdir(parents=True, exist_ok=True)
        parts_dir(out).mkdir(exist_ok=True)
        atomic_write_text(out / PLAN, json.dumps(plan, indent=1))
        for stale in itertools.chain(out.glob(".shard-*.tar.tmp*"), parts_dir(out).glob(".*.tmp*")):
            stale.unlink()  # temporaries of a killed run: never a finished shard
    except OSError as exc:
        raise FeaturizeError(f"cannot write the dataset directory {out}: {exc.strerror or exc}") from None

    log(f"[featurize] {source.name}: {total} inputs -> {out} ({cfg.modality}, {-(-total // shard_size)} shards of {shard_size})")
    summaries = _run_tasks(cfg, out, _read(itertools.islice(iter(source), cfg.limit)), shard_size, total, log)
    seen_inputs = sum(s["num_inputs"] for s in summaries)
    if seen_inputs != total:
        raise FeaturizeError(f"the source yielded {seen_inputs} inputs on the second pass, {total} on the first: it changed during the job")
    try:
        _remove_cross_shard_duplicates(out, summaries, log)
        manifest = _finish(cfg, out, plan, summaries, total, time.perf_counter() - started)
    except OSError as exc:  # e.g. the disk filled up
        raise FeaturizeError(f"cannot finish the dataset {out}: {exc}. Finished shards are kept: rerun the same "
                             "command to resume.") from None
    # The dataset is checked as `flexmol shards inspect` will check it: a job whose output fails
    # that check has not succeeded, whatever it reconciled on the way.
    report = inspect(out, decode=False)
    if not report.ok:
        problems = "; ".join(" ".join(p.splitlines()) for p in report.problems)
        raise FeaturizeError(f"the dataset {out} fails its check: {problems}")
    c = manifest["counts"]
    log(f"[featurize] input {c['input']} = written {c['written']} + rejected {c['rejected']}: reconciled "
        f"({manifest['seconds']:.1f} s)")
    return manifest


def _run_tasks(cfg: FeaturizeConfig, out: Path, inputs: Iterator[RawInput], shard_size: int, total: int,
               log: Callable[[str], None]) -> list[dict]:
    from tqdm import tqdm

    summaries: dict[int, dict] = {}
    bar = tqdm(total=total, unit="mol", desc="featurize", disable=not cfg.job.progress, file=sys.stderr,
               mininterval=1.0, smoothing=0.05)
    executor = None
    pending: dict = {}  # handle -> [spec, inputs, skip, failures]
    crashes: Counter = Counter()
    resumed = 0

    def submit(spec: ShardSpec, chunk: list[RawInput], skip: dict, failures: int) -> None:
        handle = executor.submit(spec, chunk, cfg.featurizer, cfg.modality, str(out), skip)
        pending[handle] = [spec, chunk, skip, failures]

    def drain() -> None:
        for handle, ok, value in executor.wait(list(pending)):
            spec, chunk, skip, failures = pending.pop(handle)
            if ok:
                summaries[spec.shard_id] = _without_keys(value)
                bar.update(spec.num_inputs)
                continue
            if executor.is_worker_death(value):
                culprit = last_started(out, spec.shard_id)
                if culprit is not None:
                    crashes[culprit] += 1
                    if crashes[culprit] > cfg.job.crash_retries_per_molecule:
                        skip = {**skip, culprit: (
                            f"the featuriser process died while processing this molecule, {crashes[culprit]} time(s) "
                            f"(a crash in RDKit, or over featurizer.hard_timeout_s={cfg.featurizer.hard_timeout_s})")}
                    log(f"[featurize] {spec.name}: worker died on input {culprit}; retrying the shard")
                    submit(spec, chunk, skip, failures)
                    continue
            failures += 1
            if failures > cfg.job.task_retries:
                raise FeaturizeError(f"{spec.name} failed {failures} time(s), last: {_why(value)}. Finished shards are "
                                     "kept: rerun the same command to resume.")
            log(f"[featurize] {spec.name} failed ({_why(value)}); retry {failures}/{cfg.job.task_retries}")
            submit(spec, chunk, skip, failures)

    try:
        for spec, chunk in _slices(inputs, shard_size):
            part = _load_part(out, spec)
            if part is not None:
                summaries[spec.shard_id] = _without_keys(part)
                resumed += 1
                bar.update(spec.num_inputs)
                continue
            if executor is None:
                try:
                    executor = make_executor(cfg.job)
                except Exception as exc:  # noqa: BLE001 - Ray's start-up errors are of many types
                    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                    raise FeaturizeError(f"cannot start the {cfg.job.executor} executor: {first}") from None
            while len(pending) >= executor.max_in_flight:
                drain()
            submit(spec, chunk, {}, 0)
        while pending:
            drain()
    finally:
        bar.close()
        if executor is not None:
            executor.close()
    if resumed:
        log(f"[featurize] {resumed} finished shard(s) found and kept")
    return [summaries[k] for k in sorted(summaries)]


def _why(exc: BaseException) -> str:
    """One line on why a task failed: the exception raised inside it (Ray wraps it, with the remote
    traceback, in a RayTaskError whose ``cause`` it is)."""
    cause = getattr(exc, "cause", None)
    exc = cause if isinstance(cause, BaseException) else exc
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    return f"{type(exc).__name__}: {first[:300]}" if first else type(exc).__name__


def _without_keys(summary: dict) -> dict:
    # The InChIKeys of a shard stay in its part file and are streamed from there by the duplicate
    # pass: held in memory for every shard they would cost the driver ~0.25 kB per molecule.
    return {k: v for k, v in summary.items() if k != "keys"}


def _part_keys(out: Path, shard_id: int) -> list:
    return json.loads(part_path(out, shard_id).read_text())["keys"]


def _remove_cross_shard_duplicates(out: Path, summaries: list[dict], log: Callable[[str], None]) -> None:
    first: dict[str, tuple[int, str]] = {}
    drops: dict[int, dict[int, str]] = defaultdict(dict)  # position in summaries -> index -> reason
    for pos, s in enumerate(summaries):
        for key, index, ident in _part_keys(out, s["shard_id"]):
            if key in first:
                fi, fid = first[key]
                drops[pos][index] = f"duplicate of input {fi} ({fid}) by InChIKey {key}"
            else:
                first[key] = (index, ident)
    for pos, dropped in drops.items():
        s = summaries[pos]
        (samples, size, digest), gone = filter_shard(out / s["shard"], set(dropped))
        new_rejects = [{"index": r["index"], "id": r["id"], "smiles": r["smiles"], "code": "duplicate",
                        "reason": dropped[r["index"]]} for r in gone]
        s.update(samples=samples, bytes=size, sha256=digest,
                 atoms=s["atoms"] - sum(len(r["z"]) for r in gone),
                 conformers=s["conformers"] - sum(len(r["pos"]) for r in gone if "pos" in r),
                 fragments_stripped=s["fragments_stripped"] - sum(bool(r.get("fragments_stripped")) for r in gone),
                 rejects=sorted(s["rejects"] + new_rejects, key=lambda r: r["index"]))
        keys = [k for k in _part_keys(out, s["shard_id"]) if k[1] not in dropped]
        atomic_write_text(part_path(out, s["shard_id"]), json.dumps({**s, "keys": keys}))
        log(f"[featurize] {s['shard']}: {len(new_rejects)} duplicate(s) of molecules in earlier shards removed")


def _finish(cfg: FeaturizeConfig, out: Path, plan: dict, summaries: list[dict], total: int, seconds: float) -> dict:
    rejects = sorted((r for s in summaries for r in s["rejects"]), key=lambda r: r["index"])
    written = sum(s["samples"] for s in summaries)
    manifest = {
        "format": FORMAT,
        "schema_version": schema.SCHEMA_VERSION,
        "flexmol_version": __version__,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "modality": cfg.modality,
        "source": plan["source"],
        "limit": cfg.limit,
        "shard_size": plan["shard_size"],
        "featurizer": plan["featurizer"],
        "featurizer_hash": plan["featurizer_hash"],
        "shards": [{"name": s["shard"], "samples": s["samples"], "bytes": s["bytes"], "sha256": s["sha256"],
                    "first_index": s["first_index"], "num_inputs": s["num_inputs"]} for s in summaries],
        "totals": {
            "molecules": written,
            "by_modality": {cfg.modality: written},
            "atoms": sum(s["atoms"] for s in summaries),
            "conformers": sum(s["conformers"] for s in summaries),
            "fragments_stripped": sum(s["fragments_stripped"] for s in summaries),
        },
        "counts": {"input": total, "written": written, "rejected": len(rejects)},
        "rejects_by_reason": dict(Counter(r["code"] for r in rejects).most_common()),
        "seconds": round(seconds, 2),
    }
    if total != written + len(rejects):
        raise FeaturizeError(f"counts do not reconcile: input {total} != written {written} + rejected {len(rejects)}")
    atomic_write_text(out / REJECTS, encode_rejects(rejects))
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1))
    return manifest
