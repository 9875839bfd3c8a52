"""Records -> padded batch tensors for the model, computed in the loader workers.

A batch holds one modality. For the whole batch at once the worker computes shortest-path distances and,
for every atom pair, the bonds along one shortest path (Graphormer's multi-hop edge encoding); batches
are filled up to an atom budget (padded atoms, the quantity memory follows), not a molecule count.
"""
from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np
import torch


def batch_shortest_paths(adj: np.ndarray, edge_id: np.ndarray, max_spd: int, max_path: int) -> tuple[np.ndarray, np.ndarray]:
    """Shortest paths of a whole padded batch at once.

    ``adj`` [B, N, N] bool, ``edge_id`` [B, N, N] bond index of each adjacent pair (-1 elsewhere).
    Returns ``spd`` [B, N, N] (0..max_spd, max_spd + 1 for farther or unreachable) and
    ``path_edges`` [B, N, N, max_path]: the bonds along one shortest path from i to j, counted
    from j, -1 padded (pairs farther than max_spd get none).

    Breadth-first search as batched boolean matrix products, then one predecessor per pair; ~20x
    faster than a per-molecule graph search at drug-like sizes, as the loader workers need.
    """
    b, n, _ = adj.shape
    a = adj.astype(np.float32)
    spd = np.full((b, n, n), max_spd + 1, dtype=np.int64)
    eye = np.broadcast_to(np.eye(n, dtype=bool), (b, n, n))
    spd[eye] = 0
    reach = eye.copy()
    frontier = eye.astype(np.float32)
    for d in range(1, max_spd + 1):
        new = (frontier @ a > 0) & ~reach
        if not new.any():
            break
        spd[new] = d
        reach |= new
        frontier = new.astype(np.float32)
    # pred[b, i, j]: a neighbour k of j one step closer to i (cand is [B, i, k, j])
    cand = adj[:, None, :, :] & (spd[:, :, :, None] == spd[:, :, None, :] - 1) & (spd[:, :, None, :] <= max_spd)
    pred = cand.argmax(axis=2)
    has_pred = cand.any(axis=2)
    paths = np.full((b, n, n, max_path), -1, dtype=np.int64)
    bi = np.arange(b)[:, None, None]
    cur = np.broadcast_to(np.arange(n)[None, None, :], (b, n, n)).copy()
    ok = has_pred
    for t in range(max_path):
        p = np.take_along_axis(pred, cur, axis=2)
        paths[..., t] = np.where(ok, edge_id[bi, p, cur], -1)
        cur = np.where(ok, p, cur)
        ok = ok & np.take_along_axis(has_pred, cur, axis=2)
    return spd, paths


def collate(records: list[dict], max_spd: int = 8, max_path: int = 5, pairs: bool = True) -> dict:
    """Pad ``records`` (all of one modality) into the model's batch dict.

    Keys: ``modality``; ``mask`` [B, N] bool; ``z`` [B, N]; for graphs ``atom_feat`` [B, N, 9],
    ``spd`` [B, N, N] (classes 0..max_spd+1), ``path_edges`` [B, N, N, L] into ``edge_feat``
    [E, 3]; for 3D ``pos`` [B, N, 3] (the first conformer; a sampler picks others upstream).
    With ``pairs=False`` the pair tensors (``spd``, ``path_edges``, ``edge_feat``) are left out.
    """
    modalities = {r["modality"] for r in records}
    if len(modalities) != 1:
        raise ValueError(f"a batch holds one modality, got {sorted(modalities)}")
    modality = modalities.pop()
    sizes = [len(r["z"]) for r in records]
    b, n = len(records), max(sizes)
    mask = np.zeros((b, n), dtype=bool)
    z = np.zeros((b, n), dtype=np.int64)
    for i, r in enumerate(records):
        mask[i, : sizes[i]] = True
        z[i, : sizes[i]] = r["z"]
    batch: dict = {"modality": modality, "mask": torch.from_numpy(mask), "z": torch.from_numpy(z),
                   "num_atoms": torch.tensor(sizes)}
    if modality in ("paired", "2d"):
        feat = np.zeros((b, n, 9), dtype=np.int64)
        for i, r in enumerate(records):
            feat[i, : sizes[i]] = r["atom_feat"]
        batch["atom_feat"] = torch.from_numpy(feat)
        if pairs:
            batch.update(_pair_tensors(records, b, n, max_spd, max_path))
    if modality in ("paired", "3d"):
        pos = np.zeros((b, n, 3), dtype=np.float32)
        for i, r in enumerate(records):
            pos[i, : sizes[i]] = r["pos"][0]
        batch["pos"] = torch.from_numpy(pos)
    return batch


def _pair_tensors(records: list[dict], b: int, n: int, max_spd: int, max_path: int) -> dict:
    adj = np.zeros((b, n, n), dtype=bool)
    edge_id = np.full((b, n, n), -1, dtype=np.int64)
    edge_feats, offset = [], 0
    for i, r in enumerate(records):
        bonds = np.asarray(r["bond_index"], dtype=np.int64).reshape(-1, 2)
        ids = np.arange(offset, offset + len(bonds))
        adj[i, bonds[:, 0], bonds[:, 1]] = adj[i, bonds[:, 1], bonds[:, 0]] = True
        edge_id[i, bonds[:, 0], bonds[:, 1]] = edge_id[i, bonds[:, 1], bonds[:, 0]] = ids
        edge_feats.append(np.asarray(r["bond_feat"], dtype=np.int64).reshape(-1, 3))
        offset += len(bonds)
    spd, paths = batch_shortest_paths(adj, edge_id, max_spd, max_path)
    return {"spd": torch.from_numpy(spd), "path_edges": torch.from_numpy(paths),
            "edge_feat": torch.from_numpy(np.concatenate(edge_feats))}


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
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device)
            if dtype is not None and v.is_floating_point():
                v = v.to(dtype)
        out[k] = v
    return out
