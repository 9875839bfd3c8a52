"""Input representations (the paper's "2D / 3D molecule features").

2D: atom embedding x [B, N, d] and pair bias P [B, N, N, H] from the graph.
3D: atom embedding y [B, N, d] and pair bias Q [B, N, N, H] from interatomic distances only, so
both are invariant to rotating and translating the conformer.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from flexmol.chem.vocab import ATOM_FEATURE_SIZES, BOND_FEATURE_SIZES

NUM_ELEMENTS = ATOM_FEATURE_SIZES[0]  # atomic numbers 0..118; 0 is padding
MASK_Z = NUM_ELEMENTS  # the 3D input's [MASK] atom type; in 2D a masked atom is AtomEmbedding2D's mask token
NUM_TYPES = NUM_ELEMENTS + 1


class AtomEmbedding2D(nn.Module):
    """x_i = sum of one embedding per categorical atom feature. The degree column is the
    centrality embedding of Graphormer, already one of the features.

    A masked atom (``atom_masked`` [B, N] True) is masked whole, as in Uni-Mol and Transformer-M:
    its token is the learned ``mask_token`` [d] instead of the sum, so none of its categorical
    features (degree, H count, charge, hybridisation, aromaticity... which give the element away)
    reaches the model. Without ``atom_masked`` (fine-tuning, inference) the token is the sum.

    State dict: ``mask_token`` is the one parameter besides the feature tables. Exports written
    before it existed still load (strictly): the missing entry keeps its initial value, which only
    pre-training with masked atoms ever reads.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.tables = nn.ModuleList(nn.Embedding(n, dim) for n in ATOM_FEATURE_SIZES)
        self.mask_token = nn.Parameter(torch.randn(dim))  # the scale of nn.Embedding's init

    def forward(self, atom_feat: torch.Tensor, atom_masked: torch.Tensor | None = None) -> torch.Tensor:
        # atom_feat: [B, N, 9] long -> [B, N, d]; atom_masked: [B, N] bool or None
        x = sum(t(atom_feat[..., k]) for k, t in enumerate(self.tables))
        if atom_masked is None:
            return x
        return torch.where(atom_masked.unsqueeze(-1), self.mask_token.to(x.dtype), x)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "mask_token"
        if key not in state_dict and any(k.startswith(prefix + "tables.") for k in state_dict):
            state_dict[key] = self.mask_token.detach().clone()  # an export from before the mask token
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class PairBias2D(nn.Module):
    """P_ij = SPD embedding + mean edge embedding along one shortest path (Graphormer)."""

    def __init__(self, heads: int, max_spd: int):
        super().__init__()
        self.spd = nn.Embedding(max_spd + 2, heads)  # 0..max_spd and "farther / unreachable"
        self.edge = nn.ModuleList(nn.Embedding(n, heads) for n in BOND_FEATURE_SIZES)

    def forward(self, spd: torch.Tensor, path_edges: torch.Tensor, edge_feat: torch.Tensor) -> torch.Tensor:
        # spd [B, N, N]; path_edges [B, N, N, L] indices into edge_feat (-1 = none); edge_feat [E, 3]
        bias = self.spd(spd)
        if edge_feat.numel():
            e = sum(t(edge_feat[:, k]) for k, t in enumerate(self.edge))  # [E, H]
            valid = path_edges >= 0
            gathered = e[path_edges.clamp(min=0)] * valid.unsqueeze(-1)  # [B, N, N, L, H]
            count = valid.sum(-1, keepdim=True).clamp(min=1)
            bias = bias + gathered.sum(-2) / count
        return bias


class GaussianKernels(nn.Module):
    """psi(i, j) in R^K: K Gaussian basis functions of the distance after an affine transform
    learned per atom-pair type (Uni-Mol's GaussianLayer)."""

    def __init__(self, num_kernels: int):
        super().__init__()
        self.mul = nn.Embedding(NUM_TYPES * NUM_TYPES, 1)
        self.bias = nn.Embedding(NUM_TYPES * NUM_TYPES, 1)
        self.means = nn.Parameter(torch.empty(num_kernels).uniform_(0, 3))
        self.stds = nn.Parameter(torch.empty(num_kernels).uniform_(0, 3))
        nn.init.constant_(self.mul.weight, 1.0)
        nn.init.constant_(self.bias.weight, 0.0)

    def forward(self, dist: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        pair_type = z.unsqueeze(-1) * NUM_TYPES + z.unsqueeze(-2)  # [B, N, N]
        x = self.mul(pair_type).squeeze(-1) * dist + self.bias(pair_type).squeeze(-1)
        std = self.stds.abs() + 1e-2
        x = x.unsqueeze(-1).float()
        psi = torch.exp(-0.5 * ((x - self.means) / std) ** 2) / (math.sqrt(2 * math.pi) * std)
        return psi.type_as(dist)


class Input3D(nn.Module):
    """y = atom-type embedding + 3D centrality sum_j psi(i, j) W_D; Q = MLP(psi)."""

    def __init__(self, dim: int, heads: int, num_kernels: int):
        super().__init__()
        self.atom = nn.Embedding(NUM_TYPES, dim, padding_idx=0)
        self.kernels = GaussianKernels(num_kernels)
        self.pair = nn.Sequential(nn.Linear(num_kernels, num_kernels), nn.GELU(), nn.Linear(num_kernels, heads))
        self.centrality = nn.Linear(num_kernels, dim, bias=False)

    def forward(self, z: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist = torch.cdist(pos, pos)  # [B, N, N], from distances only: SE(3)-invariant
        pair_mask = (mask.unsqueeze(-1) & mask.unsqueeze(-2)).unsqueeze(-1)
        psi = self.kernels(dist, z) * pair_mask
        y = self.atom(z) + self.centrality(psi.sum(dim=2))
        return y, self.pair(psi)
