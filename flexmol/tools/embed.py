"""`flexmol embed`: embeddings of a file of molecules (or a featurised dataset) from a checkpoint,
written as Parquet or NPY, with the rejected inputs and their reasons beside them.

Parquet (``--out FILE.parquet``): one row per molecule, columns ``id``, ``smiles`` (canonical) and
one ``list<float32>`` column per space; with ``--atoms`` also ``atom_symbols`` (``list<string>``)
and ``<space>_atoms`` (``list<list<float32>>``, the atoms in the order of ``atom_symbols``: the
input's, as the SMILES or SDF record was given) for each space the network gives per atom. The
schema's metadata key ``flexmol`` holds the run's description as JSON (checkpoint, recipe,
modality, dim, spaces, atom_spaces).

NPY (``--out FILE.npy``; every file loads with ``np.load(allow_pickle=False)``):

- ``FILE.npy``: float32 [n, d], the first space asked for; ``STEM.<space>.npy`` for each other one;
- ``STEM.ids.tsv``: a header ``id<TAB>smiles`` and one row per molecule, in the arrays' order
  (CSV quoting where an id holds a tab, a quote or a line break);
- with ``--atoms``: ``STEM.atoms.npy`` float32 [sum n_i, d] (the first space with a per-atom form;
  ``STEM.<space>.atoms.npy`` for the others), ``STEM.offsets.npy`` int64 [n + 1] (molecule i's
  atoms are rows ``offsets[i]:offsets[i + 1]``) and ``STEM.symbols.npy`` (their element symbols);
- ``STEM.json``: the description: rows, dimension, checkpoint, recipe, modality, and which file
  holds what.

Rejected inputs go to ``FILE.rejects.jsonl`` (one JSON object per input: index, id, input, code,
reason; in input order). Files are written under temporary names and renamed when the run ends.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

from flexmol.config import ConfigError

FORMATS = (".parquet", ".npy")
GEOMETRY_SUFFIXES = (".sdf", ".sd", ".mol")


def add_parser(sub, _sub) -> None:
    """Adds `flexmol embed` to the CLI's subparsers (`_sub` makes a subparser with the CLI's help style)."""
    p = _sub(sub, "embed", "molecule (and atom) embeddings of molecules from a checkpoint, to Parquet or NPY",
             "Embed every molecule of INPUT with a pre-trained checkpoint of either recipe and write the embeddings "
             "with ids and canonical SMILES to --out (.parquet, or .npy with sidecar files: see the module "
             "flexmol.tools.embed). INPUT: a .smi/.txt, .csv/.tsv, .parquet or .sdf file (optionally .gz), a "
             "dataset directory written by `flexmol featurize` (read as stored, not featurised again) or a named "
             "set (b3db, moses, ...). Rejected inputs go to OUT.rejects.jsonl with their reasons. Exit 0 when "
             "molecules were embedded, 1 when none could be, 2 with one line for an input, checkpoint, option or "
             "output that cannot be used.")
    p.add_argument("input", help="file of molecules, featurised dataset directory, or named set")
    p.add_argument("--checkpoint", required=True, help="an export, or a pre-training output_dir with export/")
    p.add_argument("--out", required=True, help="FILE.parquet or FILE.npy")
    p.add_argument("--space", action="append", metavar="NAME",
                   help="embedding space to write (repeat for several; 'all' for every one; default: fused, the "
                        "embedding fine-tuning uses, where the input has it)")
    p.add_argument("--atoms", action="store_true", help="also write per-atom embeddings")
    p.add_argument("--modality", choices=("2d", "3d", "both"), default="2d",
                   help="input the network sees: the graph, the conformer, or both (where the checkpoint allows)")
    p.add_argument("--conformers", choices=("etkdg",),
                   help="generate a conformer (ETKDGv3 + MMFF94, seeded) for inputs without coordinates "
                        "(default: 3D only from an SDF's or a dataset's coordinates)")
    p.add_argument("--smiles-column", help="SMILES column of a CSV/TSV/Parquet input (default: found by name)")
    p.add_argument("--id-column", help="id column of a CSV/TSV/Parquet input or SDF property (default: the row)")
    p.add_argument("--limit", type=int, help="embed only the first N inputs")
    p.add_argument("--batch-size", type=int, default=256, help="molecules per batch at most")
    p.add_argument("--max-atoms", type=int, default=8192, help="padded atoms per batch at most")
    p.add_argument("--workers", type=int, default=0, help="featurising processes (0: every core)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_embed)


def _refuse(message: str) -> int:
    print(f"flexmol embed: {message}", file=sys.stderr)
    return 2


def cmd_embed(args: argparse.Namespace) -> int:
    from flexmol.tools.embedder import Embedder
    from flexmol.tools.inputs import InputError, iter_molecules

    out = Path(args.out)
    if out.suffix.lower() not in FORMATS:
        return _refuse(f"--out {out}: must end in {' or '.join(FORMATS)}")
    for key in ("batch_size", "max_atoms"):
        if getattr(args, key) < 1:
            return _refuse(f"--{key.replace('_', '-')} {getattr(args, key)}: must be at least 1")
    if args.workers < 0 or (args.limit is not None and args.limit < 0):
        return _refuse(f"--{'workers' if args.workers < 0 else 'limit'}: must be at least 0")
    source = Path(args.input)
    if args.modality != "2d" and args.conformers is None and source.is_file() and not any(
            s.lower() in GEOMETRY_SUFFIXES for s in source.suffixes):
        return _refuse(f"--modality {args.modality} needs coordinates: {args.input} is neither an SDF nor a "
                       "featurised dataset; add --conformers etkdg to generate them")
    try:
        embedder = Embedder(args.checkpoint, device=args.device, batch_size=args.batch_size, max_atoms=args.max_atoms,
                            workers=args.workers)
        have = embedder.spaces(args.modality)
        wanted = args.space or [embedder.default_space(args.modality)]
        spaces = list(have) if "all" in wanted else list(dict.fromkeys(wanted))
        unknown = [s for s in spaces if s not in have]
        if unknown:
            raise ConfigError(f"--space {unknown[0]}: {args.modality} input of {embedder.path} has the spaces "
                              f"{', '.join(have)} (or all)")
        meta = {"format": "flexmol-embeddings", "checkpoint": str(embedder.path), "recipe": embedder.recipe,
                "modality": args.modality, "dim": embedder.dim, "spaces": spaces}
        output = ParquetOutput if out.suffix.lower() == ".parquet" else NpyOutput
        rejects_path = Path(f"{out}.rejects.jsonl")
        _check_outputs(output(out, {**meta, "atom_spaces": spaces if args.atoms else []}).paths() + [rejects_path],
                       args.overwrite)
        writer = None
        chunks = iter_molecules(args.input, modality=args.modality, smiles_column=args.smiles_column,
                                id_column=args.id_column, limit=args.limit, conformers=args.conformers,
                                featurizer=embedder.featurizer, workers=args.workers, chunk=512)
        start = time.perf_counter()
        rejected: Counter = Counter()
        bar = None
        if not args.no_progress:
            from tqdm import tqdm

            bar = tqdm(total=args.limit, desc="embedding", unit=" mol", file=sys.stderr, dynamic_ncols=True)
        with _Staged(rejects_path, "w") as rej:
            try:
                for molecules, rejects in chunks:
                    for r in rejects:
                        rej.file.write(json.dumps(r.to_json(), ensure_ascii=True) + "\n")
                        rejected[r.code or "rejected"] += 1
                    if molecules:
                        emb = embedder.embed(molecules, args.modality, spaces, atoms=args.atoms)
                        if writer is None:  # which spaces have a per-atom form shows on the first batch
                            writer = output(out, {**meta, "atom_spaces": _atom_spaces(args, spaces, emb, embedder)})
                        writer.write(molecules, emb)
                    if bar is not None:
                        bar.update(len(molecules) + len(rejects))
                        bar.set_postfix(rejected=sum(rejected.values()), refresh=False)
                if writer is None:  # nothing to embed: the files, without rows
                    writer = output(out, {**meta, "atom_spaces": spaces if args.atoms else []})
                writer.close()
            finally:
                if writer is not None:
                    writer.discard()
                if bar is not None:
                    bar.close()
        seconds = time.perf_counter() - start
    except (ConfigError, InputError) as exc:
        return _refuse(str(exc))
    n, k = writer.rows, sum(rejected.values())
    per_atom = f"; per atom: {', '.join(writer.meta['atom_spaces'])}" if args.atoms else ""
    why = f" ({', '.join(f'{c} {code}' for code, c in rejected.most_common())})" if k else ""
    print(f"flexmol embed: {n} molecules embedded -> {out} ({', '.join(spaces)}; dim {embedder.dim}; "
          f"{args.modality} input{per_atom}); {k} rejected{why} -> {rejects_path}; "
          f"{n / max(seconds, 1e-9):.1f} molecules/s")
    return 0 if n else 1


def _atom_spaces(args, spaces: list[str], emb: dict, embedder) -> list[str]:
    """The spaces written per atom: those asked for that the network gives per atom (with
    ``--space all``, every such space; a space asked for by name that has no per-atom form is refused)."""
    if not args.atoms:
        return []
    have = [s for s in spaces if s in emb["atoms"]]
    flat = [s for s in spaces if s not in have]
    if not have or (flat and "all" not in (args.space or [])):
        raise ConfigError(f"--atoms: the space {flat[0]} of {embedder.path} has no per-atom form; ask for it "
                          "without --atoms, or for another --space")
    return have


def _check_outputs(paths: list[Path], overwrite: bool) -> None:
    """Refuse existing outputs (unless ``overwrite``) and a folder this process cannot write to."""
    existing = [p for p in paths if p.exists()]
    if existing and not overwrite:
        more = f" (and {len(existing) - 1} more output file(s))" if len(existing) > 1 else ""
        raise ConfigError(f"{existing[0]} exists{more}; add --overwrite to replace it")
    folder = paths[0].parent
    folder.mkdir(parents=True, exist_ok=True)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"{folder}: not writable")
    directory = next((p for p in existing if p.is_dir()), None)
    if directory is not None:
        raise ConfigError(f"{directory}: a directory, not an output file")


class _Staged:
    """A file written under a temporary name beside ``path`` and renamed to it by :meth:`commit`;
    removed if it was not committed."""

    def __init__(self, path: Path, mode: str = "wb"):
        self.path = path
        self.tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        self.mode = mode
        self.file = None

    def __enter__(self):
        self.file = open(self.tmp, self.mode, **({} if "b" in self.mode else {"encoding": "utf-8", "newline": ""}))
        return self

    def __exit__(self, exc_type, *_):
        self.file.close()
        if exc_type is None:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)
        return False


class ParquetOutput:
    """One row group per chunk of molecules (see the module's note for the columns)."""

    def __init__(self, path: Path, meta: dict):
        import pyarrow as pa

        self.path, self.meta, self.atoms, self.rows = path, meta, bool(meta["atom_spaces"]), 0
        fields = [pa.field("id", pa.string()), pa.field("smiles", pa.string())]
        fields += [pa.field(s, pa.list_(pa.float32())) for s in meta["spaces"]]
        if self.atoms:
            fields.append(pa.field("atom_symbols", pa.list_(pa.string())))
            fields += [pa.field(f"{s}_atoms", pa.list_(pa.list_(pa.float32()))) for s in meta["atom_spaces"]]
        self.schema = pa.schema(fields, metadata={"flexmol": json.dumps(meta)})
        self.tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        self.writer = None

    def paths(self) -> list[Path]:
        return [self.path]

    def write(self, molecules, emb: dict) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from flexmol.tools.embedder import symbols

        if self.writer is None:
            self.writer = pq.ParquetWriter(self.tmp, self.schema)
        columns = [pa.array([m.id for m in molecules], pa.string()),
                   pa.array([m.smiles for m in molecules], pa.string())]
        columns += [_lists(emb[s]) for s in self.meta["spaces"]]
        if self.atoms:
            counts = np.array([len(m.record["z"]) for m in molecules])
            offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
            z = np.concatenate([m.record["z"] for m in molecules])
            columns.append(pa.ListArray.from_arrays(offsets, pa.array(symbols(z), pa.string())))
            columns += [pa.ListArray.from_arrays(offsets, _lists(np.concatenate(emb["atoms"][s])))
                        for s in self.meta["atom_spaces"]]
        self.writer.write_table(pa.Table.from_arrays(columns, schema=self.schema))
        self.rows += len(molecules)

    def close(self) -> None:
        import pyarrow.parquet as pq

        if self.writer is None:  # no molecule: a file with the columns and no rows
            self.writer = pq.ParquetWriter(self.tmp, self.schema)
        self.writer.close()
        os.replace(self.tmp, self.path)

    def discard(self) -> None:
        self.tmp.unlink(missing_ok=True)


def _lists(a: np.ndarray):
    """A [rows, d] float32 array as a pyarrow list<float32> array (one list per row, no copy per row)."""
    import pyarrow as pa

    rows, d = a.shape
    return pa.ListArray.from_arrays(pa.array(np.arange(0, rows * d + 1, d, dtype=np.int32)),
                                    pa.array(np.ascontiguousarray(a, dtype=np.float32).ravel()))


class _NpyStream:
    """An ``.npy`` file of rows appended chunk by chunk: the rows go to a temporary file and the
    array (header, then the rows) is put together by :meth:`close`."""

    def __init__(self, path: Path, dtype, row_shape: tuple):
        self.path, self.dtype, self.row_shape, self.rows = path, np.dtype(dtype), tuple(row_shape), 0
        self.raw = path.with_name(f".{path.name}.rows{os.getpid()}")
        self.tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        self.file = open(self.raw, "wb")

    def append(self, a: np.ndarray) -> None:
        a = np.ascontiguousarray(a, dtype=self.dtype)
        self.file.write(a.tobytes())
        self.rows += len(a)

    def close(self) -> None:
        self.file.close()
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
                  "shape": (self.rows,) + self.row_shape}
        with open(self.tmp, "wb") as f, open(self.raw, "rb") as raw:
            np.lib.format.write_array_header_1_0(f, header)
            shutil.copyfileobj(raw, f, 1 << 22)
        self.raw.unlink()
        os.replace(self.tmp, self.path)

    def discard(self) -> None:
        if not self.file.closed:
            self.file.close()
        self.raw.unlink(missing_ok=True)
        self.tmp.unlink(missing_ok=True)


class NpyOutput:
    """``FILE.npy`` and its sidecar files (see the module's note)."""

    SYMBOL = "<U3"

    def __init__(self, path: Path, meta: dict):
        self.path, self.meta, self.atoms, self.rows = path, meta, bool(meta["atom_spaces"]), 0
        stem = path.with_suffix("")
        self.files = {s: path if i == 0 else Path(f"{stem}.{s}.npy") for i, s in enumerate(meta["spaces"])}
        self.ids = Path(f"{stem}.ids.tsv")
        self.described = Path(f"{stem}.json")
        if self.atoms:
            self.atom_files = {s: Path(f"{stem}.atoms.npy") if i == 0 else Path(f"{stem}.{s}.atoms.npy")
                               for i, s in enumerate(meta["atom_spaces"])}
            self.offsets, self.symbols = Path(f"{stem}.offsets.npy"), Path(f"{stem}.symbols.npy")
        self.streams = None
        self.id_file = None
        self.atom_count = 0

    def paths(self) -> list[Path]:
        out = list(self.files.values()) + [self.ids, self.described]
        if self.atoms:
            out += list(self.atom_files.values()) + [self.offsets, self.symbols]
        return out

    def _open(self) -> None:
        d = self.meta["dim"]
        self.streams = {s: _NpyStream(p, np.float32, (d,)) for s, p in self.files.items()}
        if self.atoms:
            self.streams.update({f"atoms:{s}": _NpyStream(p, np.float32, (d,)) for s, p in self.atom_files.items()})
            self.streams["offsets"] = _NpyStream(self.offsets, np.int64, ())
            self.streams["symbols"] = _NpyStream(self.symbols, self.SYMBOL, ())
            self.streams["offsets"].append(np.zeros(1, dtype=np.int64))
        self.id_file = _Staged(self.ids, "w").__enter__()
        self.tsv = csv.writer(self.id_file.file, delimiter="\t", lineterminator="\n")
        self.tsv.writerow(["id", "smiles"])

    def write(self, molecules, emb: dict) -> None:
        from flexmol.tools.embedder import symbols

        if self.streams is None:
            self._open()
        for s in self.meta["spaces"]:
            self.streams[s].append(emb[s])
        if self.atoms:
            counts = np.array([len(m.record["z"]) for m in molecules], dtype=np.int64)
            self.streams["offsets"].append(self.atom_count + np.cumsum(counts))
            self.atom_count += int(counts.sum())
            self.streams["symbols"].append(np.array(symbols(np.concatenate([m.record["z"] for m in molecules])),
                                                    dtype=self.SYMBOL))
            for s in self.meta["atom_spaces"]:
                self.streams[f"atoms:{s}"].append(np.concatenate(emb["atoms"][s]))
        self.tsv.writerows([m.id, m.smiles] for m in molecules)
        self.rows += len(molecules)

    def close(self) -> None:
        if self.streams is None:
            self._open()
        for stream in self.streams.values():
            stream.close()
        self.id_file.__exit__(None, None, None)
        # the files named relative to the description
        description = {**self.meta, "rows": self.rows, "files": {s: p.name for s, p in self.files.items()},
                       "ids": self.ids.name}
        if self.atoms:
            description.update(atoms={s: p.name for s, p in self.atom_files.items()}, offsets=self.offsets.name,
                               symbols=self.symbols.name, atom_rows=self.atom_count)
        with _Staged(self.described, "w") as f:
            f.file.write(json.dumps(description, indent=1) + "\n")

    def discard(self) -> None:
        for stream in (self.streams or {}).values():
            stream.discard()
        if self.id_file is not None and not self.id_file.file.closed:
            self.id_file.__exit__(RuntimeError, None, None)
