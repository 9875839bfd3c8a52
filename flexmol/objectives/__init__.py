"""Pre-training objectives: stage 1 on paired data, stage 2 on 2D-only or 3D-only data."""
from flexmol.objectives.stages import ObjectiveConfig, pretraining_losses

__all__ = ["ObjectiveConfig", "pretraining_losses"]
