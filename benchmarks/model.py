"""Model benchmark: training throughput and inference latency against a Uni-Mol-style encoder.

- forward+backward of the stage-1 objective (paired batches of real molecules), molecules/s, for
  the given sizes on this machine (CPU here; base in bf16 on a GPU where one is available);
- inference latency, side by side in one run: FlexMol on paired input (both encoders, jointly
  batched, and the multi-modal encoder; decoders skipped) and on 2D-only input (encoder, decoder,
  3D encoder, MM encoder), against a single 3D encoder of the same width and depth built from the
  same blocks. The paper reports 28 ms against 18 ms (ratio 1.55).

    .venv/bin/python benchmarks/model.py [--sizes tiny small] [--device cpu|cuda] [--bf16]

Prints a table and writes benchmarks/out/model-<device>.json.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from rdkit import RDConfig

from _report import report
from flexmol.chem import Featurizer, RawInput, Rejected
from flexmol.config import FeaturizerConfig
from flexmol.data.collate import collate, move
from flexmol.model import FlexMol
from flexmol.model.baselines import UniMolStyleEncoder
from flexmol.model.summary import count, model_config
from flexmol.objectives import ObjectiveConfig, pretraining_losses


def molecules(n: int) -> list[dict]:
    """n real molecules (RDKit's NCI set, 8-40 heavy atoms) with ETKDG conformers."""
    feat = Featurizer(FeaturizerConfig(min_heavy_atoms=8, max_heavy_atoms=40), "paired")
    out = []
    lines = (Path(RDConfig.RDDataDir) / "NCI" / "first_5K.smi").read_text().splitlines()
    for i, line in enumerate(lines):
        try:
            out.append(feat(RawInput(i, str(i), "smiles", line.split()[0])))
        except Rejected:
            continue
        if len(out) == n:
            return out
    raise RuntimeError("not enough molecules")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["tiny", "small"])
    ap.add_argument("--latency-sizes", nargs="+", default=["tiny", "small", "base"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--bf16", action="store_true", help="autocast to bfloat16")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    device = torch.device(args.device)
    mols = molecules(args.batch)
    batch = move(collate(mols), device)
    single = move(collate(mols[:1]), device)
    dtype = torch.bfloat16 if args.bf16 else None
    res: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({os.cpu_count()} cores, "
                 f"{torch.get_num_threads()} torch threads, {platform.processor() or platform.machine()})",
                 "torch": torch.__version__, "bf16": args.bf16, "batch": args.batch,
                 "atoms_per_molecule": float(batch["num_atoms"].float().mean())}
    cfg_obj = ObjectiveConfig()
    for size in args.sizes:
        torch.manual_seed(0)
        model = FlexMol(model_config(size)).to(device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                loss = pretraining_losses(model, batch, cfg_obj)["total"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        timed(step, device, 2)  # warm-up
        t = timed(step, device, args.steps)
        res[f"train_{size}_mol_s"] = args.batch / statistics.median(t)
        res[f"params_{size}"] = count(model)

    for size in args.latency_sizes:
        cfg = model_config(size)
        torch.manual_seed(0)
        flex = FlexMol(cfg).to(device).eval()
        base = UniMolStyleEncoder(cfg).to(device).eval()
        two_d = dict(single, modality="2d")
        runs = {"unimol_style": lambda: base(single), "flexmol_paired": lambda: flex.embed(single),
                "flexmol_2d_only": lambda: flex.embed(two_d)}
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            for fn in runs.values():
                timed(fn, device, 3)
            # interleaved repeats, so that drifts of the machine's speed hit all three alike
            samples = {k: [] for k in runs}
            for _ in range(10):
                for k, fn in runs.items():
                    samples[k] += timed(fn, device, 3)
        for k, v in samples.items():
            res[f"latency_{size}_{k}_ms"] = 1000 * statistics.median(v)
        res[f"latency_{size}_ratio_paired"] = res[f"latency_{size}_flexmol_paired_ms"] / res[f"latency_{size}_unimol_style_ms"]
        res[f"latency_{size}_ratio_2d_only"] = res[f"latency_{size}_flexmol_2d_only_ms"] / res[f"latency_{size}_unimol_style_ms"]
        res[f"params_unimol_style_{size}"] = count(base)

    report(f"model-{device.type}", res)


if __name__ == "__main__":
    sys.exit(main())
