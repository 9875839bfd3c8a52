"""Pre-training objectives: stage 1 on paired data, stage 2 on 2D-only or 3D-only data."""
from flexmol.objectives.stages import ObjectiveConfig, mask_atoms, pretraining_losses, validate_objective

__all__ = ["ObjectiveConfig", "mask_atoms", "pretraining_losses", "validate_objective"]
