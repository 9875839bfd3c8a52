"""Molecules/s and atoms/s of the training stream (``flexmol.data.streams.SourceStream``: shard
visits, record checks, seeded blocks, decoding, atom-budget batches, collation with the 2D pair
inputs, all in the loader workers), steady state, as pre-training consumes it: what ``flexmol shards
bench`` prints, for several datasets and worker counts side by side. The runs alternate (each
dataset and worker count once per round, ``--rounds`` rounds), so that a drift of a shared
machine's speed hits every configuration alike; the table gives each run, with the CPU time the
loader workers and the training process spent per molecule (what sizes a machine with a core per
worker). Run it with PYTHONPATH
set to another revision's checkout to compare revisions: it needs only ``SourceStream`` and
``MODALITY_OF_SOURCE``, hence its own timing loop rather than ``flexmol.data.loader.measure``.

    python benchmarks/stream.py DATASET_DIR [DATASET_DIR ...] [--workers 0 1 2] [--seconds 20]
        [--warmup 5] [--rounds 2] [--max-atoms 2048]

Results: printed, and written to benchmarks/out/stream.json.
"""
import argparse
import gc
import json
import os
import platform
import time
from pathlib import Path

from flexmol.data.integrity import MODALITY_OF_SOURCE
from flexmol.data.streams import SourceStream, dataset_urls

SOURCE = {modality: source for source, modality in MODALITY_OF_SOURCE.items()}


def measure(directory: str, workers: int, seconds: float, warmup: float, max_atoms: int) -> dict:
    modality = json.loads((Path(directory) / "manifest.json").read_text())["modality"]
    stream = SourceStream(SOURCE[modality], dataset_urls([directory]), max_atoms=max_atoms, seed=0,
                          shuffle_buffer=1000, num_workers=workers, max_spd=8, max_path=5)
    started = time.perf_counter()
    next(stream)
    first = time.perf_counter()
    while time.perf_counter() - first < warmup:
        next(stream)
    counting, molecules, atoms = time.perf_counter(), 0, 0
    cpu, workers_cpu = time.process_time(), _children_cpu()
    while (now := time.perf_counter()) - counting < seconds:
        batch = next(stream)
        molecules += batch["mask"].shape[0]
        atoms += int(batch["num_atoms"].sum())
    took = now - counting
    main_cpu, workers_cpu = time.process_time() - cpu, _children_cpu() - workers_cpu
    del stream
    gc.collect()
    return {"dataset": directory, "workers": workers, "molecules_per_s": molecules / took, "atoms_per_s": atoms / took,
            "first_batch_s": first - started, "seconds": took, "molecules": molecules,
            "main_process_cpu_us_per_molecule": 1e6 * main_cpu / molecules,
            "workers_cpu_us_per_molecule": 1e6 * workers_cpu / molecules}


def _children_cpu() -> float:
    """CPU seconds used so far by this process's children (the loader workers): what a machine
    with a core per worker would spend, whatever else shares this one. 0 without psutil."""
    try:
        import psutil
    except ImportError:
        return 0.0
    total = 0.0
    for child in psutil.Process().children(recursive=True):
        try:
            t = child.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("datasets", nargs="+", help="dataset directories")
    p.add_argument("--workers", type=int, nargs="+", default=[2])
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--warmup", type=float, default=5.0)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--max-atoms", type=int, default=2048)
    args = p.parse_args()
    runs = []
    for r in range(args.rounds):
        for w in args.workers:
            for d in args.datasets:
                res = measure(d, w, args.seconds, args.warmup, args.max_atoms)
                runs.append({"round": r, **res})
                print(f"round {r}  {w} workers  {res['molecules_per_s']:8,.0f} molecules/s  {res['atoms_per_s']:10,.0f} "
                      f"atoms/s  CPU per molecule: workers {res['workers_cpu_us_per_molecule']:5.0f} us, main process "
                      f"{res['main_process_cpu_us_per_molecule']:4.0f} us  {d}", flush=True)
    out = Path(__file__).with_name("out")
    out.mkdir(exist_ok=True)
    (out / "stream.json").write_text(json.dumps({
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "load_average_after": os.getloadavg(), "seconds": args.seconds, "warmup": args.warmup,
        "max_atoms": args.max_atoms, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
