"""Learning-rate schedule: linear warm-up, then cosine or linear decay to ``min_lr_ratio``."""
from __future__ import annotations

import math


def lr_factor(step: int, warmup: int, total: int, decay: str, min_ratio: float) -> float:
    """Multiplier of the peak learning rate at ``step`` (0-based)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if decay == "constant" or total <= warmup:
        return 1.0
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    shape = 0.5 * (1 + math.cos(math.pi * t)) if decay == "cosine" else 1 - t
    return min_ratio + (1 - min_ratio) * shape
