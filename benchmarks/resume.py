"""Time from start to the first training step after resuming, at an early and at a late step.

    python benchmarks/resume.py DATASET_DIR [--steps 50 20000] [--workers 2] [--max-atoms 256] [--out DIR]

DATASET_DIR: a 2D dataset (e.g. MOSES). For each step S of ``--steps`` a fresh process runs the
real pre-training entry point (``flexmol.train.cli.main``: tiny model, one single_2d source,
batches of ``--max-atoms`` padded atoms, ``--workers`` loader workers, checksums and validation
off) resuming from a checkpoint at step S, and stops after one step. Printed per S: seconds from
the process's start to the end of its first training step, and of those the seconds from the
training loop's start to its first batch (loader workers started, streams at their positions).

A genuine checkpoint at step 20,000 would take hours of CPU training. The checkpoint of the first
step in ``--steps`` is genuine (written by the same command, training that many steps); for a
later step S it is a copy of it whose client state holds step S and the streams' state at S,
obtained by running the real streams S batches with the run's settings and no model (one source:
stream batch = step). With an older flexmol on PYTHONPATH (its checkpoints count the batches
taken, and its streams replay them), that state is the count alone::

    git archive 4bd41fe flexmol | tar -x -C /tmp/flexmol-4bd41fe
    PYTHONPATH=/tmp/flexmol-4bd41fe python benchmarks/resume.py DATASET_DIR
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STARTED = time.perf_counter()
MARK = "resume-benchmark: "


def overrides(dataset: str, out: Path, args) -> list[str]:
    return ["data.paired=[]", f"data.single_2d=[{dataset}]", "data.mix=[{step: 0, weights: {single_2d: 1.0}}]",
            "model.size=tiny", f"data.max_atoms={args.max_atoms}", f"data.num_workers={args.workers}",
            "data.verify_checksums=false", "validation.holdout_shards=0", "validation.every=0",
            "validation.alignment_count=0", "wandb.mode=disabled", f"train.max_steps={max(args.steps) + 10}",
            "train.warmup_steps=1", "train.save_every=100000000", "train.log_every=1", f"output_dir={out}"]


def measure(argv: list[str]) -> None:
    """Child process: one resumed run of one step, timed; prints a JSON line."""
    from flexmol.data import streams
    from flexmol.train import trainer
    from flexmol.train.cli import main

    marks = {}
    run, draw, log = trainer.Pretrainer.run, streams.SourceStream.__next__, trainer.Pretrainer._log

    def mark(name):
        marks.setdefault(name, time.perf_counter() - STARTED)

    def timed_run(self, *a, **kw):
        mark("loop")
        return run(self, *a, **kw)

    def timed_draw(self):
        batch = draw(self)
        mark("batch")
        return batch

    def timed_log(self, record):
        if record.get("split") == "train":
            mark("step")
            marks.setdefault("first_step", record.get("step"))
        return log(self, record)

    trainer.Pretrainer.run, streams.SourceStream.__next__, trainer.Pretrainer._log = timed_run, timed_draw, timed_log
    rc = main(["--config", "stage1", *argv])
    print(MARK + json.dumps({"rc": rc, **marks}), flush=True)
    sys.exit(rc)


def checkpoint_file(out: Path) -> Path:
    tag = (out / "checkpoints" / "latest").read_text().strip()
    return out / "checkpoints" / tag / "mp_rank_00_model_states.pt"


def move_to_step(out: Path, step: int, dataset: str, args) -> float:
    """The checkpoint in ``out`` made to stand at ``step`` (module docstring); returns the seconds
    the streams took to get there."""
    import torch

    from flexmol.data.streams import SourceStream, dataset_urls
    from flexmol.train.trainer import _checkpoint_globals

    file = checkpoint_file(out)
    with torch.serialization.safe_globals(_checkpoint_globals()):
        saved = torch.load(file, map_location="cpu", weights_only=True)
    started = time.perf_counter()
    saved["step"] = step
    if hasattr(SourceStream, "load_state_dict"):  # streams whose position is their state
        stream = SourceStream("single_2d", dataset_urls([dataset]), max_atoms=args.max_atoms, seed=0,
                              shuffle_buffer=1000, num_workers=args.workers)
        molecules = sum(int(next(stream)["mask"].shape[0]) for _ in range(step))
        stream.coverage.merge()
        saved["stream"].update(step=step, ranks=[{"single_2d": stream.state_dict()}])
        saved["coverage"] = {"single_2d": stream.coverage.state_dict()}
        saved["seen"] = {"single_2d": molecules}
    else:  # an older revision: batches taken, replayed on resume
        saved["stream"] = {"step": step, "taken": {"single_2d": step}}
    took = time.perf_counter() - started
    torch.save(saved, file)
    return took


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", nargs="?", help="a 2D dataset directory")
    p.add_argument("--steps", type=int, nargs="+", default=[50, 20000])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--max-atoms", type=int, default=256)
    p.add_argument("--out", help="working directory (default: a temporary one, removed after)")
    p.add_argument("--measure", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure is not None:
        return measure(args.measure)
    if not args.dataset:
        p.error("DATASET_DIR is required")
    args.steps = sorted(args.steps)
    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="flexmol-resume-"))
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    me = [sys.executable, str(Path(__file__).resolve()), "--measure"]
    try:
        base = work / f"step-{args.steps[0]}"
        started = time.perf_counter()
        proc = subprocess.run(me + overrides(args.dataset, base, args) + [f"train.stop_after={args.steps[0]}"],
                              env=env, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"the run to step {args.steps[0]} failed:\n{proc.stderr[-3000:]}")
        print(f"trained to step {args.steps[0]} in {time.perf_counter() - started:.1f} s (genuine checkpoint)")
        rows = []
        for step in args.steps:
            out = work / f"step-{step}"
            if step != args.steps[0]:
                shutil.copytree(base, out)
                took = move_to_step(out, step, args.dataset, args)
                print(f"stream state of step {step}: {took:.1f} s of streams (no model)")
            resume = ["resume=auto", f"train.stop_after={step + 1}"]
            proc = subprocess.run(me + overrides(args.dataset, out, args) + resume, env=env, capture_output=True,
                                  text=True)
            marks = next((json.loads(line[len(MARK):]) for line in proc.stdout.splitlines()
                          if line.startswith(MARK)), {})
            if proc.returncode or marks.get("rc") != 0 or "step" not in marks:
                sys.exit(f"the run resumed at step {step} failed:\n{proc.stderr[-3000:]}")
            if marks.get("first_step") != step + 1:  # a run that found no checkpoint starts at step 1
                sys.exit(f"the run at step {step} did not resume: its first step was {marks.get('first_step')}")
            rows.append((step, marks["step"], marks["batch"] - marks["loop"]))
        print(f"\n{'resumed at step':>16} {'start to first step (s)':>24} {'loop start to first batch (s)':>30}")
        for step, total, batch in rows:
            print(f"{step:>16} {total:>24.2f} {batch:>30.2f}")
        print(f"({args.workers} loader workers, data.max_atoms={args.max_atoms}, {args.dataset})")
    finally:
        if not args.out:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
