"""Pre-training heads on the multi-modal encoder, and the molecule embedding."""
from __future__ import annotations

import torch
from torch import nn

from flexmol.model.inputs import NUM_ELEMENTS


def symmetric(pair: torch.Tensor) -> torch.Tensor:
    return 0.5 * (pair + pair.transpose(1, 2))


class AtomTypeHead(nn.Module):
    """Logits over atomic numbers, for masked atoms."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.LayerNorm(dim), nn.Linear(dim, NUM_ELEMENTS))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)


class CoordinateHead(nn.Module):
    """SE(3)-equivariant coordinates: x_i + sum_j w_ij (x_i - x_j) / n, with w_ij a function of the
    (invariant) pair representation (Uni-Mol). Rotating and translating the input coordinates
    rotates and translates the output with them."""

    def __init__(self, heads: int):
        super().__init__()
        self.weight = nn.Sequential(nn.Linear(heads, heads), nn.GELU(), nn.Linear(heads, 1))

    def forward(self, pair: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        pair_mask = (mask.unsqueeze(-1) & mask.unsqueeze(-2)).to(pos.dtype)
        w = self.weight(pair).squeeze(-1).to(pos.dtype) * pair_mask  # [B, N, N]
        delta = pos.unsqueeze(2) - pos.unsqueeze(1)  # [B, N, N, 3]: x_i - x_j
        n = mask.sum(-1).clamp(min=1).to(pos.dtype)[:, None, None]
        return pos + (w.unsqueeze(-1) * delta).sum(2) / n


class SPDHead(nn.Module):
    """Shortest-path-distance class of every atom pair."""

    def __init__(self, heads: int, classes: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(heads, heads), nn.GELU(), nn.Linear(heads, classes))

    def forward(self, pair: torch.Tensor) -> torch.Tensor:
        return self.net(symmetric(pair))


class DistanceHead(nn.Module):
    """Euclidean distance of every atom pair, Å."""

    def __init__(self, heads: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(heads, heads), nn.GELU(), nn.Linear(heads, 1))

    def forward(self, pair: torch.Tensor) -> torch.Tensor:
        return self.net(symmetric(pair)).squeeze(-1)


def masked_mean(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real atoms: [B, N, d] -> [B, d]."""
    m = mask.unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1).clamp(min=1)
