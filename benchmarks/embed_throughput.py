"""Embedding throughput of `flexmol embed` on this machine's CPU: molecules/s with a tiny model.

On the first N molecules of the MOSES test set (drug-like, 20-27 heavy atoms), written to a .smi
file, with a seeded tiny FlexMol export (or --checkpoint):
  (a) from SMILES: featurisation (a process pool on every core) included, as a user runs it;
  (b) from the same molecules featurised once as a 2D dataset directory (`flexmol featurize`),
      read as stored: the path for a library of millions;
each as its own `flexmol embed` process writing Parquet (the fused embedding), once per atom
budget in --max-atoms. Reported: the command's own molecules/s (from its summary line: reading,
featurising, embedding and writing, after the model is loaded), the process's wall time
(start-up, imports and loading included) and the CPU time of the process and its featurising
workers (start-up included; the figure a busy machine does not distort), with the machine's load
average before the runs.

    .venv/bin/python benchmarks/embed_throughput.py [--n 1000] [--max-atoms 8192]

Prints a table and writes benchmarks/out/embed_throughput.json.
"""
from __future__ import annotations

import argparse
import itertools
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _report import report

ROOT = Path(__file__).resolve().parents[1]
FLEXMOL = [sys.executable, "-m", "flexmol.cli"]


def moses_test_smiles(n: int) -> list[tuple[str, str]]:
    """(SMILES, id) of the first ``n`` molecules of the MOSES test split."""
    from flexmol.data.sources import open_source

    rows = (r for r in open_source("moses") if r.id.startswith("moses-test-"))
    return [(r.text, r.id) for r in itertools.islice(rows, n)]


def tiny_export(directory: Path) -> Path:
    import torch

    import flexmol
    from flexmol.model.network import FlexMol
    from flexmol.model.summary import model_config

    torch.manual_seed(0)
    return flexmol.save_pretrained(FlexMol(model_config("tiny")).eval(), directory / "export")


def embed(source: Path, checkpoint: Path, out: Path, max_atoms: int, workers: int) -> dict:
    """One `flexmol embed` process: its summary's molecules/s and its wall time."""
    cmd = FLEXMOL + ["embed", str(source), "--checkpoint", str(checkpoint), "--out", str(out), "--max-atoms",
                     str(max_atoms), "--workers", str(workers), "--no-progress", "--overwrite"]
    start, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()}")
    line = done.stdout.strip().splitlines()[-1]
    n = int(re.search(r"(\d+) molecules embedded", line).group(1))
    rate = float(re.search(r"([\d.]+) molecules/s", line).group(1))
    return {"molecules": n, "molecules_per_s": rate, "wall_s": round(wall, 2),
            "molecules_per_s_wall": round(n / wall, 1), "cpu_s": round(cpu, 1),
            "command": " ".join(["flexmol"] + cmd[3:])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000, help="molecules")
    ap.add_argument("--max-atoms", type=int, nargs="+", default=[8192], help="atom budgets per batch")
    ap.add_argument("--workers", type=int, default=0, help="featurising processes (0: every core)")
    ap.add_argument("--checkpoint", help="an export to use instead of a seeded tiny model")
    args = ap.parse_args()

    from flexmol import config
    from flexmol.featurize import run_featurize

    with tempfile.TemporaryDirectory(prefix="embed-bench-") as tmp:
        tmp = Path(tmp)
        smi = tmp / "moses_test.smi"
        smi.write_text("".join(f"{s} {i}\n" for s, i in moses_test_smiles(args.n)))
        checkpoint = Path(args.checkpoint) if args.checkpoint else tiny_export(tmp)
        dataset = tmp / "moses_test_2d"
        start = time.perf_counter()
        run_featurize(config.build(config.FeaturizeConfig, {
            "source": str(smi), "out": str(dataset), "modality": "2d",
            "job": {"executor": "serial", "progress": False}}), log=lambda m: None)
        featurize_s = time.perf_counter() - start
        res = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
               "load_average_1min_before": round(os.getloadavg()[0], 2), "molecules": args.n,
               "model": "tiny (seeded)" if not args.checkpoint else str(checkpoint),
               "dataset_featurize_serial_s": round(featurize_s, 1)}
        for max_atoms in args.max_atoms:
            for name, source in (("smiles", smi), ("dataset", dataset)):
                got = embed(source, checkpoint, tmp / f"{name}.parquet", max_atoms, args.workers)
                for key in ("molecules_per_s", "wall_s", "molecules_per_s_wall", "cpu_s"):
                    res[f"{name}_max_atoms{max_atoms}_{key}"] = got[key]
                res[f"{name}_max_atoms{max_atoms}_command"] = got["command"].replace(str(tmp), "$TMP")
    report("embed_throughput", res)


if __name__ == "__main__":
    main()
