"""Stage 1 (paired) and stage 2 (2D-only, 3D-only) pre-training losses, as METHOD.md reads them,
and FlexMol's two stages as objectives of the training loop (:class:`FlexMolObjective`).

Every loss comes back by name (for logging) together with the weighted ``total``; every weight,
the masking rate, the coordinate noise and the temperature are config keys.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from flexmol.model.inputs import MASK_Z
from flexmol.model.network import FlexMol
from flexmol.objectives.base import Objective
from flexmol.objectives.losses import ContrastiveLoss, atom_mse, gather_enabled, gather_mode, pair_mse, pooled

# The feature learners (stage 2's frozen teachers) and the pre-training heads beside the encoders,
# by module name in :class:`~flexmol.model.network.FlexMol`.
FEATURE_LEARNERS = ("fl_2d", "fl_3d")
HEADS = ("proj_2d", "proj_3d", "atom_head", "coord_head", "spd_head", "dist_head")


@dataclass
class ObjectiveConfig:
    contrastive: float = 1.0  # L_cl, stage 1
    consistency: float = 1.0  # L_c: decoders reconstruct the (real or FL-predicted) input representation
    alignment: float = 1.0  # feature learners, stage 1
    atom: float = 1.0  # masked atom types
    coord: float = 1.0  # coordinate denoising
    spd: float = 0.5  # shortest-path-distance classes
    dist: float = 0.5  # pair distances
    mask_prob: float = 0.15
    noise_std: float = 0.2  # Å
    temperature: float = 0.1
    # L_cl negatives from every data-parallel rank: auto (when torch.distributed runs more than
    # one rank) | on | off (this rank's batch only); YAML's booleans true / false read as on / off
    gather_negatives: str = "auto"


def validate_objective(cfg: ObjectiveConfig) -> None:
    """Checks of the ``objective`` config section; raises ValueError naming the key."""
    gather_mode(cfg.gather_negatives)
    if not 0.0 <= cfg.mask_prob <= 1.0:
        raise ValueError(f"config key 'objective.mask_prob': {cfg.mask_prob} is not in [0, 1]")
    if cfg.temperature <= 0:
        raise ValueError(f"config key 'objective.temperature': {cfg.temperature} must be positive")
    if cfg.noise_std < 0:
        raise ValueError(f"config key 'objective.noise_std': {cfg.noise_std} must not be negative")


def mask_atoms(batch: dict, prob: float, generator: torch.Generator | None = None) -> tuple[dict, torch.Tensor]:
    """Mask each real atom with probability ``prob`` (at least one per batch). A masked atom is
    masked whole: the batch gets ``atom_masked`` [B, N], which replaces the atom's 2D token by the
    model's mask token (none of its categorical features is seen), and its 3D type becomes
    ``MASK_Z``. Returns the masked batch and the picked atoms [B, N]."""
    real = batch["mask"]
    pick = (torch.rand(real.shape, generator=generator, device=real.device) < prob) & real
    if not pick.any():  # at least one masked atom per batch, so the loss is defined
        first = real.nonzero()[0]
        pick[first[0], first[1]] = True
    masked = dict(batch, atom_masked=pick)
    masked["z"] = batch["z"].masked_fill(pick, MASK_Z)
    return masked, pick


def _noised(batch: dict, std: float, generator: torch.Generator | None) -> torch.Tensor:
    pos = batch["pos"]
    noise = torch.randn(pos.shape, generator=generator, device=pos.device, dtype=pos.dtype) * std
    return pos + noise * batch["mask"].unsqueeze(-1)


def pretraining_losses(model: FlexMol, batch: dict, cfg: ObjectiveConfig,
                       generator: torch.Generator | None = None, *,
                       train_feature_learners: bool = True) -> dict[str, torch.Tensor]:
    """Losses for one batch; which ones depends on ``batch["modality"]``:

    - ``paired`` (stage 1): contrastive, consistency (both decoders, real targets), alignment (both
      feature learners), masked atoms, coordinate denoising, SPD, distances;
    - ``2d`` (stage 2): consistency of D_2->3 against the frozen 3D-FL's y~ = 3D-FL(x), masked
      atoms, SPD;
    - ``3d`` (stage 2): consistency of D_3->2 against the frozen 2D-FL's x~ = 2D-FL(y), coordinate
      denoising, distances.

    ``generator`` (on the batch's device) drives the atom masking and the coordinate noise.
    ``train_feature_learners`` is True in stage 1. In stage 2 (False) the feature learners are
    frozen: no gradient reaches them; on paired batches ``alignment`` is still computed, without
    gradient, for logging, and left out of ``total``.
    """
    modality, mask = batch["modality"], batch["mask"]
    # Atoms are masked only where the masked-atom loss is on (not for 3D-only molecules).
    masked, picked = mask_atoms(batch, cfg.mask_prob, generator) if modality != "3d" else (batch, None)
    pos = _noised(batch, cfg.noise_std, generator) if modality in ("paired", "3d") else None
    out = model(masked, pos=pos)
    losses: dict[str, torch.Tensor] = {}

    if modality == "paired":
        z2 = model.proj_2d(pooled(out["x_f"], mask))
        z3 = model.proj_3d(pooled(out["y_f"], mask))
        losses["contrastive"] = ContrastiveLoss(cfg.temperature, gather_enabled(cfg.gather_negatives))(z2, z3)
        losses["consistency"] = (
            atom_mse(out["y_hat"], out["y"].detach(), mask) + pair_mse(out["Q_hat"], out["Q"].detach(), mask)
            + atom_mse(out["x_hat"], out["x"].detach(), mask) + pair_mse(out["P_hat"], out["P"].detach(), mask)
        )
        with torch.set_grad_enabled(train_feature_learners and torch.is_grad_enabled()):
            losses["alignment"] = (atom_mse(model.fl_3d(out["x"]), out["y"].detach(), mask)
                                   + atom_mse(model.fl_2d(out["y"]), out["x"].detach(), mask))
    elif modality == "2d":
        with torch.no_grad():  # the frozen 3D-FL: no gradient reaches it
            target = model.fl_3d(out["x"])
        losses["consistency"] = atom_mse(out["y_hat"], target, mask)
    else:
        with torch.no_grad():  # the frozen 2D-FL
            target = model.fl_2d(out["y"])
        losses["consistency"] = atom_mse(out["x_hat"], target, mask)

    pm = mask.unsqueeze(-1) & mask.unsqueeze(-2)
    if modality in ("paired", "2d"):
        logits = model.atom_head(out["h"])[picked]
        losses["atom"] = F.cross_entropy(logits.float(), batch["z"][picked])
        losses["spd"] = F.cross_entropy(model.spd_head(out["pair"])[pm].float(), batch["spd"][pm])
    if modality in ("paired", "3d"):
        true = batch["pos"]
        pred = model.coord_head(out["pair"], pos, mask)
        losses["coord"] = ((pred.float() - true.float()).pow(2).sum(-1) * mask).sum() / mask.sum()
        dist = torch.cdist(true.float(), true.float())
        losses["dist"] = F.mse_loss(model.dist_head(out["pair"])[pm].float(), dist[pm])

    logged_only = set() if train_feature_learners else {"alignment"}
    losses["total"] = sum(getattr(cfg, k) * v for k, v in losses.items() if k not in logged_only)
    return losses


def frozen_parameters(model: FlexMol, stage: int) -> dict[str, torch.nn.Parameter]:
    """The parameters a stage keeps fixed: in stage 2, the feature learners (the decoders' teachers)."""
    if stage == 1:
        return {}
    prefixes = tuple(f"{m}." for m in FEATURE_LEARNERS)
    return {n: p for n, p in model.named_parameters() if n.startswith(prefixes)}


class FlexMolObjective(Objective):
    """FlexMol's pre-training in ``stage`` 1 (every module trained) or 2 (the feature learners
    frozen): :func:`pretraining_losses` with the ``objective`` config section ``cfg``, on paired,
    2D-only and 3D-only batches alike. ``model_key`` names what chose the model sizes (in the
    refusal of a model too large to allocate). At the end of a run, the alignment report
    (:mod:`flexmol.evaluate.alignment`) on up to ``alignment_count`` held-out paired molecules
    (``output_dir/alignment.json``); 0 turns it off."""

    name = "flexmol"
    modalities = frozenset({"paired", "2d", "3d"})
    sample_records = 0  # nothing to learn from the data before the model is built

    def __init__(self, cfg: ObjectiveConfig, stage: int = 1, *, model_key: str = "model", alignment_count: int = 0):
        if stage not in (1, 2):
            raise ValueError(f"stage: must be 1 or 2, got {stage!r}")
        self.cfg, self.stage, self.model_key, self.alignment_count = cfg, stage, model_key, alignment_count

    @property
    def title(self) -> str:
        return f"{self.name} stage {self.stage}"

    def build_model(self, model_cfg) -> FlexMol:
        from flexmol.model.summary import build_model

        return build_model(model_cfg, self.model_key)

    def losses(self, model: FlexMol, batch: dict, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        return pretraining_losses(model, batch, self.cfg, generator, train_feature_learners=self.stage == 1)

    def frozen(self, model: FlexMol) -> dict[str, torch.nn.Parameter]:
        return frozen_parameters(model, self.stage)

    def owned(self, model: FlexMol) -> dict[str, torch.nn.Module]:
        return {name: getattr(model, name) for name in HEADS}

    def heldout(self) -> FlexMolObjective:
        return FlexMolObjective(dataclasses.replace(self.cfg, gather_negatives="off"), self.stage,
                                model_key=self.model_key, alignment_count=self.alignment_count)

    def report_due(self, heldout: dict[str, list[str]], out: Path) -> bool:
        return bool(self.alignment_count and heldout.get("paired")) and not (out / "alignment.json").is_file()

    def report(self, export: Path, heldout: dict[str, list[str]], out: Path, *, max_atoms: int,
               on_bad_record: str, device: torch.device) -> dict | None:
        """The alignment report (retrieval, cosines, feature-learner and decoder errors) on the
        first ``alignment_count`` held-out paired molecules, printed and written to
        ``out/alignment.json``; the record of its flat metrics (split ``alignment``)."""
        urls = heldout.get("paired")
        if not self.alignment_count or not urls:
            return None
        from flexmol import load_pretrained
        from flexmol.data.streams import heldout_records
        from flexmol.evaluate.alignment import flat_metrics, format_report, records_report

        records = heldout_records(urls, self.alignment_count, on_bad_record=on_bad_record)
        if len(records) < 2:
            return None
        model = load_pretrained(export).to(device)
        report = records_report(model, records, max_atoms=max_atoms, device=device)
        report["data"] = list(urls)
        (out / "alignment.json").write_text(json.dumps(report, indent=1) + "\n")
        print(format_report(report), flush=True)
        return {"split": "alignment", **flat_metrics(report, prefix="alignment/")}
