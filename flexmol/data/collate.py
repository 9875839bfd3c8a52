"""Records -> padded batch tensors for the model, computed in the loader workers.

A batch holds one modality; batches are filled up to an atom budget (padded atoms, the quantity
memory follows), not a molecule count. Each field is one concatenation of the records' arrays
scattered through the batch's atom mask: no Python loop over atoms or pairs.

The 2D pair inputs (shortest-path distances and, for every atom pair, the bonds along one
shortest path: Graphormer's multi-hop edge encoding) come from two tables per molecule
(:mod:`flexmol.chem.pairs`), stored in the record by the featuriser or computed here, a batch at
a time, for records without them. The path bonds are then ``max_path`` gathers over the batch.

Crossing from a loader worker to the training process costs per tensor (a shared-memory segment
and a file descriptor passed for each) and per byte. So a batch's tensors are views of one
buffer, sent as one segment (the training process's CPU time per batch of 80 MOSES-sized
molecules: 1.0-1.5 ms against 2.2-2.5 ms for seven tensors, measured), and a batch made in a
worker is compact (``collate(compact=...)``: uint8 features and distances, int32 path bonds;
1.2 MB against 2.7 MB for that batch); :func:`move` gives the model int64 indices on its device.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np
import torch

from flexmol.chem.pairs import FAR, batch_distances, path_bonds


def collate(records: list[dict], max_spd: int = 8, max_path: int = 5, pairs: bool = True,
            compact: Optional[bool] = None, labels: Sequence[str] = ()) -> dict:
    """Pad ``records`` (all of one modality) into the model's batch dict.

    Keys: ``modality``; ``mask`` [B, N] bool; ``z`` [B, N]; ``num_atoms`` [B]; for graphs
    ``atom_feat`` [B, N, 9], ``spd`` [B, N, N] (classes 0..max_spd+1), ``path_edges``
    [B, N, N, max_path] into ``edge_feat`` [E, 3] (the bonds of one shortest path from i to j,
    counted from j, -1 padded; none for pairs farther than max_spd); for 3D ``pos`` [B, N, 3]
    (the first conformer; a sampler picks others upstream). With ``pairs=False`` the pair
    tensors (``spd``, ``path_edges``, ``edge_feat``) are left out. With ``labels`` (keys of the
    records' ``labels`` maps), ``labels`` [B, L] float32 holds them in that order, NaN where a
    record lacks the key or holds None (a missing value).

    Integer tensors are int64, or with ``compact`` (by default: when called in a DataLoader
    worker, whose batches go to another process) uint8 where the records' values are, uint8
    ``spd`` and int32 ``path_edges``; :func:`move` widens them. A ValueError says why a batch
    cannot be made (mixed modalities; a record whose stored pair tables do not follow its bonds, or
    whose label is not a finite number, named by its key).
    """
    modalities = {r["modality"] for r in records}
    if len(modalities) != 1:
        raise ValueError(f"a batch holds one modality, got {sorted(modalities)}")
    if not 0 <= max_spd < FAR:
        raise ValueError(f"max_spd {max_spd}: distances are counted from 0 to {FAR - 1} bonds")
    if compact is None:
        compact = torch.utils.data.get_worker_info() is not None
    modality = modalities.pop()
    graph, geometry = modality in ("paired", "2d"), modality in ("paired", "3d")
    sizes = np.fromiter((len(r["z"]) for r in records), dtype=np.int64, count=len(records))
    b, n = len(records), int(sizes.max())

    def ints(arrays):  # an integer field's type: uint8 only where every record's is (no value lost)
        return np.uint8 if compact and all(a.dtype == np.uint8 for a in arrays) else np.int64

    z = [r["z"] for r in records]
    fields = {"mask": ((b, n), np.bool_), "num_atoms": ((b,), np.int64), "z": ((b, n), ints(z))}
    if graph:
        feat = [r["atom_feat"] for r in records]
        fields["atom_feat"] = ((b, n, 9), ints(feat))
        if pairs:
            bonds = [np.asarray(r["bond_index"]).reshape(-1, 2) for r in records]
            bond_feat = [np.asarray(r["bond_feat"]).reshape(-1, 3) for r in records]
            fields["spd"] = ((b, n, n), np.uint8 if compact else np.int64)
            fields["path_edges"] = ((b, n, n, max_path), np.int32 if compact else np.int64)
            fields["edge_feat"] = ((sum(len(x) for x in bonds), 3), ints(bond_feat))
    if geometry:
        fields["pos"] = ((b, n, 3), np.float32)
    if labels:
        fields["labels"] = ((b, len(labels)), np.float32)
    tensors = _one_buffer(fields)
    out = {k: t.numpy() for k, t in tensors.items()}

    mask = out["mask"]
    np.less(np.arange(n), sizes[:, None], out=mask)
    out["num_atoms"][:] = sizes
    _pad(mask, z, out["z"])
    if graph:
        _pad(mask, feat, out["atom_feat"])
        if pairs:
            np.concatenate(bond_feat, out=out["edge_feat"])
            _pair_tensors(records, bonds, mask, max_spd, out["spd"], out["path_edges"])
    if geometry:
        _pad(mask, [r["pos"][0] for r in records], out["pos"])
    if labels:
        _labels(records, labels, out["labels"])
    return {"modality": modality, **tensors}


def _labels(records: list[dict], keys: Sequence[str], out: np.ndarray) -> None:
    """``out`` [B, L]: each record's ``labels[key]``, NaN where the key is absent or None (a NaN
    stored as the value reads as missing too); a value that is not a finite number is a
    ValueError naming the record and the key (:func:`label_problem`)."""
    out[...] = np.nan
    for b, r in enumerate(records):
        why = label_problem(r, keys)
        if why:
            raise ValueError(f"{_name(r)}: {why}")
        values = r.get("labels") or {}
        for j, key in enumerate(keys):
            if values.get(key) is not None:
                out[b, j] = values[key]


def label_problem(record: dict, keys: Sequence[str]) -> Optional[str]:
    """Why ``record``'s labels under ``keys`` cannot go into a batch (None when they can): a value
    that is neither None nor a finite number (a word, a boolean, an infinity)."""
    values = record.get("labels") or {}
    if not isinstance(values, dict):
        return "labels is not a map"
    for key in keys:
        v = values.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or np.isinf(v)):
            return f"label {key!r} is {v!r}, not a finite number"
    return None


def _one_buffer(fields: dict) -> dict[str, torch.Tensor]:
    """Uninitialised tensors {name: (shape, numpy dtype)}, views of one byte buffer, each at an
    offset aligned to 8 bytes."""
    offsets, total = {}, 0
    for k, (shape, dt) in fields.items():
        offsets[k] = total
        total += -(-int(np.prod(shape)) * np.dtype(dt).itemsize // 8) * 8
    buffer = torch.empty(total, dtype=torch.uint8)
    return {k: buffer[offsets[k]:offsets[k] + int(np.prod(shape)) * np.dtype(dt).itemsize].view(_TORCH[np.dtype(dt)])
            .view(shape) for k, (shape, dt) in fields.items()}


_TORCH = {np.dtype(np.bool_): torch.bool, np.dtype(np.uint8): torch.uint8, np.dtype(np.int32): torch.int32,
          np.dtype(np.int64): torch.int64, np.dtype(np.float32): torch.float32}


def _pad(mask: np.ndarray, arrays: list[np.ndarray], out: np.ndarray) -> None:
    """``out`` [B, N, ...]: each molecule's [n_b, ...] array, zero-padded (``mask`` [B, N] marks
    the atoms; its row-major order is the records' order)."""
    out[...] = 0
    out[mask] = np.concatenate(arrays)


def _pair_tensors(records: list[dict], bonds: list[np.ndarray], mask: np.ndarray, max_spd: int,
                  spd: np.ndarray, path_edges: np.ndarray) -> None:
    """Fill ``spd`` [B, N, N] and ``path_edges`` [B, N, N, L]."""
    dist, path_bond = _tables(records, bonds, mask, max_spd)
    num_bonds = np.fromiter((len(x) for x in bonds), dtype=np.int64, count=len(bonds))
    nxt, bond = _steps(records, dist, path_bond, bonds, num_bonds, check=any("dist" in r for r in records))
    np.minimum(dist, max_spd + 1, out=spd)
    d = dist.ravel()
    b, n, _ = dist.shape
    # Each pair's walk from j towards i takes one path bond per step; at i (bond -1, next entry
    # itself) it stays. Pairs farther than max_spd start where a walk ends.
    row = np.arange(b * n)[:, None]  # (b, i): entry (b, i, i) is row * n + i
    cur = np.where(d <= max_spd, np.arange(d.size), np.broadcast_to(row * n + row % n, (b * n, n)).ravel())
    steps = path_edges.reshape(d.size, -1)
    for t in range(steps.shape[1]):
        steps[:, t] = bond[cur]
        if t + 1 < steps.shape[1]:
            cur = nxt[cur]


def _tables(records: list[dict], bonds: list[np.ndarray], mask: np.ndarray, max_spd: int):
    """Padded ``dist`` uint8 and ``path_bond`` int32 [B, N, N] (:mod:`flexmol.chem.pairs`), each
    molecule's own bond numbers; the padding: distance FAR off the diagonal, 0 on it."""
    b, n = mask.shape
    stored = np.fromiter(("dist" in r for r in records), dtype=bool, count=b)
    dist = np.full((b, n, n), FAR, dtype=np.uint8)
    dist.reshape(b, -1)[:, ::n + 1] = 0
    path_bond = np.zeros((b, n, n), dtype=np.int32)
    if stored.any():
        rows = np.flatnonzero(stored)
        pairs = mask[rows, :, None] & mask[rows, None, :]
        d, p = dist[rows], path_bond[rows]
        d[pairs] = np.concatenate([records[i]["dist"].ravel() for i in rows])
        p[pairs] = np.concatenate([records[i]["path_bond"].ravel() for i in rows])
        dist[rows], path_bond[rows] = d, p
    if not stored.all():
        rows = np.flatnonzero(~stored)
        sub = [bonds[i] for i in rows]
        d = batch_distances(sub, n, max_spd)
        dist[rows], path_bond[rows] = d, path_bonds(d, sub)
    return dist, path_bond


def _steps(records, dist, path_bond, bonds, num_bonds, check: bool) -> tuple[np.ndarray, np.ndarray]:
    """One step of every walk, as flat tables over [B, N, N]: ``nxt``, the entry (b, i, k) one
    step closer to i than (b, i, j) (itself where no path bond leaves j); ``bond``, the batch's
    number of the bond (k, j) taken (-1 where none).

    With ``check`` (stored tables: data, not computed here), a path bond that is not a bond of
    its molecule ending at j, one step closer to i, is a ValueError naming the record."""
    b, n, _ = dist.shape
    has = (dist - np.uint8(1)) < FAR - 1  # distances 1..254: a path bond leaves j
    # Each molecule's bond ends, and one row of (-1, -1) after its last: a path bond number that
    # is not one of its bonds ends at no atom.
    rows = int(num_bonds.max()) + 1
    ends = np.full((b, rows, 2), -1, dtype=np.int32)
    ends[np.repeat(np.arange(b), num_bonds), np.concatenate([np.arange(k) for k in num_bonds])] = np.concatenate(bonds)
    local = np.minimum(path_bond, num_bonds[:, None, None].astype(np.int32))
    e = (local + (np.arange(b, dtype=np.int32) * rows)[:, None, None]).ravel()
    u, v = ends[..., 0].ravel()[e].reshape(dist.shape), ends[..., 1].ravel()[e].reshape(dist.shape)
    j = np.arange(n, dtype=np.int32)
    ok = has & ((u == j) | (v == j)) if check else has
    k = np.where(ok, u + v - j, j)
    nxt = (k + (np.arange(b * n, dtype=np.int32) * n).reshape(b, n, 1)).ravel()
    if check:
        d = dist.ravel()
        bad = (has & ~ok).ravel() | (ok.ravel() & (d[nxt] + np.uint8(1) != d))
        if bad.any():
            raise ValueError(f"{_name(records[int(np.flatnonzero(bad)[0]) // (n * n)])}: its path_bond table does not "
                             "follow its bonds and dist (a path bond that does not end one step closer along a "
                             "shortest path)")
        # With the descent above, these make dist the graph's distances (flexmol.chem.pairs.table_problem)
        # (on the stored tables only: computed ones stop counting at max_spd)
        stored = np.fromiter(("dist" in r for r in records), dtype=bool, count=b)
        wrong = (dist != dist.transpose(0, 2, 1)).any(axis=(1, 2)) | ((dist == 0).sum(axis=(1, 2)) != n)
        mol = np.repeat(np.arange(b), num_bonds)
        both = np.concatenate(bonds).astype(np.int64) if len(mol) else np.zeros((0, 2), dtype=np.int64)
        span = np.abs(dist[mol, :, both[:, 0]].astype(np.int16) - dist[mol, :, both[:, 1]]) > 1  # [bonds, N]
        np.logical_or.at(wrong, mol, span.any(axis=1))
        wrong &= stored
        if wrong.any():
            raise ValueError(f"{_name(records[int(np.flatnonzero(wrong)[0])])}: its dist table is not the distances "
                             "of its bonds (not symmetric, a zero off the diagonal, or a bond spanning more than "
                             "one step)")
    first = (np.cumsum(num_bonds) - num_bonds).astype(np.int32)[:, None, None]
    return nxt, np.where(ok, local + first, -1).ravel()


def _name(record: dict) -> str:
    if "__url__" in record:
        return f"record {record['__key__']} of {Path(record['__url__']).name}"
    return f"molecule {record.get('id', '?')!r}"


def atom_budget_batches(records: Iterable[dict], max_atoms: int) -> Iterator[list[dict]]:
    """Group a stream into lists whose padded size (molecules x largest molecule) stays within
    ``max_atoms``; one modality per list (records of another modality wait in their own buffer)."""
    buffers: dict[str, list[dict]] = {}
    largest: dict[str, int] = {}
    for r in records:
        m, k = r["modality"], len(r["z"])
        buf = buffers.setdefault(m, [])
        big = max(largest.get(m, 0), k)
        if buf and (len(buf) + 1) * big > max_atoms:
            yield buf
            buf = buffers[m] = []
            big = k
        buf.append(r)
        largest[m] = big
    for buf in buffers.values():
        if buf:
            yield buf


def move(batch: dict, device: torch.device | str, dtype: torch.dtype | None = None) -> dict:
    """``batch`` on ``device``: integer tensors as int64 (a compact batch is widened there, after
    the copy), floating-point ones as ``dtype`` when given."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device)
            if v.is_floating_point():
                if dtype is not None:
                    v = v.to(dtype)
            elif v.dtype not in (torch.bool, torch.int64):
                v = v.long()
        out[k] = v
    return out
