"""The individual losses, each on padded tensors with masks."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from flexmol.model.heads import masked_mean


class ContrastiveLoss(torch.nn.Module):
    """L_cl: symmetric InfoNCE between the projected, pooled 2D and 3D encoder outputs of the same
    molecule, against the other molecules of the batch."""

    def __init__(self, temperature: float = 0.1):
        super().__init__()
        self.temperature = temperature

    def forward(self, z2d: torch.Tensor, z3d: torch.Tensor) -> torch.Tensor:
        a, b = F.normalize(z2d.float(), dim=-1), F.normalize(z3d.float(), dim=-1)
        logits = a @ b.T / self.temperature
        target = torch.arange(len(a), device=a.device)
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def atom_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over real atoms ([B, N, d] with mask [B, N])."""
    err = (pred.float() - target.float()).pow(2).mean(-1)
    return (err * mask).sum() / mask.sum().clamp(min=1)


def pair_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over real atom pairs ([B, N, N, ...] with atom mask [B, N])."""
    pm = (mask.unsqueeze(-1) & mask.unsqueeze(-2)).float()
    err = (pred.float() - target.float()).pow(2)
    if err.dim() == 4:
        err = err.mean(-1)
    return (err * pm).sum() / pm.sum().clamp(min=1)


def pooled(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return masked_mean(h, mask)
