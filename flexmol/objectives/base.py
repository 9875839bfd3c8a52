"""The objective seam: a pre-training recipe is an objective plus a data mix, never a fork of the loop.

The training loop (:mod:`flexmol.train.trainer`) knows an objective only through this interface:

- :meth:`Objective.build_model` builds the network it trains (from the model sizes);
- :meth:`Objective.losses` gives the losses of one batch by name, with the weighted ``total`` the
  loop back-propagates;
- :meth:`Objective.frozen` names the parameters it keeps fixed: the loop leaves them out of the
  optimizer and without gradient, set once before DeepSpeed sees the model;
- :meth:`Objective.owned` names the heads (modules) the objective owns beside the encoders;
- :attr:`Objective.modalities` the batch modalities (``paired``, ``2d``, ``3d``) it trains on;
  a data mix that draws another is refused before anything starts;
- :meth:`Objective.heldout` the objective held-out batches are scored with (negatives not
  gathered across ranks, so validation figures do not depend on the world size).

FlexMol's stage 1 and stage 2 (:mod:`flexmol.objectives.stages`) and M2UMol
(:mod:`flexmol.objectives.m2umol`) are objectives; a user's own is one file and a config.
"""
from __future__ import annotations

import abc
from typing import ClassVar

import torch
from torch import nn


class Objective(abc.ABC):
    """One pre-training recipe's losses over a network; see the module docstring."""

    name: ClassVar[str]
    modalities: ClassVar[frozenset[str]]

    @abc.abstractmethod
    def build_model(self, model_cfg) -> nn.Module:
        """The network this objective trains, built from the model sizes (a ``ModelConfig``)."""

    @abc.abstractmethod
    def losses(self, model: nn.Module, batch: dict, generator: torch.Generator | None = None
               ) -> dict[str, torch.Tensor]:
        """Every loss of ``batch`` by name, and ``total`` (what the loop back-propagates).
        ``generator`` (on the batch's device) drives every random choice (masks, noise)."""

    def frozen(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """Parameters kept fixed: outside the optimizer, without gradient."""
        return {}

    def owned(self, model: nn.Module) -> dict[str, nn.Module]:
        """The heads this objective owns beside the encoders, by module name."""
        return {}

    def heldout(self) -> "Objective":
        """The objective held-out batches are scored with (by default this one)."""
        return self
