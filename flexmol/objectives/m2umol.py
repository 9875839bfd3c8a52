"""M2UMol's multi-to-uni transfer as an objective (METHOD.md, "M2UMol").

The config section ``m2umol`` of a pre-training config (``recipe: m2umol``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List


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
    encoder: str = "flexmol"  # the 2D encoder: flexmol (this project's) | graphgps (torch-geometric)
    modalities: Dict[str, ModalityConfig] = field(default_factory=lambda: {"3d": ModalityConfig(kind="conformer")})


def validate_config(cfg: M2UMolConfig) -> None:
    """Checks of the ``m2umol`` section; raises :class:`flexmol.config.ConfigError` naming the key."""
