"""The ``flexmol`` command: one verb per job."""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from flexmol.config import ConfigError


def _featurize_parser(sub) -> None:
    p = _sub(sub, "featurize", "build a dataset of WebDataset shards from a source",
                       "Featurise SOURCE (a .smi/.csv/.tsv/.sdf/.xyz file, or moses, qm9, b3db, "
                                   "moleculenet:NAME) into a dataset directory. Exit 0 when the job finishes and its dataset passes "
                                   "the check of `flexmol shards inspect`, whatever it rejected (rejected inputs are in "
                                   "DIR/rejects.jsonl, each with its reason); exit 2 with one line for a source, option or "
                                   "output that cannot be used, or a dataset that fails its check.")
    add_featurize_arguments(p)


def add_featurize_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", nargs="?", help="file or named set (may come from --recipe)")
    p.add_argument("--out", help="dataset directory (a finished one is reused; an unfinished one resumed)")
    p.add_argument("--modality", choices=("paired", "2d", "3d"),
                   help="paired: 2D graph + 3D conformers; 2d: graph only; 3d: conformers only (config: paired)")
    p.add_argument("--limit", type=int, help="featurise only the first N inputs (config: all)")
    p.add_argument("--recipe", help="dataset recipe YAML (e.g. shards/qm9.yaml); arguments override it")
    p.add_argument("--config", action="append", default=[], help="extra YAML merged onto the config")
    p.add_argument("--executor", choices=("ray", "serial"),
                   help="ray: parallel tasks on the local cores or a cluster; serial: in this process (config: ray)")
    p.add_argument("--shard-size", type=int, help="molecules per shard (config: 0, i.e. 1000 for 3D/paired, 20000 for 2D)")
    p.add_argument("--smiles-column", help="SMILES column of a CSV/TSV (default: found by name)")
    p.add_argument("--id-column", help="id column of a CSV/TSV or SDF property (default: the row number)")
    p.add_argument("--label-column", action="append", dest="label_columns",
                   help="a label column kept with each record (repeat for several; a glob pattern such as "
                        "'emb_*' keeps every column it matches)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
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
    from flexmol.data.shards import MANIFEST, inspect

    directory = Path(args.directory)
    if not directory.is_dir() or not (directory / MANIFEST).is_file():
        why = ("no such directory" if not directory.exists() else "not a directory" if not directory.is_dir()
               else f"no {MANIFEST} (not a dataset directory, or its job has not finished)")
        print(f"flexmol shards inspect: {directory}: {why}", file=sys.stderr)
        return 2
    report = inspect(directory, decode=not args.no_decode)
    print(report.summary())
    return 0 if report.ok else 1


def _bench_source(directories: Sequence[str]) -> tuple[str, list[str], int]:
    """(stream name, shard urls, molecules) of dataset directories of one modality, or a
    :class:`ConfigError` naming the directory that is not a usable dataset."""
    from flexmol.data.integrity import MODALITY_OF_SOURCE, dataset_shards, read_manifest
    from flexmol.data.shards import MANIFEST

    source_of = {m: s for s, m in MODALITY_OF_SOURCE.items()}
    name, urls, molecules = None, [], 0
    for directory in directories:
        d = Path(directory)
        if not d.is_dir() or not (d / MANIFEST).is_file():
            why = ("no such directory" if not d.exists() else "not a directory" if not d.is_dir()
                   else f"no {MANIFEST} (not a dataset directory, or its job has not finished)")
            raise ConfigError(f"{d}: {why}")
        key = str(d)  # the checks name the config key they were given: here the directory itself
        try:
            modality = read_manifest(d, key).get("modality")
            if modality not in source_of:
                raise ConfigError(f"config key '{key}': {d}: {MANIFEST} names no modality ({', '.join(source_of)})")
            if name not in (None, source_of[modality]):
                raise ConfigError(f"config key '{key}': {d} holds {modality} data, {directories[0]} "
                                  f"{MODALITY_OF_SOURCE[name]}: a loader stream reads one modality")
            shards = [s for s in dataset_shards(d, key, modality) if s["samples"]]
        except ConfigError as exc:
            raise ConfigError(str(exc).removeprefix(f"config key '{key}': ")) from None
        name = source_of[modality]
        urls += [s["url"] for s in shards]
        molecules += sum(s["samples"] for s in shards)
    return name, urls, molecules


def cmd_shards_bench(args: argparse.Namespace) -> int:
    from flexmol.data.integrity import DataError
    from flexmol.data.loader import measure, stores_pair_tables
    from flexmol.data.streams import SourceStream
    from flexmol.model.summary import model_config
    from flexmol.train.config import DataSection, ModelSection

    defaults = DataSection()  # what a training run reads with, unless told otherwise
    for key, value in (("workers", defaults.num_workers), ("max_atoms", defaults.max_atoms),
                       ("shuffle_buffer", defaults.shuffle_buffer), ("model", ModelSection().size)):
        if getattr(args, key) is None:
            setattr(args, key, value)
    try:
        for flag, value, least in (("--workers", args.workers, 0), ("--max-atoms", args.max_atoms, 1),
                                   ("--shuffle-buffer", args.shuffle_buffer, 0)):
            if value < least:
                raise ConfigError(f"{flag} must be at least {least} (got {value})")
        for flag, value in (("--seconds", args.seconds), ("--warmup", args.warmup)):
            if not value >= 0 or value == float("inf") or (flag == "--seconds" and not value):
                raise ConfigError(f"{flag} must be a positive number of seconds (got {value})")
        name, urls, molecules = _bench_source(args.directories)
        model = model_config(args.model, key="--model")
    except ConfigError as exc:
        print(f"flexmol shards bench: {exc}", file=sys.stderr)
        return 2
    if name == "single_3d":  # no graph: no pair tables
        tables = ""
    else:
        first = {Path(u).parent: u for u in reversed(urls)}  # the first shard of each dataset
        stored = {stores_pair_tables(u) for u in first.values()}
        tables = ("; pair tables " + ("stored" if stored == {True} else "computed while batching (featurised before "
                                      "they were stored)" if stored == {False} else "stored in some datasets, "
                                      "computed while batching for the others"))
    print(f"{name}: {molecules:,} molecules in {len(urls)} shard{'' if len(urls) == 1 else 's'}{tables}")
    print(f"training loader: {args.workers} worker{'' if args.workers == 1 else 's'}, batches of at most "
          f"{args.max_atoms} padded atoms, shuffle buffer {args.shuffle_buffer}, max_spd {model.max_spd}, max_path "
          f"{model.max_path} (model {args.model})", flush=True)
    stream = SourceStream(name, urls, max_atoms=args.max_atoms, seed=0, shuffle_buffer=args.shuffle_buffer,
                          num_workers=args.workers, max_spd=model.max_spd, max_path=model.max_path)
    try:
        t = measure(stream, args.seconds, args.warmup)
    except DataError as exc:
        print(f"flexmol shards bench: {exc}", file=sys.stderr)
        return 1
    print(f"first batch after {t.first_batch_s:.1f} s, then {t.warmup_s:.1f} s of warm-up; measured over "
          f"{t.seconds:.1f} s: {t.batches:,} batches, {t.molecules / max(t.batches, 1):.0f} molecules each")
    per_worker = f" ({t.molecules_per_s / args.workers:,.0f} per worker)" if args.workers else ""
    print(f"{t.molecules_per_s:,.0f} molecules/s{per_worker}, {t.atoms_per_s:,.0f} atoms/s")
    return 0


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


def cmd_finetune_confgen(args: argparse.Namespace) -> int:
    from flexmol.finetune.confgen_train import run

    return run(args, args.overrides)


def _confgen_config(args):
    """The :class:`ConfgenConfig` of ``flexmol confgen`` / ``evaluate confgen``'s flags; unset
    ``--num-confs`` stays None (the command decides: two per reference, or two per molecule)."""
    from flexmol.evaluate.confgen import ConfgenConfig

    if args.num_confs is not None and args.num_confs < 1:
        raise ConfigError(f"--num-confs must be at least 1 (got {args.num_confs})")
    if args.refine_steps is not None and args.refine_steps < 0:
        raise ConfigError(f"--refine-steps must be at least 0 (got {args.refine_steps})")
    return ConfgenConfig(num_confs=args.num_confs, seed=args.seed, mmff=args.mmff,
                         refine_steps=1 if args.refine_steps is None else args.refine_steps)


def _load_task_model(path, flag: str):
    """The conformer task model in ``path`` (a :class:`~flexmol.evaluate.confgen.TaskModel`), or a
    one-line :class:`ConfigError` naming ``flag`` and what is wrong (whatever the files hold)."""
    from flexmol.evaluate.confgen import load_task_model

    try:
        return load_task_model(path)
    except ConfigError as exc:
        raise ConfigError(f"{flag} {exc}" if str(exc).startswith(str(path)) else f"{flag} {path}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 -- whatever the files hold: one line, not a traceback
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"{flag} {path} does not load: {first}") from None


def _load_model(checkpoint):
    """The export a ``--checkpoint`` names, or a one-line :class:`ConfigError` saying why it does
    not load (a missing, truncated or altered file; whatever the files hold, no traceback)."""
    if not checkpoint:
        return None
    from flexmol import load_pretrained
    from flexmol.finetune.config import export_dir

    try:
        return load_pretrained(export_dir(checkpoint))
    except ConfigError as exc:
        why = str(exc)
        if "config key 'checkpoint'" in why:  # the config key and the flag are the same thing here
            raise ConfigError(why.replace("config key 'checkpoint'", "--checkpoint")) from None
        raise ConfigError(f"--checkpoint {checkpoint} does not load: {why}") from None
    except Exception as exc:  # noqa: BLE001 -- whatever the files hold: one line, not a traceback
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"--checkpoint {checkpoint} does not load: {first}") from None


def _output_file(path: str, flag: str) -> Path:
    """A file the command may write: not a directory, its folder a directory that exists or can be
    made. Nothing is created here: a command refused later leaves nothing behind."""
    out = Path(path)
    if out.is_dir():
        raise ConfigError(f"{flag} {out}: is a directory (give a file name)")
    _writable(out.parent, f"{flag} {out}")
    return out


def _output_dir(path: str, flag: str) -> Path:
    """A directory the command may write into (created when the command writes)."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{flag} {out}: exists and is not a directory")
    _writable(out, f"{flag} {out}")
    return out


def _writable(directory: Path, named: str) -> None:
    """``directory``, or its nearest existing ancestor, is a directory this process can write in."""
    near = next(p for p in (directory.absolute(), *directory.absolute().parents) if p.exists())
    if not near.is_dir():
        raise ConfigError(f"{named}: {near} is not a directory")
    if not os.access(near, os.W_OK | os.X_OK):
        raise ConfigError(f"{named}: cannot write in {near}")


def _readable_dataset(directory: str, flag: str) -> None:
    """A dataset directory whose shards are all there and intact (sizes and checksums, as
    ``flexmol shards inspect --no-decode`` checks), or one line saying what is wrong."""
    from flexmol.data.shards import MANIFEST, inspect

    d = Path(directory)
    if not (d / MANIFEST).is_file():
        raise ConfigError(f"{flag} {d}: not a dataset directory (no {MANIFEST})")
    report = inspect(d, decode=False)
    if not report.ok:
        raise ConfigError(f"{flag} {d}: damaged dataset ({report.problems[0]}; `flexmol shards inspect {d}` "
                          "lists every problem)")


def _confgen_inputs(args) -> list:
    """The molecules to embed: the positional SMILES|FILE (an existing file is read as --input
    is, anything else is a SMILES), ``--smiles`` strings, then every record of ``--input`` (any file
    the featuriser reads: .smi, .csv/.tsv with a SMILES column, .sdf; optionally .gz), each with its
    id so that a rejection names it."""
    from flexmol.chem.featurizer import RawInput

    smiles, files = list(args.smiles or []), [(f, "--input") for f in [args.input] if f]
    if args.molecules:
        if Path(args.molecules).is_file():
            files.insert(0, (args.molecules, "SMILES|FILE"))
        else:
            smiles.insert(0, args.molecules)
    inputs = [RawInput(i, f"smiles{i + 1}", "smiles", s) for i, s in enumerate(smiles)]
    for file, flag in files:
        from flexmol.config import SourceOptions
        from flexmol.data.sources import SourceError, open_source

        path = Path(file)
        if path.is_dir() or not path.exists():
            raise ConfigError(f"{flag} {path}: {'is a directory' if path.is_dir() else 'no such file'}")
        try:
            source = open_source(str(path), SourceOptions(smiles_column=args.smiles_column))
            if not source.has_graph():
                raise ConfigError(f"{flag} {path}: XYZ frames have no bonds to embed from; give SMILES or SDF")
            start = len(inputs)
            inputs += [dataclasses.replace(r, index=start + k) for k, r in enumerate(source)]
        except SourceError as exc:
            raise ConfigError(f"{flag}: {exc}") from None
        except UnicodeError as exc:
            raise ConfigError(f"{flag} {path}: not a text file ({exc.reason})") from None
    if not inputs:
        raise ConfigError("no molecules: give SMILES|FILE, --smiles S [S ...] or --input FILE (.smi, .csv, .sdf)")
    return inputs


def _confgen_models(args, cfg):
    """(pre-trained model, task model, method) of ``flexmol confgen``: ``--checkpoint`` is a
    conformer task model (its ``task.json``) or a pre-trained export; ``--method`` defaults to what
    the checkpoint serves. Flags the chosen method cannot honour are refused in one line."""
    from flexmol.finetune.confgen import is_conformer_model

    task = model = None
    if args.checkpoint and is_conformer_model(args.checkpoint):
        task = _load_task_model(args.checkpoint, "--checkpoint")
    elif args.checkpoint:
        model = _load_model(args.checkpoint)
    method = args.method or ("finetuned" if task else "flexmol" if model else "etkdg_mmff" if cfg.mmff else "etkdg")
    if method in ("finetuned", "two_d_only") and task is None:
        raise ConfigError(f"--method {method}: needs --checkpoint to be a conformer task model "
                          "(flexmol finetune-confgen's output)")
    if method == "flexmol" and model is None:
        raise ConfigError("--method flexmol: needs --checkpoint to be a pre-trained export")
    if task is not None:
        if args.refine_steps is not None:
            raise ConfigError(f"--refine-steps: a conformer task model refines with its own passes "
                              f"({task.meta['passes']}, in its task.json)")
        if args.mmff and not task.mmff:
            raise ConfigError("--mmff: this conformer task model was fine-tuned on ETKDG conformers without MMFF "
                              "(its task.json); its inputs follow its training")
        cfg.mmff = task.mmff
    if method == "two_d_only":
        if (args.num_confs or 1) > 1:
            raise ConfigError(f"--num-confs {args.num_confs}: the 2D-only path is deterministic and gives one "
                              "conformer per molecule")
        cfg.num_confs = 1
    elif cfg.num_confs is None:
        cfg.num_confs = 2
    return model, task, method


def cmd_confgen(args: argparse.Namespace) -> int:
    import json

    from flexmol.evaluate.confgen import generate

    try:
        cfg = _confgen_config(args)
        out = _output_file(args.out, "--out")
        rejects_file = _output_file(args.rejects or str(out.with_suffix(".rejects.jsonl")), "--rejects")
        inputs = _confgen_inputs(args)
        model, task, method = _confgen_models(args, cfg)
    except ConfigError as exc:
        print(f"flexmol confgen: {exc}", file=sys.stderr)
        return 2
    from rdkit import Chem

    checkpoint = str(args.checkpoint) if args.checkpoint else "none"
    ok = failed = records = 0
    out.parent.mkdir(parents=True, exist_ok=True)
    rejects_file.parent.mkdir(parents=True, exist_ok=True)
    with Chem.SDWriter(str(out)) as writer, open(rejects_file, "w") as rejects:
        for raw, mol, why in generate(inputs, cfg, model, task, method):
            if mol is None:
                failed += 1
                print(f"flexmol confgen: {raw.id!r} ({raw.text[:80]!r}) rejected: {why}", file=sys.stderr)
                code, _, reason = why.partition(": ")
                rejects.write(json.dumps({"index": raw.index, "id": raw.id, "input": raw.text[:200], "code": code,
                                          "reason": reason}) + "\n")
                continue
            smiles = Chem.MolToSmiles(mol)
            written = mol if args.no_hydrogens else Chem.AddHs(mol, addCoords=True)
            props = {"_Name": raw.id, "id": raw.id, "input": raw.text if raw.kind == "smiles" else smiles,
                     "smiles": smiles, "inchikey": mol.GetProp("inchikey"), "method": method,
                     "checkpoint": checkpoint, "base_seed": str(cfg.seed),
                     "seed": str(mol.GetIntProp("seed")) if mol.HasProp("seed") else "none"}
            for k, v in props.items():
                written.SetProp(k, v)
            for i, conf in enumerate(written.GetConformers()):
                written.SetIntProp("conformer", i)
                writer.write(written, confId=conf.GetId())
            if written.GetNumConformers() < cfg.num_confs:  # ETKDG can embed fewer than asked
                print(f"flexmol confgen: {raw.id!r}: {written.GetNumConformers()} of {cfg.num_confs} conformers "
                      "embedded", file=sys.stderr)
            records += written.GetNumConformers()
            ok += 1
    print(f"{ok} molecules x {cfg.num_confs} conformers ({method}; {records} written) -> {out}; {failed} rejected"
          + (f" (reasons in {rejects_file})" if failed else ""))
    return 0 if ok else 1


def cmd_evaluate_confgen(args: argparse.Namespace) -> int:
    import json

    from flexmol.evaluate.confgen import evaluate_qm9, evaluate_sdf

    def fail(why) -> int:
        print(f"flexmol evaluate confgen: {why}", file=sys.stderr)
        return 2

    try:
        cfg = _confgen_config(args)
        if args.references and (args.start is not None or args.stride is not None):
            raise ConfigError(f"{'--start' if args.start is not None else '--stride'}: QM9 rows only; "
                              "--references scores every molecule of its SDF")
        start = 100000 if args.start is None else args.start
        stride = 130 if args.stride is None else args.stride
        for flag, value, least in (("--count", args.count, 1), ("--start", start, 0), ("--stride", stride, 1)):
            if value < least:
                raise ConfigError(f"{flag} must be at least {least} (got {value})")
        if args.references and not Path(args.references).is_file():
            raise ConfigError(f"--references {args.references}: no such file")
        for d in args.exclude_shards:
            _readable_dataset(d, "--exclude-shards")
        out = _output_dir(args.out, "--out")
        from flexmol.finetune.confgen import is_conformer_model

        if args.checkpoint and is_conformer_model(args.checkpoint):
            raise ConfigError(f"--checkpoint {args.checkpoint}: a conformer task model; give it as --task-model "
                              "(--checkpoint is the pre-trained export whose coordinate head is the 'flexmol' row)")
        model = _load_model(args.checkpoint)
        task = _load_task_model(args.task_model, "--task-model") if args.task_model else None
        log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
        if args.references:
            res = evaluate_sdf(args.references, cfg, model, task, count=args.count, exclude=args.exclude_shards,
                               log=log)
        else:
            res = evaluate_qm9(cfg, model, task, count=args.count, start=start, stride=stride,
                               exclude=args.exclude_shards, log=log)
    except (ConfigError, ValueError, OSError) as exc:
        return fail(exc)
    skipped = res["skipped"]
    held = (f"{skipped['seen_in_pretraining']} seen in pre-training, {skipped['seen_in_finetuning']} in fine-tuning, "
            f"{skipped['duplicate']} duplicate skipped; {len(res['rejected'])} rejected")
    if not res["molecules"]:
        where = f"from row {start} every {stride}" if not args.references else f"in {args.references}"
        first = res["rejected"][0] if res["rejected"] else None
        return fail(f"no held-out molecule to score {where} ({held})"
                    + (f"; first rejection: {first['id']!r}: {first['reason']}" if first else "")
                    + ("; QM9 has about 134k rows" if not args.references else ""))
    res.update({"checkpoint": args.checkpoint, "task_model": args.task_model,
                "task": {k: task.meta.get(k) for k in ("checkpoint", "passes", "input", "data", "counts", "train")}
                if task else None})
    out.mkdir(parents=True, exist_ok=True)
    (out / "confgen.json").write_text(json.dumps(res, indent=1) + "\n")
    k = res["num_confs"]
    print(f"Conformation generation against {res['reference']}: {len(res['molecules'])} held-out molecules"
          + (f" from row {start} every {stride}" if not args.references else "")
          + f", {k} generated conformers each, delta {res['delta']} A, seed {res['seed']} ({held})")
    print(f"held out: {res['held_out']}")
    print(f"note: {res['note']}")
    print(f"{'method':<11} {'confs':>5} {'COV mean':>9} {'COV median':>11} {'MAT mean':>9} {'MAT median':>11} "
          f"{'stereo':>7} {'seconds':>8}")
    for name, s in res["scores"].items():
        print(f"{name:<11} {s['conformers_mean']:>5.1f} {s['cov_mean']:>9.3f} {s['cov_median']:>11.3f} "
              f"{s['mat_mean']:>9.3f} {s['mat_median']:>11.3f} {s['stereo_mean']:>7.3f} {res['seconds'][name]:>8.1f}")
    print("stereo: share of generated conformers with the molecule's tetrahedral stereochemistry")
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
        if args.out:
            _output_file(args.out, "--out")
    except (AlignmentError, ConfigError) as exc:
        return fail(exc)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        if torch.device(device).type == "cuda" and not torch.cuda.is_available():
            return fail(f"--device {device}: no CUDA device here")
    except RuntimeError as exc:
        return fail(f"--device {device}: {exc}")
    try:
        model = _load_model(args.checkpoint)
    except ConfigError as exc:
        return fail(exc)
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
    p.add_argument("--refine-steps", type=int, help="coordinate-head passes of a pre-trained --checkpoint "
                                                    "(0: none; default 1; a conformer task model uses its own)")
    p.add_argument("--mmff", action="store_true", help="MMFF-optimise the ETKDG conformers before a pre-trained "
                                                       "model's refinement (a conformer task model follows its "
                                                       "training)")
    p.add_argument("--seed", type=int, default=0, help="ETKDG random seed (per molecule: with its InChIKey)")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's default after its help, where it has one that the help does not already state."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _sub(sub, name: str, help: str, description: str | None = None, **kw) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=description or help[:1].upper() + help[1:] + ".",
                          formatter_class=_HelpFormatter, **kw)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flexmol", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _featurize_parser(sub)

    shards = _sub(sub, "shards", "dataset directories").add_subparsers(dest="shards_command", required=True)
    insp = _sub(shards, "inspect", "print a dataset's summary; exit 1 if it is damaged",
                "Check a dataset directory: every shard's size and sha256 against the manifest, every record "
                "decoded, and the counts reconciled (written + rejected + duplicates = inputs). Exit 0 when "
                "sound, 1 when damaged, 2 when DIRECTORY is not a dataset.")
    insp.add_argument("directory", help="a dataset directory written by flexmol featurize")
    insp.add_argument("--no-decode", action="store_true", help="check sizes and checksums only, not every record")
    insp.set_defaults(func=cmd_shards_inspect)
    bench = _sub(shards, "bench", "molecules/s and atoms/s of the training loader on datasets",
                 "Run the loader pre-training reads (shard visits, record checks, seeded blocks, decoding, "
                 "atom-budget batches, 2D pair inputs, collation in the loader workers) on the datasets and print "
                 "its steady-state molecules/s and atoms/s, to size data.num_workers against a training step. "
                 "Exit 0 when measured, 1 when a record stops the loader, 2 when a directory is not a dataset.")
    bench.add_argument("directories", nargs="+", metavar="DIR", help="dataset directories of one modality")
    bench.add_argument("--workers", type=int, help="loader workers (default: the training config's data.num_workers)")
    bench.add_argument("--seconds", type=float, default=20.0, help="measured time, after the warm-up")
    bench.add_argument("--warmup", type=float, default=5.0, help="seconds of batches not counted, after the first")
    bench.add_argument("--max-atoms", type=int, help="padded atoms per batch (default: data.max_atoms)")
    bench.add_argument("--shuffle-buffer", type=int, help="records per block, each block read in a seeded order (default: data.shuffle_buffer)")
    bench.add_argument("--model", help="model preset or YAML whose max_spd and max_path the pair inputs follow "
                                       "(default: model.size)")
    bench.set_defaults(func=cmd_shards_bench)

    model = _sub(sub, "model", "the FlexMol network").add_subparsers(dest="model_command", required=True)
    summ = _sub(model, "summary", "parameters per component; last line 'total parameters: N'")
    summ.add_argument("--model", default="base", help="tiny, small, base, or a model YAML")
    summ.set_defaults(func=cmd_model_summary)

    pre = _sub(sub, "pretrain", "pre-training in one process (multi-GPU: deepspeed launch/pretrain.py)",
               "Pre-train FlexMol (stage 1 on paired 2D+3D data, stage 2 on single-modality data from a stage-1 "
               "run) in this process. For many GPUs, run the same arguments through `deepspeed "
               "launch/pretrain.py`. Configuration errors print one line naming the key and exit 2.",
               usage="flexmol pretrain [-h] --config CONFIG [key=value ...]")
    pre.add_argument("--config", required=True, help="stage1, stage2 (packaged) or a pre-training YAML file")
    pre.epilog = ("Any config key can follow as key=value, e.g. data.paired=[shards/qm9] train.max_steps=100 "
                  "validation.every=50 deepspeed=zero3.")
    pre.set_defaults(func=cmd_pretrain)

    cg = _sub(sub, "confgen", "3D conformers from SMILES (ETKDG; refined by a checkpoint, or a fine-tuned "
                              "conformer model)",
              "Write K conformers per molecule to an SDF (one record per conformer, hydrogens placed with "
              "coordinates unless --no-hydrogens; properties id, input, smiles, inchikey, method, conformer, seed, "
              "base_seed, checkpoint). Without --checkpoint: RDKit ETKDGv3 (--mmff: MMFF94-optimised). With a "
              "conformer task model (flexmol finetune-confgen): K seeded RDKit conformers of its input generator, "
              "refined by it (method finetuned), or --method two_d_only: one conformer from the 2D graph alone. "
              "With a pre-trained export: ETKDG refined by its coordinate head (method flexmol). A molecule that "
              "cannot be parsed or embedded is reported on stderr and in the rejects file with its reason; exit 0 "
              "when at least one molecule was written, 1 when none, 2 for unusable options or files.")
    cg.add_argument("molecules", nargs="?", metavar="SMILES|FILE",
                    help="a SMILES, or a file of molecules as --input takes (an existing file is read as a file)")
    cg.add_argument("--smiles", nargs="+", help="SMILES strings")
    cg.add_argument("--input", help="a file of molecules: .smi (SMILES [id] per line), .csv/.tsv with a SMILES "
                                    "column, or .sdf (optionally .gz)")
    cg.add_argument("--smiles-column", help="the SMILES column of a CSV/TSV --input (default: found by name)")
    cg.add_argument("--out", required=True, help="SDF to write (one record per conformer)")
    cg.add_argument("--checkpoint", help="a conformer task model (flexmol finetune-confgen's output), or a "
                                         "pre-trained export (or a pre-training output_dir holding export/); "
                                         "without it, plain ETKDG")
    cg.add_argument("--method", choices=("etkdg", "etkdg_mmff", "flexmol", "finetuned", "two_d_only"),
                    help="generator (default: finetuned for a conformer task model, flexmol for a pre-trained "
                         "export, else etkdg)")
    cg.add_argument("--num-confs", type=int, help="conformers per molecule (default: 2; the 2D-only path gives 1)")
    cg.add_argument("--no-hydrogens", action="store_true", help="write heavy atoms only (default: hydrogens added "
                                                                "with coordinates, RDKit AddHs(addCoords=True))")
    cg.add_argument("--rejects", help="JSON lines of the rejected molecules with their reasons (default: "
                                      "OUT with .rejects.jsonl for its extension)")
    _confgen_arguments(cg)
    cg.set_defaults(func=cmd_confgen)

    ev = _sub(sub, "evaluate", "benchmarks of a checkpoint").add_subparsers(dest="evaluate_command", required=True)
    ec = _sub(ev, "confgen", "COV / MAT on held-out molecules: ETKDG, ETKDG + MMFF, a pre-trained and a "
                             "fine-tuned model",
              "Conformation generation scored against reference geometries: QM9's DFT geometry (every --stride-th "
              "row from --start on) or an SDF's reference conformers (--references; records of one molecule, by "
              "InChIKey, are its references). Molecules found in --exclude-shards (the pre-training data) or "
              "fine-tuned on by --task-model (its train_inchikeys.txt and val_inchikeys.txt), and their "
              "stereo-isomers (the same InChIKey connectivity block), are never scored: they are skipped and "
              "counted. --count molecules in all; 2 x references conformers per molecule unless --num-confs. COV at "
              "delta 0.5 A and MAT, mean and median, heavy atoms, and the share of conformers with the molecule's "
              "stereochemistry, for ETKDGv3 and ETKDGv3 + MMFF94, the pre-trained "
              "coordinate head (--checkpoint) on the same ETKDG conformers, and the conformer task model "
              "(--task-model) on its input generator's same seeded conformers and from the 2D graph alone. Writes "
              "OUT/confgen.json with per-molecule rows.")
    ec.add_argument("--count", type=int, default=200, help="held-out molecules to score (at least 1)")
    ec.add_argument("--references", metavar="SDF",
                    help="an SDF of reference conformers instead of QM9 (default: QM9's DFT geometries)")
    ec.add_argument("--start", type=int, help="first QM9 row to draw test molecules from (default: 100000)")
    ec.add_argument("--stride", type=int, help="take every N-th QM9 row from --start on (default: 130)")
    ec.add_argument("--exclude-shards", nargs="*", default=[], metavar="DIR",
                    help="pre-training datasets: molecules found in them are skipped")
    ec.add_argument("--checkpoint", help="pre-trained export (or a pre-training output_dir holding export/): adds "
                                         "the 'flexmol' row, its coordinate head on the ETKDG conformers")
    ec.add_argument("--task-model", help="conformer task model (flexmol finetune-confgen's output): adds the "
                                         "'finetuned' and 'two_d_only' rows; its molecules are skipped")
    ec.add_argument("--num-confs", type=int, help="conformers per molecule (default: twice its references)")
    ec.add_argument("--out", default="outputs/confgen", help="directory for confgen.json")
    _confgen_arguments(ec)
    ec.set_defaults(func=cmd_evaluate_confgen)
    ea = _sub(ev, "alignment", "did stage 1 align the modalities? retrieval, cosines, feature-learner "
                               "and decoder errors on held-out paired molecules",
              "On the first --count molecules of held-out paired datasets: 2D->3D and 3D->2D "
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
    ea.add_argument("--seed", type=int, default=0, help="seed of the unmatched-pair draw")
    ea.add_argument("--out", help="write the report as JSON here")
    ea.set_defaults(func=cmd_evaluate_alignment)

    from flexmol.finetune.cli import add_arguments as finetune_arguments

    ft = _sub(sub, "finetune", "LoRA fine-tuning with the MoleculeNet protocol, next to baselines",
                        "Fine-tune a pre-trained checkpoint on a labelled set: every model x seed on "
                                    "the same splits; writes OUT/results.json and prints the table.")
    finetune_arguments(ft)
    ft.set_defaults(func=cmd_finetune)

    from flexmol.finetune.confgen_train import add_arguments as finetune_confgen_arguments

    fc = _sub(sub, "finetune-confgen", "fine-tune a checkpoint to move RDKit conformers onto reference geometries",
              "Fine-tune every weight of a pre-trained checkpoint so that its coordinate head moves seeded "
              "ETKDG(+MMFF) conformers onto reference geometries (QM9 DFT rows, or an SDF of reference "
              "conformers), and its 2D-only path builds them from the graph alone. Writes the task model "
              "(task.json, train/validation InChIKeys), metrics.jsonl and rejects.jsonl to OUT. Configuration "
              "errors print one line naming the key and exit 2.")
    finetune_confgen_arguments(fc)
    fc.set_defaults(func=cmd_finetune_confgen)

    from flexmol.demo import DemoConfig

    demo = _sub(sub, "demo", "the main job on the default data: featurise, pre-train, fine-tune on B3DB, "
                              "score conformers", DemoConfig.__doc__)
    for name, f in DemoConfig.__dataclass_fields__.items():
        demo.add_argument("--" + name.replace("_", "-"), type=type(f.default), default=f.default,
                          help=f.metadata.get("help"))
    demo.set_defaults(func=cmd_demo)

    from flexmol.scaling.cli import add_parsers as scaling_parsers

    scaling_parsers(sub, _sub)

    from flexmol.tools.cli import add_parsers as tool_parsers

    tool_parsers(sub, _sub)
    return parser


def _command(args: argparse.Namespace) -> str:
    """``flexmol VERB [SUBVERB]``, as the user typed it."""
    sub = next((getattr(args, k) for k in ("shards_command", "model_command", "evaluate_command", "scaling_command",
                                         "retrieve_command")
                if getattr(args, k, None)), None)
    return " ".join(["flexmol", args.command] + ([sub] if sub else []))


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    # key=value overrides may stand anywhere after the verb; argparse leaves them unparsed.
    args, rest = parser.parse_known_args(argv)
    bad = [r for r in rest if "=" not in r or r.startswith("-")]
    if bad or (rest and args.command not in ("featurize", "pretrain", "finetune", "finetune-confgen")):
        parser.error(f"unrecognized arguments: {' '.join(bad or rest)}")
    args.overrides = rest
    try:
        if args.command == "featurize":
            return cmd_featurize(args)
        return args.func(args)
    except KeyboardInterrupt:
        print(f"{_command(args)}: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # the environment's refusal (permissions, a full disk): one line naming the file
        why = f"{exc.filename}: {exc.strerror}" if exc.filename and exc.strerror else str(exc)
        print(f"{_command(args)}: {why}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
