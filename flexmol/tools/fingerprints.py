"""ECFP4 fingerprints (Morgan, radius 2, 2048 bits) packed eight bits to a byte, and exact Tanimoto
similarity over them: the familiar baseline next to which embedding retrieval is shown.

A library's fingerprints are one ``uint8`` array of shape ``[N, 256]`` (``numpy.packbits`` of RDKit's
bit vector, bit 0 first within the array's most significant bit, as packbits orders them), saved as
NPY. Tanimoto similarity is counted with a vectorised popcount over 64-bit words, in blocks of rows
so that a library of millions is searched in bounded memory; it equals RDKit's
``BulkTanimotoSimilarity`` on the same molecules (two empty fingerprints have similarity 0, as in
RDKit).
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

RADIUS = 2
BITS = 2048
BYTES = BITS // 8
_BLOCK = 1 << 16  # library rows per popcount block


def _generator():
    from rdkit.Chem import rdFingerprintGenerator

    return rdFingerprintGenerator.GetMorganGenerator(radius=RADIUS, fpSize=BITS)


def ecfp4(mols: Iterable) -> np.ndarray:
    """Packed ECFP4 fingerprints ``[N, 256]`` uint8 of RDKit molecules, in order."""
    gen = _generator()
    rows = [np.packbits(gen.GetFingerprintAsNumPy(m)) for m in mols]
    return np.stack(rows) if rows else np.zeros((0, BYTES), np.uint8)


def ecfp4_smiles(smiles: Iterable[str]) -> np.ndarray:
    """:func:`ecfp4` of SMILES RDKit parses (the caller has checked they do: a SMILES RDKit
    rejects raises ``ValueError`` naming it)."""
    from rdkit import Chem

    mols = []
    for s in smiles:
        mol = Chem.MolFromSmiles(s)
        if mol is None:
            raise ValueError(f"RDKit cannot parse {s!r}")
        mols.append(mol)
    return ecfp4(mols)


def popcount(packed: np.ndarray) -> np.ndarray:
    """Bits set in each row of a packed fingerprint array (int32 ``[N]``)."""
    return np.bitwise_count(_words(packed)).sum(axis=1, dtype=np.int32)


def _words(packed: np.ndarray) -> np.ndarray:
    packed = np.ascontiguousarray(packed, dtype=np.uint8)
    if packed.ndim != 2 or packed.shape[1] != BYTES:
        raise ValueError(f"packed fingerprints must be [N, {BYTES}] uint8, got {packed.shape}")
    return packed.view(np.uint64)


def tanimoto(query: np.ndarray, library: np.ndarray, library_counts: np.ndarray | None = None) -> np.ndarray:
    """Tanimoto similarity float32 ``[Q, N]`` of packed query fingerprints ``[Q, 256]`` against a
    packed library ``[N, 256]`` (``library_counts``: its :func:`popcount`, when already known)."""
    lib = _words(library)
    lc = popcount(library) if library_counts is None else library_counts
    return np.stack([_against(q, lib, lc) for q in _words(query)]) if len(query) else np.zeros((0, len(lib)), np.float32)


def tanimoto_top_k(query: np.ndarray, library: np.ndarray, k: int,
                   library_counts: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(rows, similarities) of the ``k`` library rows most Tanimoto-similar to each packed query
    fingerprint, exactly, most similar first (ties: the lower row first); ``[Q, min(k, N)]`` each.
    Memory stays at one similarity row of the library per query."""
    lib = _words(library)
    lc = popcount(library) if library_counts is None else library_counts
    rows, sims = [], []
    for q in _words(query):
        r, s = top_k(_against(q, lib, lc)[None], k)
        rows.append(r[0])
        sims.append(s[0])
    k = min(k, len(lib))
    if not rows:
        return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
    return np.stack(rows), np.stack(sims)


def _against(q: np.ndarray, lib: np.ndarray, lib_counts: np.ndarray) -> np.ndarray:
    """Tanimoto similarity float32 ``[N]`` of one query (64-bit words) against library words, in
    blocks of rows."""
    qc = int(np.bitwise_count(q).sum())
    out = np.empty(len(lib), np.float32)
    for start in range(0, len(lib), _BLOCK):
        both = np.bitwise_count(lib[start:start + _BLOCK] & q).sum(axis=1, dtype=np.int32)
        union = qc + lib_counts[start:start + _BLOCK] - both
        out[start:start + _BLOCK] = np.where(union > 0, both / np.maximum(union, 1), 0.0)
    return out


def top_k(similarity: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, similarities) of the ``k`` highest values of each row of ``similarity`` ``[Q, N]``,
    highest first, ties broken by the lower column; ``[Q, min(k, N)]`` each."""
    q, n = similarity.shape
    k = min(k, n)
    rows, sims = np.zeros((q, k), np.int64), np.zeros((q, k), np.float32)
    if k == 0:
        return rows, sims
    for i, sim in enumerate(similarity):
        # Every column at least as high as the k-th highest value: the k-th may be tied with
        # columns a partition would leave out, and the lower columns win ties.
        kth = np.partition(sim, n - k)[n - k]
        cand = np.flatnonzero(sim >= kth)
        order = np.lexsort((cand, -sim[cand]))[:k]
        rows[i], sims[i] = cand[order], sim[cand[order]]
    return rows, sims
