"""Records -> padded batch tensors for the model, computed in the loader workers.

A batch holds one modality. Per molecule the worker computes the shortest-path distances and, for
every atom pair, the bonds along one shortest path (Graphormer's multi-hop edge encoding); batches
are filled up to an atom budget (padded atoms, the quantity memory follows), not a molecule count.
"""
from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np
import torch


def shortest_paths(num_atoms: int, bond_index: np.ndarray, max_path: int) -> tuple[np.ndarray, np.ndarray]:
    """(spd [n, n] int with -1 for unreachable, path_edges [n, n, max_path] bond indices along one
    shortest path from i to j, -1 padded; the first ``max_path`` bonds counted from j)."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import shortest_path

    n = num_atoms
    edges = np.asarray(bond_index, dtype=np.int64).reshape(-1, 2)
    adj = csr_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(n, n))
    dist, pred = shortest_path(adj, directed=False, unweighted=True, return_predecessors=True)
    spd = np.where(np.isfinite(dist), dist, -1).astype(np.int64)
    edge_id = np.full((n, n), -1, dtype=np.int64)
    edge_id[edges[:, 0], edges[:, 1]] = np.arange(len(edges))
    edge_id[edges[:, 1], edges[:, 0]] = np.arange(len(edges))
    paths = np.full((n, n, max_path), -1, dtype=np.int64)
    src = np.arange(n)[:, None].repeat(n, 1)
    cur = np.arange(n)[None, :].repeat(n, 0)
    for t in range(max_path):
        p = pred[src, cur]  # predecessor of cur on the path from src; negative when none
        ok = p >= 0
        paths[..., t] = np.where(ok, edge_id[np.where(ok, p, 0), cur], -1)
        cur = np.where(ok, p, cur)
    return spd, paths


def collate(records: list[dict], max_spd: int = 8, max_path: int = 5) -> dict:
    """Pad ``records`` (all of one modality) into the model's batch dict.

    Keys: ``modality``; ``mask`` [B, N] bool; ``z`` [B, N]; for graphs ``atom_feat`` [B, N, 9],
    ``spd`` [B, N, N] (classes 0..max_spd+1), ``path_edges`` [B, N, N, L] into ``edge_feat``
    [E, 3]; for 3D ``pos`` [B, N, 3] (the first conformer; a sampler picks others upstream).
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
        spd = np.full((b, n, n), max_spd + 1, dtype=np.int64)
        paths = np.full((b, n, n, max_path), -1, dtype=np.int64)
        edge_feats, offset = [], 0
        for i, r in enumerate(records):
            k = sizes[i]
            feat[i, :k] = r["atom_feat"]
            s, p = shortest_paths(k, r["bond_index"], max_path)
            s[s < 0] = max_spd + 1
            spd[i, :k, :k] = np.minimum(s, max_spd + 1)
            paths[i, :k, :k] = np.where(p >= 0, p + offset, -1)
            edge_feats.append(np.asarray(r["bond_feat"], dtype=np.int64).reshape(-1, 3))
            offset += len(edge_feats[-1])
        batch["atom_feat"] = torch.from_numpy(feat)
        batch["spd"] = torch.from_numpy(spd)
        batch["path_edges"] = torch.from_numpy(paths)
        batch["edge_feat"] = torch.from_numpy(np.concatenate(edge_feats) if edge_feats else np.zeros((0, 3), np.int64))
    if modality in ("paired", "3d"):
        pos = np.zeros((b, n, 3), dtype=np.float32)
        for i, r in enumerate(records):
            pos[i, : sizes[i]] = r["pos"][0]
        batch["pos"] = torch.from_numpy(pos)
    return batch


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
