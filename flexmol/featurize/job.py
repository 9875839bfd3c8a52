"""The featurisation job: a source -> a dataset directory of shards, resumable, every input accounted for.

The driver reads the source once (no chemistry), cuts it into fixed slices of ``shard_size``
inputs and runs one task per slice (:func:`flexmol.featurize.task.featurize_shard`) on Ray or
in-process, a bounded number at a time. A slice's output name depends only on its position, every
file is written under a temporary name and renamed, and a shard's part file (``parts/``) is
written last: a rerun skips finished shards, so a killed job resumes.

Nothing the driver holds grows with the dataset but a summary of ~1 kB per shard; rejects and
InChIKeys stay in the shards' part and key files. Duplicates within a shard are rejected by its
task. Duplicates across shards (by InChIKey; the first occurrence in input order stays) are found
by tasks that each read one range of hash buckets from every shard's key file, so each holds only
its share of the keys, and removed by one task per affected shard. ``rejects.jsonl`` is then
assembled shard by shard from the part files and ``manifest.json`` written, the counts reconciled
(input = written + rejected) and the directory checked as ``flexmol shards inspect --no-decode``
checks it: a dataset that fails that check is a failed job, never a success.

What cannot become a dataset is refused before any work, in one line naming the key or the file: a
source with no inputs, an output path that is a file or not writable, a config value RDKit or Ray
cannot take, a source option the source's reader does not read. A source that fails part-way (a
truncated .gz) ends the job with its one-line error once it is read that far, and the directory
the run made is removed.
"""
from __future__ import annotations

import itertools
import json
import os
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

from flexmol import __version__
from flexmol.chem import RawInput
from flexmol.config import FeaturizeConfig, to_dict, validate_featurize
from flexmol.data import schema
from flexmol.data.shards import (FORMAT, MANIFEST, REJECTS, atomic_write_text, atomic_writer, encode_rejects, inspect,
                                 shard_name)
from flexmol.data.sources import open_source
from flexmol.featurize.executors import make_executor
from flexmol.featurize.task import (KEY_BUCKETS, SUMMARY_KEYS, ShardSpec, dups_dir, keys_path, last_started, part_path,
                                   part_summary, parts_dir)

PLAN = "plan.json"
DEDUPLICATED = "deduplicated"  # in parts/: written once every duplicate is removed, gone when a shard is (re)made


class FeaturizeError(RuntimeError):
    """The job cannot start or cannot finish; the message says why and what to do."""


class _SourceUnreadable(FeaturizeError):
    """The source fails part-way through (a truncated or corrupt .gz, an I/O error)."""


def default_shard_size(modality: str) -> int:
    # 2D records are a few kB and featurise at ~1k/s per core; 3D ones take ~30 ms each. Both
    # sizes give shards of tens of MB and tasks of tens of seconds.
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


def _check_out(out: Path, cfg: FeaturizeConfig) -> None:
    """Refuse an output path that cannot become a dataset directory, before any work."""
    if cfg.job.executor == "ray" and os.environ.get("RAY_ADDRESS") and not out.is_absolute():
        # under `ray job submit` the driver runs in a temporary copy of the working directory
        raise FeaturizeError(f"--out {out}: on a Ray cluster (RAY_ADDRESS is set) --out must be an absolute path "
                             "on storage every node sees")
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
        raise _SourceUnreadable(str(exc)) from None


def _slices(inputs: Iterator[RawInput], size: int) -> Iterator[tuple[ShardSpec, list[RawInput]]]:
    for shard_id in itertools.count():
        chunk = list(itertools.islice(inputs, size))
        if not chunk:
            return
        yield ShardSpec(shard_id, chunk[0].index, len(chunk)), chunk


_PART_KEYS = {*SUMMARY_KEYS, "keys_bytes", "rejects"}


def _load_part(out: Path, spec: ShardSpec) -> Optional[dict]:
    """The summary of a finished shard, or None when the shard must be (re)made."""
    try:
        part = json.loads(part_path(out, spec.shard_id).read_text())
    except (ValueError, OSError):  # absent, or damaged
        return None
    if (not isinstance(part, dict) or not _PART_KEYS <= part.keys() or part["num_inputs"] != spec.num_inputs
            or not isinstance(part["rejects"], list)):
        return None
    for path, size in ((out / spec.name, part["bytes"]), (keys_path(out, spec.shard_id), part["keys_bytes"])):
        if not path.is_file() or path.stat().st_size != size:
            return None
    return part_summary(part)


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
    _check_out(out, cfg)
    _check_plan(out, plan)
    inputs = _read(itertools.islice(iter(source), cfg.limit))
    first = next(inputs, None)  # an empty source is refused before the directory is made
    if first is None:
        raise FeaturizeError(f"{cfg.source}: holds no molecules (no input line or record): nothing to featurise")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        parts_dir(out).mkdir(exist_ok=True)
        dups_dir(out).mkdir(exist_ok=True)
        atomic_write_text(out / PLAN, json.dumps(plan, indent=1))
        for stale in itertools.chain(out.glob(".shard-*.tar.tmp*"), parts_dir(out).glob(".*.tmp*"),
                                     dups_dir(out).glob(".*.tmp*")):
            stale.unlink()  # temporaries of a killed run: never a finished file
    except OSError as exc:
        raise FeaturizeError(f"cannot write the dataset directory {out}: {exc.strerror or exc}") from None

    log(f"[featurize] {source.name} -> {out} ({cfg.modality}, shards of {shard_size} inputs)")
    try:
        with _Runner(cfg, out, log) as runner:
            shards = _featurize(runner, itertools.chain([first], inputs), shard_size)
            _deduplicate(runner, shards)
        manifest = _finish(cfg, out, plan, shards, time.perf_counter() - started)
    except _SourceUnreadable:
        # The source is read once, so a truncated one is found out part-way. No run can finish
        # with it, and the directory holds nothing else: one made by this run goes (its tasks
        # were stopped when the executor closed).
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
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


@dataclass
class _Job:
    """One task to run: ``task`` names a function of :mod:`flexmol.featurize.task`; ``what`` names
    the work in messages. A shard task has its ``spec`` (the slice: a worker that dies on it is
    blamed on the molecule it was at) and ``skip``, the molecules to reject unseen, which is among
    its ``args`` and grows when a molecule kills its worker too often."""

    what: str
    task: str
    args: tuple
    spec: Optional[ShardSpec] = None
    skip: Optional[dict] = None
    failures: int = 0
    node_losses: int = 0


class _Runner:
    """Runs the job's tasks on its executor, started at the first task, with at most
    ``max_in_flight`` of them submitted at a time. A shard task whose worker died is run again, and
    a molecule that killed its worker more than ``job.crash_retries_per_molecule`` times is
    rejected; any other failure is retried ``job.task_retries`` times, then ends the job."""

    def __init__(self, cfg: FeaturizeConfig, out: Path, log: Callable[[str], None]):
        self.cfg, self.out, self.log = cfg, out, log
        self.executor = None
        self.crashes: Counter = Counter()

    def __enter__(self) -> "_Runner":
        return self

    def __exit__(self, *exc) -> None:
        if self.executor is not None:
            self.executor.close()

    def start(self):
        if self.executor is None:
            try:
                self.executor = make_executor(self.cfg.job)
            except Exception as exc:  # noqa: BLE001 - Ray's start-up errors are of many types
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise FeaturizeError(f"cannot start the {self.cfg.job.executor} executor: {first}") from None
        return self.executor

    def shard_job(self, spec: ShardSpec, chunk: list[RawInput]) -> _Job:
        executor, skip = self.start(), {}
        args = (spec, executor.put(chunk), self.cfg.featurizer, self.cfg.modality, str(self.out), skip, executor.isolated)
        return _Job(spec.name, "featurize_shard", args, spec, skip)

    def run(self, jobs: Iterable[_Job], done: Callable[[_Job, object], None]) -> None:
        """Run ``jobs`` (taken one by one, as room frees up); call ``done`` with each result."""
        pending: dict = {}
        for job in jobs:
            executor = self.start()
            while len(pending) >= executor.max_in_flight:
                self._drain(pending, done)
            pending[executor.submit(job.task, *job.args)] = job
        while pending:
            self._drain(pending, done)

    def _drain(self, pending: dict, done: Callable[[_Job, object], None]) -> None:
        for handle, ok, value in self.executor.wait(list(pending)):
            job = pending.pop(handle)
            if ok:
                done(job, value)
                continue
            if self.executor.is_node_loss(value):  # the machine went away, not the molecule's fault
                job.node_losses += 1
                if job.node_losses > self.cfg.job.node_loss_retries:
                    raise FeaturizeError(f"{job.what} lost its node {job.node_losses} time(s) (job.node_loss_retries="
                                         f"{self.cfg.job.node_loss_retries}). Finished shards are kept: rerun the "
                                         "same command to resume.")
                self.log(f"[featurize] {job.what}: its node was lost ({type(value).__name__}); retry "
                         f"{job.node_losses}/{self.cfg.job.node_loss_retries}")
                pending[self.executor.submit(job.task, *job.args)] = job
                continue
            culprit = None
            if job.spec is not None and self.executor.is_worker_death(value):
                culprit = last_started(self.out, job.spec.shard_id)
            if culprit is not None:
                self.crashes[culprit] += 1
                if self.crashes[culprit] > self.cfg.job.crash_retries_per_molecule:
                    job.skip[culprit] = (
                        f"the featuriser process died while processing this molecule, {self.crashes[culprit]} time(s) "
                        f"(a crash in RDKit, or over featurizer.hard_timeout_s={self.cfg.featurizer.hard_timeout_s})")
                self.log(f"[featurize] {job.what}: worker died on input {culprit}; retrying the shard")
            else:
                job.failures += 1
                if job.failures > self.cfg.job.task_retries:
                    raise FeaturizeError(f"{job.what} failed {job.failures} time(s), last: {_why(value)}. Finished "
                                         "shards are kept: rerun the same command to resume.")
                self.log(f"[featurize] {job.what} failed ({_why(value)}); retry {job.failures}/{self.cfg.job.task_retries}")
            pending[self.executor.submit(job.task, *job.args)] = job


def _featurize(runner: _Runner, inputs: Iterator[RawInput], shard_size: int) -> list[dict]:
    """Every slice of ``inputs`` made into a shard, or found finished; their summaries in order."""
    from tqdm import tqdm

    cfg, out = runner.cfg, runner.out
    shards: dict[int, dict] = {}
    resumed = 0
    bar = tqdm(unit="mol", desc="featurize", disable=not cfg.job.progress, file=sys.stderr, mininterval=1.0,
               smoothing=0.05)

    def jobs() -> Iterator[_Job]:
        nonlocal resumed
        for spec, chunk in _slices(inputs, shard_size):
            summary = _load_part(out, spec)
            if summary is None:
                # A shard made (again) means its duplicates have to be looked for (again).
                (parts_dir(out) / DEDUPLICATED).unlink(missing_ok=True)
                yield runner.shard_job(spec, chunk)
            else:
                finished(None, summary)
                resumed += 1

    def finished(job: Optional[_Job], summary: dict) -> None:
        shards[summary["shard_id"]] = summary
        bar.update(summary["num_inputs"])
        bar.set_postfix_str(f"{len(shards)} shards", refresh=False)

    try:
        runner.run(jobs(), finished)
    finally:
        bar.close()
    if resumed:
        runner.log(f"[featurize] {resumed} finished shard(s) found and kept")
    return [shards[k] for k in sorted(shards)]


def _deduplicate(runner: _Runner, shards: list[dict]) -> None:
    """Remove the records whose InChIKey an earlier shard holds (within a shard, its own task did).

    P tasks each read one range of the KEY_BUCKETS hash buckets from every shard's key file and
    write what they find per shard; then one task per affected shard rewrites it. ``shards`` are
    updated in place.
    """
    out = runner.out
    if len(shards) < 2 or (parts_dir(out) / DEDUPLICATED).exists():
        return
    records = sum(s["samples"] for s in shards)
    tasks = min(KEY_BUCKETS, max(runner.start().cpus, -(-records // runner.cfg.job.dedup_keys_per_task)))
    bounds = [KEY_BUCKETS * i // tasks for i in range(tasks + 1)]
    for stale in dups_dir(out).iterdir():  # found by an earlier run, maybe with other ranges
        stale.unlink()
    found: Counter = Counter()  # shard id -> duplicates in it
    runner.run((_Job(f"the duplicate search of key buckets {lo}-{hi - 1}", "find_duplicates", (str(out), len(shards), lo, hi))
                for lo, hi in zip(bounds, bounds[1:])),
               lambda job, counts: found.update(counts))

    def rewritten(job: _Job, summary: dict) -> None:
        shards[summary["shard_id"]] = summary

    runner.run((_Job(f"removing the duplicates from {shard_name(i)}", "remove_duplicates", (str(out), i))
                for i in sorted(found)), rewritten)
    (parts_dir(out) / DEDUPLICATED).touch()
    runner.log(f"[featurize] {records} records of {len(shards)} shards searched for duplicates in {tasks} task(s): "
               f"{sum(found.values())} duplicate(s) of molecules in earlier shards removed from {len(found)} shard(s)")


def _why(exc: BaseException) -> str:
    """One line on why a task failed: the exception raised inside it (Ray wraps it, with the remote
    traceback, in a RayTaskError whose ``cause`` it is)."""
    cause = getattr(exc, "cause", None)
    exc = cause if isinstance(cause, BaseException) else exc
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    return f"{type(exc).__name__}: {first[:300]}" if first else type(exc).__name__


def _part_rejects(out: Path, shard_id: int) -> list[dict]:
    path = part_path(out, shard_id)
    try:
        rejects = json.loads(path.read_text())["rejects"]
        if all(isinstance(r, dict) and isinstance(r.get("code"), str) for r in rejects):
            return rejects
    except (ValueError, KeyError, TypeError):  # changed since it was written: not JSON, or not a part
        pass
    raise FeaturizeError(f"{path} is damaged (changed while the job ran?). Rerun the same command: its shard is "
                         "made again.")


def _finish(cfg: FeaturizeConfig, out: Path, plan: dict, shards: list[dict], seconds: float) -> dict:
    """Write ``rejects.jsonl`` (shard by shard from the part files, in input order) and
    ``manifest.json``; return the manifest."""
    reasons: Counter = Counter()  # in order of first occurrence, as most_common() breaks ties
    with atomic_writer(out / REJECTS) as f:
        for s in shards:
            rejects = _part_rejects(out, s["shard_id"])
            reasons.update(r["code"] for r in rejects)
            f.write(encode_rejects(rejects))
    total = sum(s["num_inputs"] for s in shards)
    written = sum(s["samples"] for s in shards)
    rejected = sum(reasons.values())
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
                    "first_index": s["first_index"], "num_inputs": s["num_inputs"]} for s in shards],
        "totals": {
            "molecules": written,
            "by_modality": {cfg.modality: written},
            "atoms": sum(s["atoms"] for s in shards),
            "conformers": sum(s["conformers"] for s in shards),
            "fragments_stripped": sum(s["fragments_stripped"] for s in shards),
        },
        "counts": {"input": total, "written": written, "rejected": rejected},
        "rejects_by_reason": dict(reasons.most_common()),
        "seconds": round(seconds, 2),
    }
    if total != written + rejected:
        raise FeaturizeError(f"counts do not reconcile: input {total} != written {written} + rejected {rejected}")
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1))
    return manifest
