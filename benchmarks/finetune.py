"""BENCHMARKS.md's fine-tuning table: BBBP, ESOL, ClinTox and B3DB with the MoleculeNet protocol
(scaffold split 80/10/10, 3 seeds, test metric at the best validation epoch): the pre-trained
checkpoint with LoRA and fully fine-tuned, the same architecture from scratch, linear probes on
the frozen embeddings of both starting points, and ECFP4 + random forest, all on the same splits.

    FLEXMOL_MOLECULENET_DIR=../shared/data/moleculenet \\
        .venv/bin/python benchmarks/finetune.py --checkpoint outputs/bench/stage2 --out outputs/bench/ft

Without --checkpoint only the baselines run; their results are reused by a later run with one.
Extra key=value arguments go to every fine-tuning config.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import report  # noqa: E402

SETS = {
    "bbbp": ("moleculenet:bbbp", ["p_np"], "classification"),
    "esol": ("moleculenet:esol", ["logp"], "regression"),
    "clintox": ("moleculenet:clintox", ["FDA_APPROVED", "CT_TOX"], "classification"),
    "b3db": ("b3db", ["bbb"], "classification"),
}
# Per set: B3DB (7,807 molecules) is fine-tuned on a seeded random 2,000 of them.
EXTRA = {"b3db": {"subsample": 2000}}
SETTINGS = ["train.epochs=30", "train.patience=8"]


def main() -> int:
    from flexmol.finetune.cli import DEFAULT_CONFIG
    from flexmol.finetune.config import load
    from flexmol.finetune.protocol import run_finetune, table

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint")
    p.add_argument("--out", default="outputs/bench/ft")
    p.add_argument("--sets", default=",".join(SETS), help=f"comma-separated, of {','.join(SETS)}")
    args, overrides = p.parse_known_args()
    args.sets = [x for x in args.sets.split(",") if x]
    unknown = sorted(set(args.sets) - set(SETS))
    if unknown:
        p.error(f"--sets: unknown {unknown}; choose from {', '.join(SETS)}")
    summary = {}
    for name in args.sets:
        source, targets, task = SETS[name]
        explicit = {"data": {"source": source, "targets": targets, "task": task, **EXTRA.get(name, {})},
                    "out": str(Path(args.out) / name)}
        if args.checkpoint:
            explicit["checkpoint"] = args.checkpoint
        res = run_finetune(load(DEFAULT_CONFIG, explicit, overrides=SETTINGS + overrides))
        print(table(res), flush=True)
        for model, s in res["models"].items():
            summary[f"{name}/{model}"] = f"{s['mean']:.3f} ± {s['std']:.3f} ({s['metric']})"
    report("finetune" if args.checkpoint else "finetune_baselines", summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
