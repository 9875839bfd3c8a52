"""The ``flexmol`` command: one verb per job."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from flexmol.config import ConfigError


def _featurize_parser(sub) -> None:
    p = sub.add_parser("featurize", help="build a dataset of WebDataset shards from a source",
                       description="Featurise SOURCE (a .smi/.csv/.tsv/.sdf/.xyz file, or moses, qm9, b3db, "
                                   "moleculenet:NAME) into a dataset directory. Exit 0 when the job finishes, "
                                   "whatever it rejected; rejected inputs are in DIR/rejects.jsonl.")
    add_featurize_arguments(p)


def add_featurize_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", nargs="?", help="file or named set (may come from --recipe)")
    p.add_argument("--out", help="dataset directory")
    p.add_argument("--modality", choices=("paired", "2d", "3d"))
    p.add_argument("--limit", type=int, help="featurise only the first N inputs")
    p.add_argument("--recipe", help="dataset recipe YAML (e.g. shards/qm9.yaml); arguments override it")
    p.add_argument("--config", action="append", default=[], help="extra YAML merged onto the config")
    p.add_argument("--executor", choices=("ray", "serial"))
    p.add_argument("--shard-size", type=int)
    p.add_argument("--smiles-column")
    p.add_argument("--id-column")
    p.add_argument("--label-column", action="append", dest="label_columns")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(overrides=[])
    p.epilog = "Any config key can follow as key=value, e.g. featurizer.num_conformers=5 job.num_cpus=8."


def featurize_config(args: argparse.Namespace):
    from flexmol import config

    # argparse puts a first ``key=value`` into ``source`` when the source comes from a recipe.
    overrides = list(args.overrides)
    source = args.source
    if source and "=" in source and not Path(source).exists():
        overrides.insert(0, source)
        source = None
    explicit: dict = {}
    for key, value in (("source", source), ("out", args.out), ("modality", args.modality), ("limit", args.limit)):
        if value is not None:
            explicit[key] = value
    job = {k: v for k, v in (("executor", args.executor), ("shard_size", args.shard_size)) if v is not None}
    if args.no_progress:
        job["progress"] = False
    if job:
        explicit["job"] = job
    opts = {k: v for k, v in (("smiles_column", args.smiles_column), ("id_column", args.id_column),
                              ("label_columns", args.label_columns)) if v}
    if opts:
        explicit["source_options"] = opts
    return config.build(config.FeaturizeConfig, args.recipe, *args.config, explicit, overrides=overrides)


def cmd_featurize(args: argparse.Namespace) -> int:
    from flexmol.featurize import FeaturizeError, run_featurize

    try:
        cfg = featurize_config(args)
        run_featurize(cfg)
    except (ConfigError, FeaturizeError) as exc:
        print(f"flexmol featurize: {exc}", file=sys.stderr)
        return 2
    from flexmol.data.shards import inspect

    print(inspect(Path(cfg.out), decode=False).summary())
    return 0


def cmd_shards_inspect(args: argparse.Namespace) -> int:
    from flexmol.data.shards import inspect

    report = inspect(Path(args.directory), decode=not args.no_decode)
    print(report.summary())
    return 0 if report.ok else 1


def cmd_demo(args: argparse.Namespace) -> int:
    from flexmol.demo import run_demo

    return run_demo(out=Path(args.out), qm9_limit=args.qm9_limit, moses_limit=args.moses_limit)


def cmd_model_summary(args: argparse.Namespace) -> int:
    from flexmol.model.summary import summary_text

    try:
        print(summary_text(args.model))
    except ConfigError as exc:
        print(f"flexmol model summary: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    import runpy

    launcher = Path(__file__).resolve().parents[1] / "launch" / "pretrain.py"
    module = runpy.run_path(str(launcher))
    return module["main"](["--config", args.config, *args.overrides])


def cmd_finetune(args: argparse.Namespace) -> int:
    from flexmol.finetune.cli import run

    return run(args, args.overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flexmol", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _featurize_parser(sub)

    shards = sub.add_parser("shards", help="dataset directories").add_subparsers(dest="shards_command", required=True)
    insp = shards.add_parser("inspect", help="print a dataset's summary; exit 1 if it is damaged")
    insp.add_argument("directory")
    insp.add_argument("--no-decode", action="store_true", help="check sizes and checksums only, not every record")
    insp.set_defaults(func=cmd_shards_inspect)

    model = sub.add_parser("model", help="the FlexMol network").add_subparsers(dest="model_command", required=True)
    summ = model.add_parser("summary", help="parameters per component; last line 'total parameters: N'")
    summ.add_argument("--model", default="base", help="tiny, small, base, or a model YAML")
    summ.set_defaults(func=cmd_model_summary)

    pre = sub.add_parser("pretrain", help="pre-training in one process (multi-GPU: deepspeed launch/pretrain.py)")
    pre.add_argument("--config", required=True, help="configs/pretrain/stage1.yaml or stage2.yaml")
    pre.set_defaults(func=cmd_pretrain)

    from flexmol.finetune.cli import add_arguments as finetune_arguments

    ft = sub.add_parser("finetune", help="LoRA fine-tuning with the MoleculeNet protocol, next to baselines",
                        description="Fine-tune a pre-trained checkpoint on a labelled set: every model x seed on "
                                    "the same splits; writes OUT/results.json and prints the table.")
    finetune_arguments(ft)
    ft.set_defaults(func=cmd_finetune)

    demo = sub.add_parser("demo", help="the main job on the default data (QM9 paired + MOSES 2D subsets)")
    demo.add_argument("--out", default="outputs/demo")
    demo.add_argument("--qm9-limit", type=int, default=2000)
    demo.add_argument("--moses-limit", type=int, default=20000)
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    # key=value overrides may stand anywhere after the verb; argparse leaves them unparsed.
    args, rest = parser.parse_known_args(argv)
    bad = [r for r in rest if "=" not in r or r.startswith("-")]
    if bad or (rest and args.command not in ("featurize", "pretrain", "finetune")):
        parser.error(f"unrecognized arguments: {' '.join(bad or rest)}")
    args.overrides = rest
    if args.command == "featurize":
        return cmd_featurize(args)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
