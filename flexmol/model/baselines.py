"""Reference networks built from FlexMol's own blocks, for side-by-side measurements."""
from __future__ import annotations

import torch
from torch import nn

from flexmol.model.heads import masked_mean
from flexmol.model.inputs import Input3D
from flexmol.model.layers import PairTransformer
from flexmol.model.network import ModelConfig


class UniMolStyleEncoder(nn.Module):
    """A single 3D encoder (Uni-Mol's shape): the 3D input representation, ``cfg.layers`` pair
    transformer layers of the same width, mean pooling. FlexMol's inference cost is measured
    against this."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_3d = Input3D(cfg.dim, cfg.heads, cfg.num_kernels)
        self.encoder = PairTransformer(cfg.dim, cfg.heads, cfg.layers, cfg.ffn_mult, cfg.dropout)

    def forward(self, batch: dict) -> torch.Tensor:
        y, q = self.input_3d(batch["z"], batch["pos"], batch["mask"])
        h, _ = self.encoder(y, q, batch["mask"])
        return masked_mean(h, batch["mask"])
