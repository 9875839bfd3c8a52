"""Validation on held-out data: every loss of the objective by name on each source's held-out
molecules, with fixed conformers, masks and noise, so that the figures of two evaluations (and of
two world sizes) compare."""
from __future__ import annotations

import sys

import torch

from flexmol.data.collate import move
from flexmol.data.streams import fixed_batches
from flexmol.train.data import object_gather


def heldout_losses(model: torch.nn.Module, batches: list[dict], objective, *, seed: int, device: torch.device,
                   precision: str = "fp32", rank: int = 0, world: int = 1
                   ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Every loss of ``objective`` (an :class:`~flexmol.objectives.base.Objective`, as scored on
    held-out data: its :meth:`~flexmol.objectives.base.Objective.heldout`) by name, summed over the
    molecules of this rank's share of fixed held-out ``batches`` (batch j: masks and noise from a
    generator seeded by (seed, j), so the figures do not depend on the world size), and per loss
    the molecules of the batches that gave it (an objective may leave a loss out of a batch that
    cannot define it; ``total`` counts every molecule): divide after summing over ranks. Every rank
    runs the same number of forward passes on the same modality (ZeRO-3 gathers parameters
    collectively); a rank with no batch left repeats one at weight 0."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, torch.Tensor] = {}
    for i in range((len(batches) + world - 1) // world):
        j = i * world + rank
        batch = move(batches[j if j < len(batches) else 0], device)
        weight = float(batch["mask"].shape[0]) if j < len(batches) else 0.0
        gen = torch.Generator(device=device).manual_seed(seed * 7919 + j)
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            losses = objective.losses(model, batch, gen)
        for k, val in losses.items():
            sums[k] = sums.get(k, 0.0) + val.detach().double().cpu() * weight
            counts[k] = counts.get(k, 0.0) + torch.tensor(weight, dtype=torch.float64)
    return sums, counts


class Validator:
    """Held-out shards by source (``heldout``) scored with ``objective.heldout()``: the first
    ``validation.max_molecules`` of each source, batched once (on first use) by ``data.max_atoms``,
    with the record ``labels`` the objective asks for. ``cfg``: the run's PretrainConfig."""

    def __init__(self, cfg, heldout: dict[str, list[str]], objective, labels=()):
        self.cfg, self.heldout, self.objective, self.labels = cfg, heldout, objective.heldout(), list(labels)
        self._batches: dict[str, list[dict]] | None = None

    def batches(self, model: torch.nn.Module, rank: int = 0) -> dict[str, list[dict]]:
        """Each source's held-out batches (built on first use; bad records as ``data.on_bad_record``
        says, skipped ones said by rank 0)."""
        if self._batches is None:
            cfg, notes = self.cfg, []
            extra = {"labels": self.labels} if self.labels else {}
            self._batches = {
                k: fixed_batches(urls, max_atoms=cfg.data.max_atoms, max_molecules=cfg.validation.max_molecules,
                                 max_spd=model.cfg.max_spd, max_path=model.cfg.max_path,
                                 on_bad_record=cfg.data.on_bad_record, notes=notes, **extra)
                for k, urls in self.heldout.items()}
            if notes and rank == 0:
                print(f"[pretrain] validation skips {len(notes)} bad held-out record(s); first: {notes[0]}",
                      file=sys.stderr, flush=True)
        return self._batches

    def evaluate(self, model: torch.nn.Module, step: int, *, device: torch.device, rank: int = 0,
                 world: int = 1) -> dict:
        """The ``valid`` record of ``step``: ``valid/SOURCE/LOSS`` averaged over the molecules (of
        every rank) of the batches that gave the loss, and ``valid/SOURCE/molecules``. Each rank
        scores its share of the held-out batches on their own: the figures do not depend on the
        world size (and weight-0 repeats do not enter other ranks' negatives). Every rank must call."""
        record: dict = {"split": "valid", "step": step}
        batches = self.batches(model, rank)
        was_training = model.training
        model.eval()
        try:
            for source, held in batches.items():
                if not held:
                    continue
                sums, counts = heldout_losses(model, held, self.objective, seed=self.cfg.train.seed, device=device,
                                              precision=self.cfg.train.precision, rank=rank, world=world)
                keys = sorted(sums)
                if world > 1:  # the losses some rank's batches gave: the same keys on every rank
                    keys = sorted(set().union(*object_gather(world)(keys)))
                zero = torch.zeros((), dtype=torch.float64)
                values = torch.stack([sums.get(k, zero).reshape(()) for k in keys]
                                     + [counts.get(k, zero).reshape(()) for k in keys])
                if world > 1:
                    values = values.to(device)
                    torch.distributed.all_reduce(values)
                    values = values.cpu()
                got = dict(zip(keys, zip(values[:len(keys)].tolist(), values[len(keys):].tolist())))
                for k, (total, molecules) in got.items():
                    if molecules > 0:
                        record[f"valid/{source}/{k}"] = total / molecules
                record[f"valid/{source}/molecules"] = int(got["total"][1])
        finally:
            model.train(was_training)
        return record
