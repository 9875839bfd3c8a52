"""The objective seam: a pre-training recipe is an objective plus a data mix, never a fork of the loop.

The training loop (:mod:`flexmol.train.trainer`) knows an objective only through this interface:

- :meth:`Objective.prepare` sees the first records of each training source before anything is
  built (up to :attr:`Objective.sample_records` of each), e.g. to resolve label keys and their
  statistics; :meth:`Objective.label_keys` names the record labels its batches must carry;
- :meth:`Objective.build_model` builds the network it trains (from the model sizes);
- :meth:`Objective.losses` gives the losses of one batch by name, with the weighted ``total`` the
  loop back-propagates;
- :meth:`Objective.frozen` names the parameters it keeps fixed: the loop leaves them out of the
  optimizer and without gradient, set once before DeepSpeed sees the model;
- :meth:`Objective.owned` names the heads (modules) the objective owns beside the encoders;
- :attr:`Objective.modalities` the batch modalities (``paired``, ``2d``, ``3d``) it trains on;
  a data mix that draws another is refused before anything starts;
- :meth:`Objective.heldout` the objective held-out batches are scored with (negatives not
  gathered across ranks, so validation figures do not depend on the world size);
- :meth:`Objective.report` an optional report on held-out data when a run ends, from its export
  (:meth:`Objective.report_due` says whether a finished run still owes it).

FlexMol's stage 1 and stage 2 (:mod:`flexmol.objectives.stages`) and M2UMol
(:mod:`flexmol.objectives.m2umol`) are objectives; a user's own is one file and a config.
"""
from __future__ import annotations

import abc
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn


class Objective(abc.ABC):
    """One pre-training recipe's losses over a network; see the module docstring."""

    name: ClassVar[str]
    modalities: ClassVar[frozenset[str]]
    # Records of each training source :meth:`prepare` is given (an equal share of the first ones of
    # each of its training shards; records that do not decode are left out); 0: none are read.
    sample_records: ClassVar[int] = 256

    @property
    def title(self) -> str:
        """What the run's progress and messages call this objective (by default its name)."""
        return self.name

    def prepare(self, samples: dict[str, list[dict]]) -> None:
        """Called once before :meth:`build_model` with up to :attr:`sample_records` records of
        each training source, by source name (``paired``, ``single_2d``, ``single_3d``)."""

    def label_keys(self) -> list[str]:
        """The record label keys every batch must carry as ``batch["labels"]`` [B, L] (NaN where
        a molecule lacks one), in this order; [] for none. Known after :meth:`prepare`."""
        return []

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

    def report_due(self, heldout: dict[str, list[str]], out: Path) -> bool:
        """Whether a run writing into ``out`` with held-out shards ``heldout`` (by source) still
        owes its :meth:`report` (a finished run that does not is left as it is)."""
        return False

    def report(self, export: Path, heldout: dict[str, list[str]], out: Path, *, max_atoms: int,
               on_bad_record: str, device: torch.device) -> dict | None:
        """At the end of a run (rank 0), a report on the held-out shards ``heldout`` (by source)
        from the run's ``export``, written into ``out``; returns the record to log (with its
        ``split``), or None when there is nothing to report."""
        return None
