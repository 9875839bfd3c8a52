"""M2UMol's multi-to-uni transfer as an objective (METHOD.md, "M2UMol").

The config section ``m2umol`` of a pre-training config (``recipe: m2umol``) names the target
modalities: a ``conformer`` modality (the molecule's 3D structure, through the 3D encoder; paired
batches carry it) and ``vector`` modalities (numeric record labels: QM9's properties, descriptors,
any columns of a user's CSV such as a text embedding computed elsewhere; ``labels`` lists the keys,
glob patterns allowed, resolved against the training data by :meth:`M2UMolObjective.prepare`).

The losses of a batch (2D or paired; a 3D-only batch has no 2D embedding to transfer into):

- ``nt_xent/<modality>``: symmetric NT-Xent between the L2-normalised adapter output
  adapter_m(h2D) and the modality's own encoding enc_m, over the molecules of the batch that have
  the modality (a conformer: every molecule of a paired batch; a vector: every one of its values
  present), negatives gathered across data-parallel ranks as FlexMol's contrastive loss does. A
  molecule missing a modality trains the others. With fewer than 2 such molecules (over the ranks
  when negatives are gathered; on every rank when not, so that every rank's losses have the same
  names) the term is absent that step. Held-out scoring (:meth:`M2UMolObjective.heldout`) decides
  per batch alone, so that the figures do not depend on the world size.
- ``classifier``: cross-entropy of the modality classifier over every adapter's output of every
  molecule (which modality's adapter it came from), weighted by ``classifier_weight``.
- ``total``: the sum of the NT-Xent terms and the weighted classifier loss.
"""
from __future__ import annotations

import copy
import fnmatch
import math
import re
from dataclasses import dataclass, field, fields
from typing import Dict, List

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from flexmol.config import ConfigError
from flexmol.objectives.base import Objective
from flexmol.objectives.losses import _gather_rows, _symmetric_infonce_sum, gather_enabled, gather_mode


@dataclass
class ModalityConfig:
    """One target modality: a named per-molecule field with its own encoder."""

    kind: str = "vector"  # conformer (3D, through the 3D encoder) | vector (numeric label columns)
    labels: List[str] = field(default_factory=list)  # vector: the records' label keys (glob patterns allowed)
    hidden: int = 0  # vector: the encoder's hidden width (0: the model's width)


@dataclass
class M2UMolConfig:
    temperature: float = 0.2  # NT-Xent temperature (M2UMol's flag; 1.0 its default, 0.2 its example)
    classifier_weight: float = 0.5  # the modality classifier's cross-entropy weight (0.5 in the paper)
    encoder: str = "flexmol"  # the 2D encoder: flexmol (this project's) | graphgps (M2UMol's GraphGPS)
    walk_length: int = 20  # graphgps: random-walk steps of its structural encoding
    pe_dim: int = 8  # graphgps: that encoding's share of the atom input's width (below the model's dim)
    # NT-Xent negatives from every data-parallel rank: auto (when torch.distributed runs more than
    # one rank) | on | off (this rank's batch only)
    gather_negatives: str = "auto"
    # The target modalities by name, in the modality classifier's class order. Empty by default:
    # OmegaConf merges a config's map into this default, so a default entry would join every
    # config's modalities.
    modalities: Dict[str, ModalityConfig] = field(default_factory=dict)


def validate_config(cfg: M2UMolConfig) -> None:
    """Checks of the ``m2umol`` section; raises :class:`flexmol.config.ConfigError` naming the key."""
    from flexmol.model.m2umol import ENCODERS, KINDS, NAME, RESERVED

    def fail(key: str, why: str):
        raise ConfigError(f"config key 'm2umol.{key}': {why}")

    if not (isinstance(cfg.temperature, (int, float)) and math.isfinite(cfg.temperature) and cfg.temperature > 0):
        fail("temperature", f"{cfg.temperature!r} must be a positive number")
    if not (math.isfinite(cfg.classifier_weight) and cfg.classifier_weight >= 0):
        fail("classifier_weight", f"{cfg.classifier_weight!r} must be 0 or more")
    if cfg.encoder not in ENCODERS:
        fail("encoder", f"{cfg.encoder!r} is not one of {', '.join(ENCODERS)}")
    for key in ("walk_length", "pe_dim"):
        value = getattr(cfg, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            fail(key, f"must be an integer of at least 1, got {value!r}")
    try:
        gather_mode(cfg.gather_negatives)
    except ValueError:
        fail("gather_negatives", f"{cfg.gather_negatives!r} is not one of auto, on, off")
    if not cfg.modalities:
        fail("modalities", "no target modality; name at least one (kind conformer, or kind vector with labels)")
    conformers = [m for m, s in cfg.modalities.items() if s.kind == "conformer"]
    if len(conformers) > 1:
        fail("modalities", f"{len(conformers)} conformer modalities ({', '.join(conformers)}); there is one 3D encoder")
    owner: dict[str, str] = {}
    for name, spec in cfg.modalities.items():
        if not NAME.fullmatch(name) or hasattr(nn.ModuleDict(), name):
            fail(f"modalities.{name}", f"{name!r} cannot name a modality (letters, digits, '_' and '-', not a "
                                       "module attribute)")
        if name in RESERVED or (name == "3d" and spec.kind != "conformer"):
            fail(f"modalities.{name}", f"{name!r} is the name of an embedding space (2d, fused, and 3d for the "
                                       "conformer modality); name the modality otherwise")
        if spec.kind not in KINDS:
            fail(f"modalities.{name}.kind", f"{spec.kind!r} is not one of {', '.join(KINDS)}")
        if spec.hidden < 0:
            fail(f"modalities.{name}.hidden", f"must be 0 (the model's width) or more, got {spec.hidden}")
        if spec.kind == "conformer":
            if spec.labels:
                fail(f"modalities.{name}.labels", "a conformer modality reads the conformer, not labels")
            continue
        if not spec.labels:
            fail(f"modalities.{name}.labels", "a vector modality needs its record label keys (glob patterns allowed, "
                                              "e.g. [mu, alpha] or ['emb_*'])")
        for pattern in spec.labels:
            if not isinstance(pattern, str) or not pattern.strip():
                fail(f"modalities.{name}.labels", f"{pattern!r} is not a label key or pattern")
            if pattern in owner and owner[pattern] != name:
                fail(f"modalities.{name}.labels", f"{pattern!r} is also a label of modality {owner[pattern]}")
            owner[pattern] = name


def _natural(key: str):
    """Sort key: the digit runs of ``key`` as numbers (emb_2 before emb_10)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class M2UMolObjective(Objective):
    """M2UMol's losses over :class:`flexmol.model.m2umol.M2UMol` (see the module docstring).
    ``cfg`` is the whole pre-training config; its ``m2umol`` section is read."""

    name = "m2umol"
    modalities = frozenset({"paired", "2d"})

    def __init__(self, cfg):
        self.cfg: M2UMolConfig = cfg.m2umol
        validate_config(self.cfg)
        self.gather_negatives = self.cfg.gather_negatives
        # whether the ranks agree on which terms a step has (training: the loop reduces every
        # loss by name over the ranks); held-out scoring unions the names instead
        self.agree = True
        # vector modality -> (label keys, mean, std), from :meth:`prepare`
        self.resolved: dict[str, tuple[list[str], np.ndarray, np.ndarray]] = {}

    # -- data ------------------------------------------------------------------------------------
    def prepare(self, samples: dict[str, list[dict]]) -> None:
        """Resolve each vector modality's label patterns against the label keys of the sampled
        records (every source's), each pattern's keys in natural order, and compute each key's
        mean and standard deviation over the sampled values (a key with a single distinct value:
        std 1). A pattern that matches no key, a key that holds no number, or a value that is not
        a number raises :class:`ConfigError` naming the config key (and the record)."""
        records = [(source, r) for source, rs in samples.items() for r in rs]
        seen: set[str] = set()
        for _, r in records:
            labels = r.get("labels")
            if isinstance(labels, dict):
                seen.update(k for k in labels if isinstance(k, str))
        where = ", ".join(f"{len(rs)} record(s) of {s}" for s, rs in samples.items()) or "no records"
        self.resolved = {}
        for name, spec in self.cfg.modalities.items():
            if spec.kind != "vector":
                continue
            key = f"m2umol.modalities.{name}.labels"
            keys: list[str] = []
            for pattern in spec.labels:
                found = sorted((k for k in seen if fnmatch.fnmatchcase(k, pattern)), key=_natural)
                if not found:
                    shown = ", ".join(sorted(seen, key=_natural)[:12]) or "none"
                    raise ConfigError(f"config key '{key}': {pattern!r} matches no label key of the training data "
                                      f"(sampled {where}; keys seen: {shown}{' ...' if len(seen) > 12 else ''})")
                keys += [k for k in found if k not in keys]
            for other, (taken, _, _) in self.resolved.items():
                common = [k for k in keys if k in taken]
                if common:
                    raise ConfigError(f"config key '{key}': label {common[0]!r} is also one of modality {other}'s")
            values = np.full((len(records), len(keys)), np.nan)
            for i, (source, r) in enumerate(records):
                labels = r.get("labels") if isinstance(r.get("labels"), dict) else {}
                for j, k in enumerate(keys):
                    v = labels.get(k)
                    if v is None:
                        continue
                    if not _is_number(v) or math.isinf(v):
                        raise ConfigError(f"config key '{key}': label {k!r} of molecule {r.get('id', '?')!r} "
                                          f"({source}) is {v!r}, not a finite number")
                    values[i, j] = v
            empty = [k for j, k in enumerate(keys) if np.isnan(values[:, j]).all()]
            if empty:
                raise ConfigError(f"config key '{key}': label {empty[0]!r} holds no number in the sampled data "
                                  f"({where})")
            mean = np.nanmean(values, axis=0)
            std = np.nanstd(values, axis=0)
            std[~(std > 1e-12 * np.maximum(1.0, np.abs(mean)))] = 1.0
            self.resolved[name] = (keys, mean.astype(np.float32), std.astype(np.float32))

    def label_keys(self) -> list[str]:
        """Every vector modality's label keys, modality after modality in config order."""
        return [k for keys, _, _ in self.resolved.values() for k in keys]

    def _columns(self) -> dict[str, slice]:
        out, start = {}, 0
        for name, (keys, _, _) in self.resolved.items():
            out[name] = slice(start, start + len(keys))
            start += len(keys)
        return out

    # -- the network -----------------------------------------------------------------------------
    def build_model(self, model_cfg) -> nn.Module:
        """:class:`~flexmol.model.m2umol.M2UMol` of the sizes ``model_cfg`` and the configured
        modalities (vector ones as :meth:`prepare` resolved them, their statistics set)."""
        from flexmol.model.m2umol import M2UMol, M2UMolModelConfig, ModalitySpec
        from flexmol.model.network import ModelConfig

        if self.cfg.encoder == "graphgps" and self.cfg.pe_dim >= model_cfg.dim:
            raise ConfigError(f"config key 'm2umol.pe_dim': {self.cfg.pe_dim} must be below the model's dim "
                              f"{model_cfg.dim} (the atom input is dim wide, pe_dim of it the random-walk encoding)")
        specs = {}
        for name, spec in self.cfg.modalities.items():
            if spec.kind == "conformer":
                specs[name] = ModalitySpec(kind="conformer")
                continue
            if name not in self.resolved:
                raise ConfigError(f"config key 'm2umol.modalities.{name}.labels': not resolved against the data "
                                  "(the objective prepares on the training data before the model is built)")
            keys = self.resolved[name][0]
            specs[name] = ModalitySpec(kind="vector", dim=len(keys), labels=list(keys), hidden=spec.hidden)
        sizes = {f.name: getattr(model_cfg, f.name) for f in fields(ModelConfig)}
        model = M2UMol(M2UMolModelConfig(**sizes, encoder=self.cfg.encoder, walk_length=self.cfg.walk_length,
                                         pe_dim=self.cfg.pe_dim, modalities=specs))
        for name, (_, mean, std) in self.resolved.items():
            model.encoders[name].set_statistics(torch.from_numpy(mean), torch.from_numpy(std))
        return model

    def owned(self, model: nn.Module) -> dict[str, nn.Module]:
        return {"encoders": model.encoders, "adapters": model.adapters, "classifier": model.classifier,
                "fusion": model.fusion}

    def frozen(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """The 2D-only embedding's attention over the adapters (``fusion``): no pre-training loss
        reaches it; fine-tuning trains it."""
        return {f"fusion.{k}": p for k, p in model.fusion.named_parameters()}

    def heldout(self) -> "M2UMolObjective":
        """This objective with negatives from each rank's own batch, each batch's terms decided
        by that batch alone."""
        held = copy.copy(self)
        held.gather_negatives, held.agree = "off", False
        return held

    # -- the losses ------------------------------------------------------------------------------
    def losses(self, model: nn.Module, batch: dict, generator: torch.Generator | None = None
               ) -> dict[str, torch.Tensor]:
        """See the module docstring. ``generator`` is unused (nothing here is random)."""
        if batch["modality"] not in self.modalities:
            raise ValueError(f"m2umol trains on {', '.join(sorted(self.modalities))} batches, not {batch['modality']} "
                             "(a 3D-only molecule has no 2D embedding to transfer into)")
        out = model(batch)
        adapted = out["adapted"]
        columns = self._columns()
        pairs: list[tuple[str, torch.Tensor, torch.Tensor]] = []  # (modality, adapter rows, target rows)
        for name in model.modalities:
            if model.cfg.modalities[name].kind == "conformer":
                if "h_3d" in out:
                    pairs.append((name, adapted[name], out["h_3d"]))
                continue
            if "labels" not in batch:
                raise ValueError(f"the batch carries no labels; m2umol's vector modality {name} reads "
                                 f"{', '.join(self.label_keys()[columns[name]][:3])}...")
            values = batch["labels"][:, columns[name]]
            rows = ~torch.isnan(values).any(dim=1)
            pairs.append((name, adapted[name][rows], model.encode_vector(name, values[rows])))

        gather = gather_enabled(self.gather_negatives)
        local = [len(a) for _, a, _ in pairs]
        sizes = self._sizes(local, out["h_2d"].device) if gather or self.agree else [local]
        losses: dict[str, torch.Tensor] = {}
        untrained = out["h_2d"].new_zeros(())
        for j, (name, a, t) in enumerate(pairs):
            counts = [s[j] for s in sizes]
            if (sum(counts) if gather else min(counts)) < 2:
                untrained = untrained + 0.0 * (a.sum() + t.sum())  # every rank uses the same parameters
                continue
            losses[f"nt_xent/{name}"] = self._nt_xent(a, t, counts if gather else None)
        logits = model.classify(adapted)  # [B, M, M]
        classes = torch.arange(logits.shape[1], device=logits.device).expand(logits.shape[0], -1)
        losses["classifier"] = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), classes.reshape(-1))
        total = sum(v for k, v in losses.items() if k.startswith("nt_xent/"))
        losses["total"] = total + self.cfg.classifier_weight * losses["classifier"] + untrained
        return losses

    @staticmethod
    def _sizes(local: list[int], device) -> list[list[int]]:
        """Every rank's molecule count per term ([rank][term]): one all-gather when
        torch.distributed runs more than one rank."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1 or not local:
            return [local]
        mine = torch.tensor(local, dtype=torch.long, device=device)
        parts = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, mine)
        return torch.stack(parts).tolist()

    def _nt_xent(self, a: torch.Tensor, t: torch.Tensor, sizes: list[int] | None) -> torch.Tensor:
        """Symmetric NT-Xent of the matched rows of ``a`` and ``t``: this batch's mean, or with
        ``sizes`` (every rank's row count) against every rank's rows, scaled so that the mean
        over the ranks is the loss of one batch holding them all."""
        a, t = F.normalize(a.float(), dim=-1), F.normalize(t.float(), dim=-1)
        temperature = float(self.cfg.temperature)
        if sizes is None:
            return _symmetric_infonce_sum(a, t, a, t, 0, temperature) / len(a)
        all_a, all_t = _gather_rows(a, sizes, None), _gather_rows(t, sizes, None)
        offset = sum(sizes[:dist.get_rank()])
        return _symmetric_infonce_sum(a, t, all_a, all_t, offset, temperature) * (len(sizes) / sum(sizes))
