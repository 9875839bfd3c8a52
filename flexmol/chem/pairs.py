"""Shortest paths between the atoms of a molecular graph: what the 2D pair bias is made of.

For every atom pair (i, j) the model takes the topological distance (bonds on a shortest path)
and the bonds along one shortest path from i to j (Graphormer's multi-hop edge encoding). Both
follow from two n x n tables of a molecule, which depend on the graph alone, not on the model's
``max_spd`` or ``max_path``:

- ``dist[i, j]``: the distance in bonds, 0..254; :data:`FAR` (255) for 255 bonds or more, or no
  path at all (i and j in different fragments).
- ``path_bond[i, j]``: the last bond of a shortest path from i to j, the one that ends at j: of
  the bonds (k, j) with ``dist[i, k] == dist[i, j] - 1``, the one whose k is smallest. E (the
  number of bonds) where there is none: i == j, or ``dist[i, j] == FAR``.

Walking back from j (j, then the other end k of ``path_bond[i, j]``, then the other end of
``path_bond[i, k]`` ...) lists the bonds of the path from the j end, one step closer to i each
time.

The featuriser stores both tables, as uint8, in the 2D and paired records of molecules of up to
:data:`STORED_MAX_ATOMS` atoms (:func:`stored_tables`: distances from RDKit, path bonds by a
search suited to one molecule); collation computes them a batch at a time for records without
them (:func:`batch_distances`, :func:`path_bonds`). Both searches pick the same bond (the tests
compare them on real molecules), so a stored table and one computed while batching are the same.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

FAR = 255  # dist: 255 bonds or more, or no path
STORED_MAX_ATOMS = 128  # larger molecules get their tables while batching (stored: 2 x n^2 bytes)


def batch_distances(bonds: Sequence[np.ndarray], n: int, limit: int) -> np.ndarray:
    """Distances of a padded batch: ``bonds`` holds each molecule's [E, 2] atom pairs; returns
    uint8 [B, n, n] with the distances 0..``limit`` and :data:`FAR` beyond (``limit`` < 255).

    Breadth-first search from every atom of every molecule at once: one batched matrix product
    per distance, ``limit`` at most (stops early when no pair is left to reach). numpy's float32
    product takes 60 us for 80 molecules of 26 atoms; ``torch.bmm`` took 5.7 ms in a process
    whose two torch threads shared the two cores with loader workers."""
    b = len(bonds)
    adj = np.zeros((b, n, n), dtype=np.float32)
    mol = np.repeat(np.arange(b), [len(x) for x in bonds])
    ends = np.concatenate([np.asarray(x, dtype=np.int64).reshape(-1, 2) for x in bonds]) if b else np.zeros((0, 2), int)
    adj[mol, ends[:, 0], ends[:, 1]] = adj[mol, ends[:, 1], ends[:, 0]] = 1.0
    dist = np.full((b, n, n), FAR, dtype=np.uint8)
    reach = np.broadcast_to(np.eye(n, dtype=bool), (b, n, n)).copy()
    dist[reach] = 0
    frontier = reach.astype(np.float32)
    for d in range(1, limit + 1):
        new = (frontier @ adj > 0) & ~reach
        if not new.any():
            break
        dist[new] = d
        reach |= new
        frontier = new.astype(np.float32)
    return dist


def path_bonds(dist: np.ndarray, bonds: Sequence[np.ndarray]) -> np.ndarray:
    """``path_bond`` of a padded batch: ``dist`` uint8 [B, n, n] (:func:`batch_distances` or
    stored tables), ``bonds`` each molecule's [E, 2] atom pairs. Returns int32 [B, n, n], each
    molecule's own bond numbers (its E where there is none; anything in the padding).

    Each bond (k, j), taken both ways, ends a shortest path from i at j when
    ``dist[i, k] + 1 == dist[i, j]``; the bonds into each atom j are sorted by k, so the first
    that qualifies for a row i is the one with the smallest k. ``dist`` is symmetric (an
    undirected graph's): its rows are read for its columns, which are contiguous."""
    b, n = dist.shape[0], dist.shape[-1]
    sizes = np.array([len(x) for x in bonds], dtype=np.int64)
    out = np.broadcast_to(sizes.astype(np.int32)[:, None, None], (b, n, n)).copy()
    if not sizes.sum():
        return out
    ends = np.concatenate([np.asarray(x, dtype=np.int64).reshape(-1, 2) for x in bonds])
    ids = np.arange(len(ends)) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    mol = np.repeat(np.arange(b), sizes)
    # Both directions of every bond, grouped by (molecule, end atom j), smallest start atom k first.
    m2, k, j, e = (np.concatenate(p) for p in ((mol, mol), (ends[:, 0], ends[:, 1]), (ends[:, 1], ends[:, 0]), (ids, ids)))
    order = np.lexsort((k, j, m2))
    m2, k, j, e = m2[order], k[order], j[order], e[order]
    to_j = dist[m2, j].astype(np.int16)  # [2E, n]: from every atom i to each bond's end j
    ok = (dist[m2, k].astype(np.int16) + 1 == to_j) & (to_j < FAR)
    first = np.where(ok, np.arange(len(e))[:, None], len(e))
    starts = np.flatnonzero(np.r_[True, (m2[1:] != m2[:-1]) | (j[1:] != j[:-1])])
    first = np.minimum.reduceat(first, starts, axis=0)  # [groups, n]: the first bond that qualifies
    found = first < len(e)
    group_mol, group_j = m2[starts], j[starts]
    chosen = np.where(found, e[np.minimum(first, len(e) - 1)], sizes[group_mol][:, None])
    out[group_mol, :, group_j] = chosen
    return out


def stored_tables(dist: np.ndarray, bond_index: np.ndarray) -> Optional[dict]:
    """The pair fields a record stores: {"dist": uint8 [n, n], "path_bond": uint8 [n, n]} from a
    molecule's distance matrix (RDKit's ``GetDistanceMatrix``: bonds, 1e8 between fragments) and
    its bonds; None above :data:`STORED_MAX_ATOMS` atoms or with 255 bonds or more.

    One molecule, every (i, k, j) at once: k, a neighbour of j one step closer to i; the first
    such k (argmax) is the smallest, as :func:`path_bonds` picks. n^3 booleans (9 thousand for
    21 atoms, 2 million at the limit) in a dozen numpy calls: 75 us a MOSES molecule inside the
    featuriser, against 150 us for :func:`path_bonds`' search bond by bond on a batch of one."""
    n, e = len(dist), len(bond_index)
    if n > STORED_MAX_ATOMS or e >= FAR:
        return None
    d = np.minimum(dist, FAR).astype(np.uint8)
    bond = np.full((n, n), e, dtype=np.uint8)  # bond[k, j]: the bond joining k and j, e for none
    ends = np.asarray(bond_index, dtype=np.int64).reshape(-1, 2)
    bond[ends[:, 0], ends[:, 1]] = bond[ends[:, 1], ends[:, 0]] = np.arange(e)
    d16 = d.astype(np.int16)  # FAR + 1 is no distance: between fragments nothing is one step closer
    closer = (bond < e) & (d16[:, :, None] + 1 == d16[:, None, :])  # [i, k, j]
    k = closer.argmax(axis=1)
    return {"dist": d, "path_bond": np.where(closer.any(axis=1), bond[k, np.arange(n)], np.uint8(e)).astype(np.uint8)}


def table_problem(rec: dict) -> Optional[str]:
    """Why a record's stored ``dist`` and ``path_bond`` are not the tables of its bonds (None
    when they are): distances that are not those of the graph, or a path bond that does not end
    at its atom one step closer. Checks the tables' meaning, not just their shapes
    (:func:`flexmol.data.schema.validate` does those): a zero distance only from an atom to
    itself, every bond changes a distance by at most one, and every path bond descends by one;
    together these make ``dist`` the graph's distances. A record at a time, so tens of
    microseconds each: for inspection and for finding the record of a batch that failed."""
    dist, pb, bonds = rec["dist"], rec["path_bond"], np.asarray(rec["bond_index"], dtype=np.int64).reshape(-1, 2)
    n = len(dist)
    d = dist.astype(np.int16)
    if (np.diagonal(d) != 0).any() or (d == 0).sum() != n:
        return "dist is not zero exactly on its diagonal (an atom's distance to itself)"
    if (d != d.T).any():
        return "dist is not symmetric"
    if len(bonds) and (np.abs(d[:, bonds[:, 0]] - d[:, bonds[:, 1]]) > 1).any():
        return "dist is not the bonds' distances (a bond spans more than one step)"
    path = (d > 0) & (d < FAR)
    if (pb[~path] != len(bonds)).any():
        return f"path_bond is not {len(bonds)} (no bond) where dist has no path"
    i, j = np.nonzero(path)
    if len(i):
        e = pb[i, j].astype(np.int64)
        if (e >= len(bonds)).any():
            return "path_bond has no bond where dist has a path"
        u, v = bonds[e, 0], bonds[e, 1]
        k = np.where(u == j, v, u)
        if not ((u == j) | (v == j)).all() or (d[i, k] != d[i, j] - 1).any():
            return "path_bond is not a bond one step closer along a shortest path"
    return None
