"""The individual losses, each on padded tensors with masks."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from flexmol.model.heads import masked_mean

GATHER_CHOICES = ("auto", "on", "off")
# YAML (and so a ``key=value`` override) reads on / off as booleans, which a str key receives as
# "True" / "False".
_GATHER_ALIASES = {"true": "on", "false": "off"}


def gather_mode(value) -> str:
    """``objective.gather_negatives`` as one of auto, on, off; ValueError naming the key otherwise."""
    mode = str(value).strip().lower()
    mode = _GATHER_ALIASES.get(mode, mode)
    if mode not in GATHER_CHOICES:
        raise ValueError(f"config key 'objective.gather_negatives': {value!r} is not one of "
                         f"{', '.join(GATHER_CHOICES)}")
    return mode


def gather_enabled(value, group=None) -> bool:
    """Whether ``objective.gather_negatives`` = ``value`` gathers the other ranks' molecules:
    ``auto`` when torch.distributed is initialised with more than one rank, ``on`` always (an
    initialised process group is then required), ``off`` never."""
    mode = gather_mode(value)
    if mode == "off":
        return False
    ready = dist.is_available() and dist.is_initialized()
    if mode == "on":
        if not ready:
            raise RuntimeError("objective.gather_negatives=on needs an initialised torch.distributed "
                               "process group (use auto to gather only when there is one)")
        return True
    return ready and dist.get_world_size(group) > 1


def _symmetric_infonce_sum(a: torch.Tensor, b: torch.Tensor, all_a: torch.Tensor, all_b: torch.Tensor,
                           offset: int, temperature: float) -> torch.Tensor:
    """Sum over the rows of ``a``/``b`` (molecules offset..offset+n of the whole batch ``all_a`` /
    ``all_b``) of 0.5 * (CE of 2D i against every 3D + CE of 3D i against every 2D)."""
    target = torch.arange(offset, offset + len(a), device=a.device)
    with torch.autocast(a.device.type, enabled=False):  # logits / temperature in fp32, also under bf16
        rows = F.cross_entropy(a @ all_b.T / temperature, target, reduction="sum")
        cols = F.cross_entropy(b @ all_a.T / temperature, target, reduction="sum")
    return 0.5 * (rows + cols)


def _gather_rows(x: torch.Tensor, sizes: list[int], group) -> torch.Tensor:
    """Every rank's rows of ``x`` in rank order, with gradient: padded to the largest batch for the
    collective, the padding cut off again (ranks' batches differ in size: they fill an atom budget)."""
    from torch.distributed.nn.functional import all_gather

    padded = F.pad(x, (0, 0, 0, max(sizes) - len(x)))
    parts = all_gather(padded, group=group)  # backward sums every rank's gradient into ours
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


class ContrastiveLoss(torch.nn.Module):
    """L_cl: symmetric InfoNCE between the projected, pooled 2D and 3D encoder outputs of the same
    molecule, against the other molecules of the batch.

    With ``gather=True`` (data parallelism) the batch is every rank's molecules: the projections
    are gathered with gradient, as CLIP implementations do. Rank r's loss is
    ``W / N_total * sum over its own rows`` of the per-molecule terms, so the mean over the W ranks
    (what data-parallel gradient averaging computes) is the loss, and its gradient, of one process
    holding the concatenated batch of N_total molecules. Gathering is a collective: every rank
    computes this loss at the same micro-step (the mixing schedule draws the same source on every
    rank).
    """

    def __init__(self, temperature: float = 0.1, gather: bool = False, group=None):
        super().__init__()
        self.temperature = temperature
        self.gather = gather
        self.group = group

    def forward(self, z2d: torch.Tensor, z3d: torch.Tensor) -> torch.Tensor:
        a, b = F.normalize(z2d.float(), dim=-1), F.normalize(z3d.float(), dim=-1)
        if not self.gather:
            return _symmetric_infonce_sum(a, b, a, b, 0, self.temperature) / len(a)
        group, world = self.group, dist.get_world_size(self.group)
        counts = [torch.zeros(1, dtype=torch.long, device=a.device) for _ in range(world)]
        dist.all_gather(counts, torch.tensor([len(a)], dtype=torch.long, device=a.device), group=group)
        sizes = torch.cat(counts).tolist()  # one host sync: the padding needs the sizes
        all_a, all_b = _gather_rows(a, sizes, group), _gather_rows(b, sizes, group)
        offset = sum(sizes[: dist.get_rank(group)])
        total = _symmetric_infonce_sum(a, b, all_a, all_b, offset, self.temperature)
        return total * (world / sum(sizes))


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
