"""Running a sweep: one Ray task per run, resumable, each run trained and evaluated the same way.

Layout of a study directory ``OUT``::

    study.json            the spec and the planned runs
    models/RUNG.yaml      each rung's model config (what its runs' model.size names)
    flops/                measured FLOP models per rung and stage (JSON)
    probe/                the probe set's featurised molecules (shared by every run)
    runs/NAME/run.json    the run's definition and digest
    runs/NAME/phaseK/     a pre-training output_dir per phase (pretrain.yaml, log.txt, checkpoints,
                          export, metrics.jsonl)
    runs/NAME/result.json the run's row (written last, atomically)
    runs.csv              one row per run, rewritten as runs finish

A run is a sequence of pre-training phases, each ``python -m flexmol.train.cli`` in a child process
(``deepspeed launch/pretrain.py`` with ``run.gpus_per_run`` > 1) with ``resume=auto``: a killed
sweep resumes every unfinished run from its last checkpoint, a finished run (its ``result.json``
with the same digest) is never repeated, and a failed run is reported with its log while the others
go on. A run holds an exclusive lock on its directory, passed to its training process, so two
sweeps never write one run. Then, in the task: the study's held-out losses of the final export
(every source, every loss by name, fixed batches; ``val_loss`` is the sum the spec names), the
linear probe, and the run's FLOPs from the work its training records counted.
"""
from __future__ import annotations

import csv
import dataclasses
import fcntl
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from flexmol.scaling import ScalingError
from flexmol.scaling.spec import (Run, SourceFacts, Spec, check_probe, flop_models, load_spec, plan, rung_yaml,
                                  source_facts)

FIXED_COLUMNS = ["run", "status", "size", "params", "budget", "paired_size", "schedule", "ratio", "seed", "molecules",
                 "unique_molecules", "molecules_paired", "molecules_single_2d", "molecules_single_3d", "unique_paired",
                 "unique_single_2d", "unique_single_3d", "passes", "steps", "flops", "flops_padded", "val_loss"]


RENDEZVOUS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "MASTER_ADDR",
              "MASTER_PORT", "CROSS_RANK", "CROSS_SIZE")


class RunFailed(RuntimeError):
    """A run that did not finish: the message says where and points to the log."""


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# -- one run (inside its Ray task) --------------------------------------------------------------
def phase_config(spec: Spec, run: Run, index: int, out: Path) -> dict:
    """The pre-training config of phase ``index`` of ``run``: the spec's fixed settings, the run's
    steps, mix and nested subsets, and a schedule shaped by the phase's length."""
    phase = run.phases[index]
    rdir = out / "runs" / run.name
    t = spec.train
    cfg = {
        "stage": phase.stage,
        "model": {"size": str((out / "models" / f"{run.rung}.yaml").resolve())},
        "data": {**{s: spec.data[s] for s in phase.molecules}, "max_atoms": t.max_atoms,
                 # loader workers beside the training process, within the run's CPUs
                 "num_workers": min(2, spec.run.cpus_per_run - 1),
                 "subset": dict(phase.subset), "subset_seed": spec.subset_seed,
                 "mix": [{"step": 0, "weights": dict(phase.weights)}]},
        "train": {"max_steps": phase.steps, "lr": t.lr, "warmup_steps": int(round(t.warmup_fraction * phase.steps)),
                  "decay": t.decay, "seed": run.seed, "save_every": max(1, phase.steps // 4),
                  "log_every": max(1, phase.steps // 20)},
        "validation": {"every": 0, "holdout_shards": spec.heldout.shards,
                       "max_molecules": spec.heldout.max_molecules, "alignment_count": 0},
        "wandb": {"mode": "disabled"},
        "output_dir": str((rdir / f"phase{index + 1}").resolve()),
        "resume": "auto",
    }
    if index > 0:
        cfg["init_from"] = str((rdir / f"phase{index}" / "export").resolve())
    return cfg


def _finished(pdir: Path, steps: int) -> bool:
    """A phase whose run closed: its last training record is at ``steps`` and its export exists."""
    if not (pdir / "export" / "checksums.json").is_file():
        return False
    last = _last_record(pdir / "metrics.jsonl", "train")
    return bool(last) and last["step"] >= steps


def _last_record(path: Path, split: str) -> dict | None:
    last = None
    try:
        with open(path) as f:
            for line in f:
                rec = json.loads(line)
                if rec.get("split") == split:
                    last = rec
    except (OSError, json.JSONDecodeError):
        return None
    return last


def _train_phase(spec: Spec, run: Run, index: int, out: Path, lock_fd: int) -> None:
    from omegaconf import OmegaConf

    pdir = out / "runs" / run.name / f"phase{index + 1}"
    if _finished(pdir, run.phases[index].steps):
        return
    pdir.mkdir(parents=True, exist_ok=True)
    cfg = OmegaConf.create(phase_config(spec, run, index, out))
    for k, v in spec.train.overrides.items():
        OmegaConf.update(cfg, k, v, force_add=True)
    config_file = pdir / "pretrain.yaml"
    config_file.write_text(OmegaConf.to_yaml(cfg))
    command = train_command(spec.run.gpus_per_run, config_file)
    threads = str(spec.run.cpus_per_run)
    # A run is its own world: rendezvous variables of the sweep's process (a launcher's, or an earlier
    # in-process run's) would make runs that train side by side share one port.
    env = {**{k: v for k, v in os.environ.items() if k not in RENDEZVOUS}, "OMP_NUM_THREADS": threads,
           "MKL_NUM_THREADS": threads, "PYTHONUNBUFFERED": "1"}
    log = pdir / "log.txt"
    started = time.time()
    with open(log, "a") as f:
        f.write(f"\n== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(command)}\n")
        f.flush()
        proc = subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, env=env, pass_fds=(lock_fd,),
                                preexec_fn=_die_with_parent)
        try:
            code = proc.wait()
        except BaseException:
            proc.send_signal(signal.SIGTERM)  # the trainer checkpoints the step and exits
            proc.wait()
            raise
    if code != 0:
        raise RunFailed(f"phase {index + 1} (stage {run.phases[index].stage}) exited with {code}; log {log}:\n"
                        f"{_tail(log)}")
    if not _finished(pdir, run.phases[index].steps):
        raise RunFailed(f"phase {index + 1} exited without finishing (no export at step {run.phases[index].steps}); "
                        f"log {log}:\n{_tail(log)}")
    # the seconds of the launch that finished the phase (one a kill cut short is not counted)
    _write_atomic(pdir / "timing.json", json.dumps({"seconds": round(time.time() - started, 1)}) + "\n")


def _phase_seconds(pdir: Path) -> float | None:
    """Seconds the launch that finished the phase took, start to exit, or None if not recorded."""
    try:
        return float(json.loads((pdir / "timing.json").read_text())["seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def train_command(gpus: int, config_file: Path, env: dict | None = None) -> list[str]:
    """The command that trains one phase: this Python on ``flexmol.train.cli`` for one process; for
    several GPUs the DeepSpeed launcher of this Python's installation on the GPUs Ray gave the task
    (``CUDA_VISIBLE_DEVICES``; DeepSpeed's ``--num_gpus`` would take GPUs 0..N-1 whatever Ray
    assigned) with a free rendezvous port (runs share a node)."""
    if gpus <= 1:
        return [sys.executable, "-m", "flexmol.train.cli", "--config", str(config_file)]
    env = os.environ if env is None else env
    visible = env.get("CUDA_VISIBLE_DEVICES", "")
    if len([d for d in visible.split(",") if d.strip()]) != gpus:
        raise RunFailed(f"run.gpus_per_run={gpus} but the task was given CUDA_VISIBLE_DEVICES={visible!r}")
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    launcher = Path(__file__).resolve().parents[2] / "launch" / "pretrain.py"
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--include", f"localhost:{visible}", "--master_port",
            str(port), str(launcher), "--config", str(config_file)]


def _prctl():
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6", use_errno=True).prctl  # loaded here: not between fork and exec
    except (OSError, AttributeError):
        return None


_PRCTL = _prctl()


def _die_with_parent() -> None:
    """In the child: SIGTERM when the process that started it dies (Linux, PR_SET_PDEATHSIG), so a
    killed sweep's training processes checkpoint and stop instead of running on unattended."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGTERM)


def heldout_evaluation(spec: Spec, facts: dict[str, SourceFacts], export: Path, seed: int = 0) -> dict[str, float]:
    """Every loss by name of the export on each source's held-out molecules (the stage-1
    objective, so every run is scored by one yardstick), as ``val/SOURCE/LOSS``."""
    import torch

    from flexmol import load_pretrained
    from flexmol.data.streams import fixed_batches
    from flexmol.objectives import FlexMolObjective
    from flexmol.scaling.spec import objective as study_objective
    from flexmol.train.validation import heldout_losses

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_pretrained(export).to(device).eval()
    objective = FlexMolObjective(study_objective(spec), stage=1).heldout()
    out = {}
    for source, f in facts.items():
        batches = fixed_batches(f.heldout_urls, max_atoms=spec.train.max_atoms, max_molecules=spec.heldout.max_molecules,
                                max_spd=model.cfg.max_spd, max_path=model.cfg.max_path)
        sums, counts = heldout_losses(model, batches, objective, seed=seed, device=device)
        for k, v in sorted(sums.items()):
            out[f"val/{source}/{k}"] = float(v) / float(counts[k])
    return out


def probe_data(spec: Spec, out: Path, progress: bool = False):
    """The probe set, featurised once per study (``OUT/probe``)."""
    from flexmol.finetune.data import load_task_data

    p = spec.probe
    data = load_task_data(p.data, p.targets, p.task, modality="2d", subsample=p.subsample, workers=1,
                          cache_dir=out / "probe", progress=progress)
    if len(data.records) < 20:
        raise ScalingError(f"{spec.path}: key 'probe.data': {p.data} gives {len(data.records)} usable molecules "
                           f"({data.summary()}); a probe needs at least 20")
    return data


def probe_score(spec: Spec, out: Path, export: Path) -> dict:
    """The linear probe on the export's frozen 2D embeddings: mean test metric over the seeds'
    splits (``probe.split``), with each seed's figure."""
    import numpy as np
    import torch

    from flexmol import load_pretrained
    from flexmol.finetune.config import ProbeSection
    from flexmol.finetune.probe import embeddings, linear_probe
    from flexmol.finetune.split import make_split

    p = spec.probe
    data = probe_data(spec, out)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    x = embeddings(load_pretrained(export).to(device), data, "2d", 128, device)
    scores = []
    for seed in p.seeds:
        split = make_split(p.split, data.smiles, seed)
        scores.append(linear_probe(x, data.labels, split, seed, p.task, p.metric, ProbeSection(), data.targets)["test"])
    return {"mean": float(np.nanmean(scores)), "by_seed": [float(s) for s in scores]}


def probe_column(spec: Spec) -> str | None:
    """``probe_SET_METRIC``: SET the named set (b3db, bbbp for moleculenet:bbbp) or the file's stem."""
    data = spec.probe.data
    if not data:
        return None
    named = data in ("b3db", "qm9") or data.startswith("moleculenet:")
    name = data.replace("moleculenet:", "") if named else Path(data).name.split(".")[0]
    return f"probe_{name}_{spec.probe.metric}"


def run_one(spec: Spec, facts: dict[str, SourceFacts], flops: dict, run: Run, out: Path) -> dict:
    """Train, evaluate and account one run; its row (``status`` done or failed, never raises for
    the run's own failure). ``flops``: the FLOP model of each (rung, stage)."""
    rdir = out / "runs" / run.name
    started = time.perf_counter()
    row = {"run": run.name, "status": "failed", "size": run.rung, "params": run.params, "budget": run.budget,
           "paired_size": spec.paired_size if run.schedule else None, "schedule": run.schedule, "ratio": run.ratio,
           "seed": run.seed}
    rdir.mkdir(parents=True, exist_ok=True)
    if not (rdir / "run.json").exists():  # written when the run starts: a sweep refused before leaves none
        _write_atomic(rdir / "run.json", json.dumps({"digest": run.digest(spec), "definition": run.definition(spec)},
                                                    indent=1) + "\n")
    lock = os.open(rdir / "lock", os.O_RDWR | os.O_CREAT)
    try:
        os.set_inheritable(lock, True)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # another sweep's process (or a training process still closing) holds it
            print(f"[scaling] {run.name}: waiting for the process that holds {rdir / 'lock'}", flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            for i in range(len(run.phases)):
                _train_phase(spec, run, i, out, lock)
            seen, unique, work_flops = {}, {}, {"flops": 0.0, "flops_padded": 0.0}
            steps = 0
            for i, phase in enumerate(run.phases):
                last = _last_record(rdir / f"phase{i + 1}" / "metrics.jsonl", "train")
                steps += last["step"]
                for k, v in last["seen"].items():
                    seen[k] = seen.get(k, 0) + v
                for k, v in (last.get("unique") or {}).items():
                    unique[k] = max(unique.get(k, 0), v)
                work = {k: {"molecules": last["seen"][k], **w} for k, w in last["work"].items()}
                for k, v in flops[(run.rung, phase.stage)].total(work).items():
                    work_flops[k] += v
            seconds = [_phase_seconds(rdir / f"phase{i + 1}") for i in range(len(run.phases))]
            row["train_seconds"] = None if None in seconds else round(sum(seconds), 1)
            export = rdir / f"phase{len(run.phases)}" / "export"
            losses = heldout_evaluation(spec, facts, export)
            row.update({"molecules": sum(seen.values()), "unique_molecules": sum(unique.values()),
                        **{f"molecules_{k}": seen.get(k, 0) for k in spec.data},
                        **{f"unique_{k}": unique.get(k, 0) for k in spec.data},
                        "passes": sum(seen.values()) / max(1, sum(unique.values())), "steps": steps, **work_flops,
                        "val_loss": sum(losses[f"val/{item}"] for item in spec.heldout.loss), **losses})
            column = probe_column(spec)
            if column:
                probe = probe_score(spec, out, export)
                row[column] = probe["mean"]
                row["probe_by_seed"] = probe["by_seed"]
            row["status"] = "done"
        except (RunFailed, ScalingError) as exc:
            row["error"] = str(exc)
        except Exception as exc:  # noqa: BLE001 - one run's failure is reported, the sweep goes on
            import traceback

            row["error"] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=4)}"
    finally:
        os.close(lock)
    row["wall_seconds"] = round(time.perf_counter() - started, 1)
    row["digest"], row["evaluation_digest"] = run.digest(spec), run.evaluation_digest(spec)
    _write_atomic(rdir / "result.json", json.dumps(row, indent=1) + "\n")
    return row


# -- the sweep ----------------------------------------------------------------------------------
def check_run_dirs(spec: Spec, runs: list[Run], out: Path) -> None:
    """Refuse, before anything is written, a study directory whose run directories were made by
    another definition of their run (or hold an unreadable ``run.json``)."""
    for run in runs:
        known = out / "runs" / run.name / "run.json"
        if not known.exists():
            continue
        try:
            before = json.loads(known.read_text())
            same = before["digest"] == run.digest(spec)
            changed = [] if same else sorted(k for k in run.definition(spec)
                                             if before["definition"].get(k) != run.definition(spec)[k])
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ScalingError(f"{known}: not a run definition this sweep can read ({type(exc).__name__}: {exc}); "
                               "remove that run directory to run it again") from None
        if not same:
            raise ScalingError(f"{known.parent}: made by another definition of run {run.name} (changed: "
                               f"{', '.join(changed) or 'the code that defines it'}); use another --out or remove "
                               "that directory")


def prepare(spec: Spec, runs: list[Run], selected: list[Run], out: Path, facts: dict[str, SourceFacts]
            ) -> tuple[list[Run], dict]:
    """The study directory: spec and plan (``runs``: all of them), model configs, FLOP models, the
    probe cache, run directories. Returns the ``selected`` runs still to do and the FLOP models. A
    finished run (its result with the same training digest) is not trained again; when only the
    evaluation changed (held-out losses, val_loss, probe) its export is evaluated again."""
    check_run_dirs(spec, runs, out)
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(out / "study.json", json.dumps({"spec": dataclasses.asdict(spec),
                                                  "runs": [dataclasses.asdict(r) for r in runs]}, indent=1) + "\n")
    (out / "models").mkdir(exist_ok=True)
    for rung in spec.models.rungs:
        _write_atomic(out / "models" / f"{rung}.yaml", rung_yaml(spec, rung))
    todo = []
    for run in selected:
        result = _read_result(out / "runs" / run.name)
        if not (result and result.get("status") == "done" and result.get("digest") == run.digest(spec)
                and result.get("evaluation_digest") == run.evaluation_digest(spec)):
            todo.append(run)
    (out / "flops").mkdir(exist_ok=True)
    models = flop_models(spec, todo, out / "flops", log=lambda m: print(f"[scaling] {m}", flush=True))
    if todo and probe_column(spec):
        print(f"[scaling] probe set {spec.probe.data}: {probe_data(spec, out, progress=True).summary()}", flush=True)
    return todo, models


def _current(runs: list[Run], spec: Spec, row: dict) -> str | None:
    return next((r.digest(spec) for r in runs if r.name == row.get("run")), None)


def _read_result(rdir: Path) -> dict | None:
    try:
        return json.loads((rdir / "result.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def write_table(out: Path, spec: Spec, runs: list[Run]) -> Path:
    """``OUT/runs.csv``: one row per run of the plan with a result of its current definition, in
    plan order."""
    rows = [r for r in (_read_result(out / "runs" / run.name) for run in runs)
            if r and r.get("digest") in (None, _current(runs, spec, r))]
    yardstick = Run.evaluation_digest(spec)
    for r in rows:  # evaluated under another spec's held-out losses or probe: not comparable until rerun
        if r.get("status") == "done" and r.get("evaluation_digest") not in (None, yardstick):
            r.update(status="stale", error="evaluated under another heldout/probe definition: run the sweep to "
                                           "evaluate it again (its training is kept)")
    extra = sorted({k for r in rows for k in r if k.startswith("val/")})
    probes = sorted({k for r in rows for k in r if k.startswith("probe_") and k != "probe_by_seed"})
    columns = FIXED_COLUMNS + extra + probes + ["train_seconds", "wall_seconds", "error"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if r.get(k) is None else (r[k].splitlines()[0] if k == "error" else r[k]))
                         for k in columns})
    _write_atomic(out / "runs.csv", buf.getvalue())
    return out / "runs.csv"


def _connect_ray(spec: Spec, parallel: int):
    from flexmol.featurize.executors import init_ray

    import ray

    owns = init_ray(parallel * spec.run.cpus_per_run, {"OMP_NUM_THREADS": str(spec.run.cpus_per_run)})
    return ray, owns


def _check_resources(ray, spec: Spec) -> None:
    """A run asking for more GPUs (or CPUs) than the Ray cluster has would wait forever: refused
    on a local Ray; on a cluster (whose autoscaler may add nodes) said once."""
    have = ray.cluster_resources()
    short = [f"{need} {what} per run (run.{key}) but the Ray cluster has {have.get(what, 0):g}"
             for what, key, need in (("GPU", "gpus_per_run", spec.run.gpus_per_run),
                                     ("CPU", "cpus_per_run", spec.run.cpus_per_run)) if need > have.get(what, 0)]
    if short and not os.environ.get("RAY_ADDRESS"):
        raise ScalingError("; ".join(short))
    for line in short:
        print(f"[scaling] warning: {line}; runs wait until the cluster has them", file=sys.stderr, flush=True)


def run_sweep(spec_path: str, out: str, parallel: int | None = None, only: list[str] | None = None) -> int:
    """Every run of the spec not finished before, ``parallel`` at a time (a local Ray; a cluster
    through RAY_ADDRESS schedules by each run's CPUs and GPUs). 0 when every run is done, 1 when
    some failed (each reported with its log)."""
    spec = load_spec(spec_path)
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise ScalingError(f"--out {out_dir}: exists and is not a directory")
    if os.environ.get("RAY_ADDRESS") and not out_dir.is_absolute():
        raise ScalingError(f"--out {out_dir}: give an absolute path on shared storage when RAY_ADDRESS names a "
                           "cluster (the runs write there from other machines)")
    parallel = parallel if parallel is not None else spec.run.parallel
    if parallel < 1:
        raise ScalingError(f"--parallel must be at least 1, got {parallel}")
    check_probe(spec)
    facts = source_facts(spec)
    runs = plan(spec, facts)
    if only:
        names = {r.name for r in runs}
        unknown = [n for n in only if n not in names]
        if unknown:
            raise ScalingError(f"--only: {', '.join(unknown)} not in the plan (flexmol scaling plan {spec_path} "
                               "lists the runs)")
    selected = [r for r in runs if r.name in only] if only else runs
    todo, flops = prepare(spec, runs, selected, out_dir, facts)
    print(f"[scaling] {spec.name}: {len(selected)} run(s); {len(selected) - len(todo)} done before, {len(todo)} to run, "
          f"{parallel} at a time", flush=True)
    failed = []
    if todo:
        ray, owns = _connect_ray(spec, parallel)
        try:
            _check_resources(ray, spec)
            task = ray.remote(num_cpus=spec.run.cpus_per_run, num_gpus=spec.run.gpus_per_run,
                              max_retries=0)(run_one)
            refs = [ray.put(x) for x in (spec, facts, flops)]
            pending = {task.remote(*refs, run, out_dir.resolve()): (run, 0) for run in todo}
            started, finished = time.perf_counter(), 0
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                run, attempt = pending.pop(ready[0])
                try:
                    row = ray.get(ready[0])
                except ray.exceptions.RayError as exc:  # its worker or node died
                    row = {"run": run.name, "status": "failed", "error": f"the run's Ray task died: {exc}".splitlines()[0]}
                    _write_atomic(out_dir / "runs" / run.name / "result.json", json.dumps(row, indent=1) + "\n")
                if row["status"] != "done" and attempt < spec.run.max_retries:
                    print(f"[scaling] {run.name} failed; retrying ({attempt + 1} of {spec.run.max_retries})", flush=True)
                    pending[task.remote(*refs, run, out_dir.resolve())] = (run, attempt + 1)
                    continue
                finished += 1
                elapsed = time.perf_counter() - started
                eta = elapsed / finished * (len(todo) - finished)
                if row["status"] == "done":
                    print(f"[scaling] {finished}/{len(todo)} {run.name}: val_loss {row['val_loss']:.4f}, "
                          f"{row['molecules']:,} molecules, {row['flops']:.3g} FLOPs, {row['wall_seconds']:.0f} s "
                          f"(elapsed {elapsed:.0f} s, about {eta:.0f} s to go)", flush=True)
                else:
                    failed.append(run.name)
                    print(f"[scaling] {finished}/{len(todo)} {run.name} FAILED: {row.get('error', '?')}", file=sys.stderr,
                          flush=True)
                write_table(out_dir, spec, runs)
        finally:
            if owns:
                ray.shutdown()
    table = write_table(out_dir, spec, runs)
    print(f"[scaling] {table}: {len(selected) - len(failed)} of {len(selected)} run(s) done"
          + (f"; failed: {', '.join(failed)} (rerun the same command to retry them)" if failed else ""), flush=True)
    return 1 if failed else 0
