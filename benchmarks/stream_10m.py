"""Ten million samples through the training stream in one process tree: memory flat, throughput
steady, then checkpoint and resume.

The stream is the one pre-training reads (:class:`flexmol.data.streams.MixedStream` over a
:class:`~flexmol.data.streams.SourceStream` per source, built with the training config's data
defaults: loader workers, atom budget, shuffle buffer, the model's max_spd / max_path). Its shards
are resampled endlessly, so a dataset of any size can feed ten million samples: this measures the
path, not the chemistry. Every ``--every`` seconds it records the molecules taken, the rate over
the interval and the resident memory of the whole process tree (this process and its loader
workers, from /proc). At the end the stream's state is saved as a checkpoint would save it
(``torch.save``, read back with ``weights_only=True``), a new stream is built from it, and its
first ``--check`` batches are compared with the ones the running stream gives next; the time
from building the resumed stream to its first batch is reported (the first stream's loader
workers are still running then, sharing the cores).

    .venv/bin/python benchmarks/stream_10m.py DIR [DIR ...] --samples 10000000 [--workers 2] [--every 60]

Writes benchmarks/out/stream_10m.json (``--json`` to put it elsewhere).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from flexmol.cli import _bench_source
from flexmol.config import ConfigError
from flexmol.data.streams import MixedStream, MixingSchedule, MixPoint, SourceStream
from flexmol.model.summary import model_config
from flexmol.train.config import DataSection, ModelSection

PAGE = os.sysconf("SC_PAGE_SIZE")


def tree_rss_mib(root: int) -> float:
    """Resident memory of ``root`` and all its descendants, MiB (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
        except OSError:
            pass
    return total / 2 ** 20


def build(name: str, urls: list[str], args, state: dict | None = None) -> MixedStream:
    model = model_config(args.model, key="--model")
    source = SourceStream(name, urls, max_atoms=args.max_atoms, seed=args.seed, shuffle_buffer=args.shuffle_buffer,
                          num_workers=args.workers, max_spd=model.max_spd, max_path=model.max_path)
    stream = MixedStream({name: source}, MixingSchedule([MixPoint(0, {name: 1.0})], [name]), args.seed)
    if state is not None:
        stream.load_state_dict(state)
    return stream


def same(a: dict, b: dict) -> bool:
    keys = [k for k, v in a.items() if isinstance(v, torch.Tensor)]
    return sorted(keys) == sorted(k for k, v in b.items() if isinstance(v, torch.Tensor)) and all(
        a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in keys)


def main() -> int:
    d = DataSection()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("directories", nargs="+", help="dataset directories of one modality (e.g. MOSES 2D)")
    ap.add_argument("--samples", type=int, default=10_000_000, help="molecules to stream before the checkpoint")
    ap.add_argument("--every", type=float, default=60.0, help="seconds between samples of memory and throughput")
    ap.add_argument("--workers", type=int, default=d.num_workers)
    ap.add_argument("--max-atoms", type=int, default=d.max_atoms)
    ap.add_argument("--shuffle-buffer", type=int, default=d.shuffle_buffer)
    ap.add_argument("--model", default=ModelSection().size, help="its max_spd / max_path shape the pair input")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check", type=int, default=20, help="batches compared after resuming")
    ap.add_argument("--json", type=Path, default=Path(__file__).parent / "out" / "stream_10m.json")
    args = ap.parse_args()
    try:
        name, urls, molecules = _bench_source(args.directories)
    except ConfigError as exc:
        sys.exit(f"stream_10m: {exc}")
    print(f"{name}: {molecules:,} molecules in {len(urls)} shards; streaming {args.samples:,} samples with "
          f"{args.workers} loader workers", flush=True)

    stream = build(name, urls, args)
    me = os.getpid()
    started = time.perf_counter()
    taken = atoms = batches = 0
    samples = []
    last_t, last_n = started, 0
    while taken < args.samples:
        _, _, batch = next(stream)
        taken += batch["mask"].shape[0]
        atoms += int(batch["num_atoms"].sum())
        batches += 1
        now = time.perf_counter()
        if now - last_t >= args.every:
            rate = (taken - last_n) / (now - last_t)
            rss = tree_rss_mib(me)
            samples.append({"t_s": round(now - started, 1), "molecules": taken, "molecules_per_s": round(rate),
                            "rss_tree_mib": round(rss, 1), "unique": stream.sources[name].coverage.unique})
            print(f"{now - started:8.0f} s  {taken:>12,} molecules  {rate:8,.0f}/s  tree RSS {rss:8.1f} MiB", flush=True)
            last_t, last_n = now, taken
    wall = time.perf_counter() - started

    with tempfile.TemporaryDirectory() as tmp:  # the stream's state as a checkpoint holds it, with its coverage map
        path = Path(tmp) / "stream.pt"
        torch.save({"stream": stream.state_dict(), "coverage": stream.sources[name].coverage.state_dict()}, path)
        state = torch.load(path, weights_only=True)["stream"]
        size = path.stat().st_size
    t0 = time.perf_counter()
    resumed = build(name, urls, args, state)
    first = next(resumed)[2]
    resume_s = time.perf_counter() - t0
    expected = [next(stream)[2] for _ in range(args.check)]
    got = [first] + [next(resumed)[2] for _ in range(args.check - 1)]
    exact = all(same(a, b) for a, b in zip(expected, got))

    rss = [s["rss_tree_mib"] for s in samples]
    rates = [s["molecules_per_s"] for s in samples]
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "dataset_molecules": molecules, "shards": len(urls), "workers": args.workers, "max_atoms": args.max_atoms,
        "molecules": taken, "atoms": atoms, "batches": batches, "wall_s": round(wall, 1),
        "molecules_per_s": round(taken / wall), "unique_molecules": stream.sources[name].coverage.unique,
        "rss_tree_mib_min": min(rss, default=None), "rss_tree_mib_max": max(rss, default=None),
        "rate_min": min(rates, default=None), "rate_max": max(rates, default=None),
        "state_bytes": size, "resume_to_first_batch_s": round(resume_s, 2),
        "resumed_batches_identical": exact, "checked_batches": args.check, "samples": samples,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    print(f"{taken:,} molecules in {wall:,.0f} s ({taken / wall:,.0f}/s); tree RSS {min(rss, default=0):.0f}-"
          f"{max(rss, default=0):.0f} MiB; state {size:,} bytes; resumed in {resume_s:.2f} s, next {args.check} "
          f"batches {'identical' if exact else 'DIFFERENT'}; {args.json}")
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
