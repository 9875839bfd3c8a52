"""Pre-training throughput: molecules/s and the loader's share of step time.

Builds a QM9 paired subset (Ray-free, in-process), then trains the given model size for a number of
steps in one process through the real Pretrainer (DeepSpeed ZeRO-2, gloo on CPU) and reports the
median of the steps after warm-up.

    .venv/bin/python benchmarks/pretrain.py [--size tiny] [--steps 40] [--workers 0 2]

Prints a table and writes benchmarks/out/pretrain-<device>.json.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from _report import report
from flexmol import config
from flexmol.featurize import run_featurize


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--max-atoms", type=int, default=1024)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--zero", type=int, default=2)
    args = ap.parse_args()
    from flexmol.train import config as tc
    from flexmol.train.trainer import Pretrainer

    work = Path(tempfile.mkdtemp(prefix="flexmol-pretrain-bench-"))
    data = work / "qm9"
    run_featurize(config.build(config.FeaturizeConfig, {"source": "qm9", "out": str(data), "modality": "paired",
                                                        "limit": 4000, "job": {"executor": "serial", "shard_size": 500,
                                                                               "progress": False}}), log=lambda m: None)
    res = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)",
           "size": args.size, "max_atoms": args.max_atoms, "zero": args.zero}
    repo = Path(__file__).resolve().parents[1]
    for w in args.workers:
        cfg = tc.load(repo / "configs" / "pretrain" / "stage1.yaml", [
            f"model.size={args.size}", f"data.paired=[{data}]", f"data.num_workers={w}", f"data.max_atoms={args.max_atoms}",
            f"train.max_steps={args.steps}", "train.log_every=1000000", "train.save_every=1000000", "wandb.mode=disabled",
            f"deepspeed={repo / 'configs' / 'deepspeed' / f'zero{args.zero}.json'}", f"output_dir={work / f'run{w}'}"])
        history = Pretrainer(cfg).run()[5:]  # after warm-up
        res[f"workers_{w}_molecules_per_s"] = statistics.median(r["molecules_per_s"] for r in history)
        res[f"workers_{w}_atoms_per_s"] = statistics.median(r["atoms_per_s"] for r in history)
        res[f"workers_{w}_loader_wait_share"] = statistics.median(r["loader_wait_share"] for r in history)
    shutil.rmtree(work, ignore_errors=True)
    report(f"pretrain-{'cuda' if torch.cuda.is_available() else 'cpu'}", res)


if __name__ == "__main__":
    sys.exit(main())
