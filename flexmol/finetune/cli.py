"""``flexmol finetune`` / ``launch/finetune.py``: arguments -> config -> protocol -> table."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flexmol import config
from flexmol.config import ConfigError

DEFAULT_CONFIG = config.resolve_resource("finetune", "default")
# Keys naming files: relative values in a --config file resolve against the file's directory when
# they exist there; scratch_model also takes a packaged model's name (tiny, small, base).
PATH_KEYS = ("checkpoint", "data.source")
NAME_KEYS = ("scratch_model",)


def _defaults():
    """The configuration's defaults, for the help text: the dataclass's own (which the packaged
    default.yaml repeats), so that building the parser reads and validates no file."""
    from flexmol.finetune.config import FinetuneConfig

    return FinetuneConfig()


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = _defaults()
    seeds = d.seeds
    counted = seeds == list(range(len(seeds)))
    p.add_argument("--checkpoint", help="pre-trained export (or a pre-training output_dir holding export/); config "
                                        "key checkpoint (default: none: only the arms that need no checkpoint run)")
    p.add_argument("--data", help="CSV/TSV with a SMILES column, or b3db, qm9, moleculenet:NAME; config key "
                                  "data.source (default: none, required)")
    p.add_argument("--smiles-column", help="the SMILES column of a CSV/TSV; config key data.smiles_column (default: "
                                           "found by name: smiles, SMILES, ...)")
    p.add_argument("--target", action="append", dest="targets",
                   help="target column, repeated for multi-task; config key data.targets (default: none, required)")
    p.add_argument("--task", choices=("classification", "regression"),
                   help=f"config key data.task (default: {d.data.task})")
    p.add_argument("--metric", choices=("roc_auc", "rmse", "mae"),
                   help="config key data.metric (default: roc_auc for classification, rmse for regression)")
    p.add_argument("--split", choices=("scaffold", "random"),
                   help=f"scaffold (the same for every seed) or random (per seed); config key split.kind "
                        f"(default: {d.split.kind}, fractions {list(d.split.fractions)})")
    p.add_argument("--seeds", type=int, help="number of seeds: 0, 1, ..., N-1; config key seeds (default: "
                                             + (f"{len(seeds)}: {seeds})" if counted else f"{seeds})"))
    p.add_argument("--mode", choices=("2d", "3d", "both"),
                   help=f"input modalities; config key mode (default: {d.mode})")
    p.add_argument("--baselines", help="comma-separated arms beside the pre-trained model with LoRA, in the same "
                                       "table: flexmol_full (the checkpoint, every weight trained), scratch, "
                                       "probe_flexmol, probe_scratch (linear probes on frozen embeddings), ecfp_rf; "
                                       "all (every arm that applies) or none; config key baselines "
                                       f"(default: {','.join(d.baselines)})")
    p.add_argument("--out", help="output directory (results.json, table.txt, runs/, rejects.jsonl); config key out "
                                 f"(default: {d.out})")
    p.add_argument("--config", action="append", default=[],
                   help="YAML merged onto the packaged default (flexmol/configs/finetune/default.yaml); repeatable, "
                        "later files win (default: none)")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    p.epilog = "Any config key can follow as key=value, e.g. train.epochs=20 lora.r=16 data.limit=500."


def config_from(args: argparse.Namespace, overrides: list[str]):
    from flexmol.finetune.config import load

    explicit: dict = {}
    data = {k: v for k, v in (("source", args.data), ("smiles_column", args.smiles_column), ("targets", args.targets),
                              ("task", args.task), ("metric", args.metric)) if v is not None}
    if data:
        explicit["data"] = data
    if args.checkpoint:
        explicit["checkpoint"] = args.checkpoint
    if args.split:
        explicit["split"] = {"kind": args.split}
    if args.seeds is not None:
        if args.seeds < 1:
            raise ConfigError("--seeds must be at least 1")
        explicit["seeds"] = list(range(args.seeds))
    if args.mode:
        explicit["mode"] = args.mode
    if args.baselines is not None:
        names = [b.strip() for b in args.baselines.split(",") if b.strip()]
        explicit["baselines"] = [] if names == ["none"] else names
    if args.out:
        explicit["out"] = args.out
    files = [config.load_file(path, PATH_KEYS, NAME_KEYS) for path in args.config]
    return load(DEFAULT_CONFIG, *files, explicit, overrides=overrides)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="flexmol finetune", description=__doc__)
    add_arguments(parser)
    args, rest = parser.parse_known_args(argv)
    return run(args, rest)


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    bad = [o for o in overrides if "=" not in o or o.startswith("-")]
    if bad:
        print(f"flexmol finetune: unrecognized arguments: {' '.join(bad)}", file=sys.stderr)
        return 2
    from flexmol.data.sources import SourceError
    from flexmol.finetune.protocol import run_finetune, table

    try:
        cfg = config_from(args, overrides)
        results = run_finetune(cfg)
    except (ConfigError, SourceError, ValueError) as exc:
        print(f"flexmol finetune: {_one_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file that cannot be read or written (permissions, a full disk)
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"flexmol finetune: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    if results:
        print(table(results))
        print(f"results: {Path(cfg.out) / 'results.json'}")
    return 0


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split("\n")[0].split()) or type(exc).__name__
