"""Training FLOPs per molecule, measured (``flexmol.scaling.flops``): for each model preset and
stage, the fitted cost model per modality, flops(B, N) = c_molecule*B + c_atom*B*N + c_pair*B*N^2
+ c_batch*B^2 for a step of B molecules padded to N atoms (forward and backward, matrix products),
its largest error on held-out training-like batches, the FLOPs per molecule of the data (each
molecule at its own atom count, and padded, in batches made as training makes them:
``planned_work`` on the records read), the share of the pair term, and the time the measurement
took.

    python benchmarks/flops.py DATASET_DIR [DATASET_DIR ...] [--models tiny small] [--stages 1 2]
        [--records 512] [--max-atoms 2048] [--out benchmarks/out/flops]

A paired dataset serves all three modalities (its records relabelled as 2D or 3D); a 2D or 3D
dataset serves its own. Results: printed, and one JSON per (model, stage) in --out (the cache of
``flexmol.scaling.flops.flop_model``: a second run reads them instead of measuring).
"""
import argparse
import time

import numpy as np

from flexmol.model.summary import model_config
from flexmol.data.integrity import MODALITY_OF_SOURCE
from flexmol.scaling.flops import MODALITIES, TERMS, flop_model, planned_work, sample_records

SOURCE = {modality: source for source, modality in MODALITY_OF_SOURCE.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("datasets", nargs="+", help="dataset directories (flexmol shards)")
    ap.add_argument("--models", nargs="+", default=["tiny", "small"], help="model presets or YAML files")
    ap.add_argument("--stages", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--records", type=int, default=512, help="records read from each dataset's first shards")
    ap.add_argument("--max-atoms", type=int, default=2048, help="the atom budget of a training batch")
    ap.add_argument("--out", default="benchmarks/out/flops", help="directory of the FLOP models (JSON)")
    args = ap.parse_args()

    records: dict[str, list] = {}
    for d in args.datasets:
        modality, recs = sample_records(d, limit=args.records, key=d)
        for m in (MODALITIES if modality == "paired" else (modality,)):
            records.setdefault(m, recs)
    sizes = {m: np.array([len(r["z"]) for r in recs]) for m, recs in records.items()}
    for m, s in sizes.items():
        print(f"{m}: {len(s)} molecules, atoms mean {s.mean():.2f}, mean of squares {np.mean(s ** 2):.1f}, "
              f"range {s.min()}..{s.max()}")
    for name in args.models:
        cfg = model_config(name)
        for stage in args.stages:
            started = time.perf_counter()
            fm = flop_model(cfg, records, stage=stage, cache_dir=args.out, max_atoms=args.max_atoms,
                            log=lambda line: print(f"  {line}", flush=True))
            wall = time.perf_counter() - started
            print(f"\n{name} (dim {cfg.dim}, heads {cfg.heads}, layers {cfg.layers}; {fm.parameters:,} parameters), "
                  f"stage {stage}: measured in {fm.seconds:.1f} s (this call {wall:.1f} s), file flops-{fm.key}.json")
            print(f"  {'modality':<8} " + " ".join(f"{t:>14}" for t in TERMS)
                  + f" {'held-out err':>12} {'MFLOP/mol':>10} {'padded':>10} {'pair share':>10}")
            for m, c in fm.coefficients.items():
                # one molecule's share of training-like batches of the sample (atom budget, shuffled)
                work = planned_work({SOURCE[m]: 1}, {SOURCE[m]: sizes[m]}, args.max_atoms)
                per = fm.total(work)
                pairs = c["atom_pairs"] * work[SOURCE[m]]["atom_pairs"] / per["flops"]
                print(f"  {m:<8} " + " ".join(f"{c[t]:>14,.0f}" for t in TERMS)
                      + f" {fm.fits[m]['held_out_max_relative_error']:>12.1e} {per['flops'] / 1e6:>10.2f}"
                      f" {per['flops_padded'] / 1e6:>10.2f} {pairs:>10.1%}")


if __name__ == "__main__":
    main()
