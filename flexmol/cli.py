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
    from flexmol.demo import DemoConfig, run_demo

    fields = DemoConfig.__dataclass_fields__
    cfg = DemoConfig(**{k: getattr(args, k) for k in fields})
    return run_demo(cfg)


def cmd_model_summary(args: argparse.Namespace) -> int:
    from flexmol.model.summary import summary_text

    try:
        print(summary_text(args.model))
    except ConfigError as exc:
        print(f"flexmol model summary: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from flexmol.train.cli import main

    return main(["--config", args.config, *args.overrides])


def cmd_finetune(args: argparse.Namespace) -> int:
    from flexmol.finetune.cli import run

    return run(args, args.overrides)


def _confgen_config(args):
    from flexmol.evaluate.confgen import ConfgenConfig

    cfg = ConfgenConfig(num_confs=args.num_confs, seed=args.seed, mmff=args.mmff, refine_steps=args.refine_steps)
    if cfg.num_confs < 1 or cfg.refine_steps < 0:
        raise ConfigError("--num-confs must be at least 1 and --refine-steps at least 0")
    return cfg


def _model(checkpoint):
    if not checkpoint:
        return None
    from flexmol import load_pretrained
    from flexmol.finetune.config import export_dir

    return load_pretrained(export_dir(checkpoint))


def cmd_confgen(args: argparse.Namespace) -> int:
    from flexmol.evaluate.confgen import generate

    smiles = list(args.smiles or [])
    try:
        cfg = _confgen_config(args)
        if args.input:
            smiles += [line.split()[0] for line in open(args.input) if line.strip() and not line.startswith("#")]
        if not smiles:
            raise ConfigError("give --smiles S [S ...] or --input FILE.smi")
        model = _model(args.checkpoint)
    except (ConfigError, OSError) as exc:
        print(f"flexmol confgen: {exc}", file=sys.stderr)
        return 2
    from rdkit import Chem

    method = "flexmol" if model is not None else "etkdg"
    ok = failed = 0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with Chem.SDWriter(args.out) as writer:
        for i, smi, mol, why in generate(smiles, cfg, model):
            if mol is None:
                failed += 1
                print(f"flexmol confgen: molecule {i} ({smi}) rejected: {why}", file=sys.stderr)
                continue
            mol_h = Chem.AddHs(mol, addCoords=True)
            mol_h.SetProp("_Name", f"mol{i}")
            mol_h.SetProp("smiles", smi)
            mol_h.SetProp("method", method)
            for conf in mol_h.GetConformers():
                writer.write(mol_h, confId=conf.GetId())
            ok += 1
    print(f"{ok} molecules x {cfg.num_confs} conformers ({method}) -> {args.out}; {failed} rejected")
    return 0 if ok else 1


def cmd_evaluate_confgen(args: argparse.Namespace) -> int:
    import json

    from flexmol.evaluate.confgen import evaluate_qm9

    try:
        cfg = _confgen_config(args)
        model = _model(args.checkpoint)
        res = evaluate_qm9(cfg, model, count=args.count, start=args.start, stride=args.stride,
                           exclude=args.exclude_shards,
                           log=lambda m: print(m, file=sys.stderr, flush=True))
    except (ConfigError, ValueError) as exc:
        print(f"flexmol evaluate confgen: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "confgen.json").write_text(json.dumps(res, indent=1) + "\n")
    print(f"QM9 conformation generation: {res['scores']['etkdg']['molecules']} held-out molecules from row "
          f"{res['start_row']} every {res['stride']}, {res['num_confs']} conformers each, delta {res['delta']} A "
          f"({res['skipped_seen_in_pretraining_or_duplicate']} skipped as seen or duplicate, "
          f"{len(res['rejected'])} rejected)")
    print(f"{'method':<8} {'COV mean':>9} {'COV median':>11} {'MAT mean':>9} {'MAT median':>11}")
    for name, s in res["scores"].items():
        print(f"{name:<8} {s['cov_mean']:>9.3f} {s['cov_median']:>11.3f} "
              f"{s['mat_mean']:>9.3f} {s['mat_median']:>11.3f}")
    print(f"details: {out / 'confgen.json'}")
    return 0


def cmd_evaluate_alignment(args: argparse.Namespace) -> int:
    import json

    import torch

    from flexmol.evaluate.alignment import AlignmentError, alignment_report, check_datasets, format_report

    def fail(why) -> int:
        print(f"flexmol evaluate alignment: {why}", file=sys.stderr)
        return 2

    try:  # the data first: it is cheap to check, loading a checkpoint is not
        if args.count < 2:
            raise AlignmentError(f"--count must be at least 2 (got {args.count}): retrieval needs other "
                                 "molecules to rank against")
        check_datasets(args.data)
    except AlignmentError as exc:
        return fail(exc)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        if torch.device(device).type == "cuda" and not torch.cuda.is_available():
            return fail(f"--device {device}: no CUDA device here")
    except RuntimeError as exc:
        return fail(f"--device {device}: {exc}")
    try:
        model = _model(args.checkpoint)
    except Exception as exc:  # noqa: BLE001 -- whatever the files hold, one line, not a traceback
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return fail(f"checkpoint {args.checkpoint} does not load: {first}")
    try:
        report = alignment_report(model, args.data, count=args.count, max_atoms=args.max_atoms, device=device,
                                  seed=args.seed)
    except AlignmentError as exc:
        return fail(exc)
    report["checkpoint"] = str(args.checkpoint)
    print(format_report(report))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1) + "\n")
        print(f"details: {out}")
    return 0


def _confgen_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", help="pre-trained export: refine ETKDG conformers with its coordinate head")
    p.add_argument("--num-confs", type=int, default=2, help="conformers per molecule")
    p.add_argument("--refine-steps", type=int, default=1, help="coordinate-head passes")
    p.add_argument("--mmff", action="store_true", help="MMFF-optimise the ETKDG conformers first")
    p.add_argument("--seed", type=int, default=0)


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
    pre.add_argument("--config", required=True, help="stage1, stage2 (packaged) or a pre-training YAML file")
    pre.epilog = ("Any config key can follow as key=value, e.g. data.paired=[shards/qm9] train.max_steps=100 "
                  "validation.every=50 deepspeed=zero3.")
    pre.set_defaults(func=cmd_pretrain)

    cg = sub.add_parser("confgen", help="3D conformers from SMILES (ETKDG, refined by a checkpoint's coordinate head)")
    cg.add_argument("--smiles", nargs="+")
    cg.add_argument("--input", help="a .smi file")
    cg.add_argument("--out", required=True, help="SDF to write (one record per conformer)")
    _confgen_arguments(cg)
    cg.set_defaults(func=cmd_confgen)

    ev = sub.add_parser("evaluate", help="benchmarks of a checkpoint").add_subparsers(dest="evaluate_command",
                                                                                    required=True)
    ec = ev.add_parser("confgen", help="COV / MAT against QM9 DFT geometries on held-out molecules, vs ETKDG")
    ec.add_argument("--count", type=int, default=200)
    ec.add_argument("--start", type=int, default=100000, help="first QM9 row to draw test molecules from")
    ec.add_argument("--stride", type=int, default=130, help="take every N-th row from --start on")
    ec.add_argument("--exclude-shards", nargs="*", default=[],
                    help="pre-training datasets: molecules found in them are skipped")
    ec.add_argument("--out", default="outputs/confgen")
    _confgen_arguments(ec)
    ec.set_defaults(func=cmd_evaluate_confgen)
    ea = ev.add_parser("alignment", help="did stage 1 align the modalities? retrieval, cosines, feature-learner "
                                         "and decoder errors on held-out paired molecules",
                       description="On the first --count molecules of held-out paired datasets: 2D->3D and 3D->2D "
                                   "retrieval top-1/top-5 from the contrastive projections, matched and unmatched "
                                   "cosine, and the feature learners' and decoders' MSE (absolute and relative to "
                                   "the target variance). Exit 2 with the reason when the data or checkpoint is "
                                   "unusable.")
    ea.add_argument("--checkpoint", required=True, help="pre-trained export, or a pre-training output_dir with export/")
    ea.add_argument("--data", nargs="+", action="extend", required=True, metavar="SHARDS",
                    help="paired dataset directories (flexmol featurize ... --modality paired), read in order")
    ea.add_argument("--count", type=int, default=1000, help="molecules to evaluate (at least 2)")
    ea.add_argument("--max-atoms", type=int, default=4096, help="padded atoms per batch")
    ea.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    ea.add_argument("--seed", type=int, default=0)
    ea.add_argument("--out", help="write the report as JSON here")
    ea.set_defaults(func=cmd_evaluate_alignment)

    from flexmol.finetune.cli import add_arguments as finetune_arguments

    ft = sub.add_parser("finetune", help="LoRA fine-tuning with the MoleculeNet protocol, next to baselines",
                        description="Fine-tune a pre-trained checkpoint on a labelled set: every model x seed on "
                                    "the same splits; writes OUT/results.json and prints the table.")
    finetune_arguments(ft)
    ft.set_defaults(func=cmd_finetune)

    demo = sub.add_parser("demo", help="the main job on the default data: featurise, pre-train, fine-tune on "
                                       "B3DB, score conformers")
    from flexmol.demo import DemoConfig

    for name, f in DemoConfig.__dataclass_fields__.items():
        demo.add_argument("--" + name.replace("_", "-"), type=type(f.default), default=f.default)
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
