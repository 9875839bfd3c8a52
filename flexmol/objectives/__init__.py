"""Pre-training objectives: FlexMol's stage 1 on paired data and stage 2 on 2D-only or 3D-only
data, and M2UMol's multi-to-uni transfer, each an :class:`~flexmol.objectives.base.Objective` of the
training loop, chosen by the config key ``recipe`` (:func:`build_objective`)."""
from flexmol.model.export import RECIPES  # the values of the config key ``recipe``: the exports' list
from flexmol.objectives.base import Objective
from flexmol.objectives.stages import (FlexMolObjective, ObjectiveConfig, mask_atoms, pretraining_losses,
                                       validate_objective)


def build_objective(cfg) -> Objective:
    """The objective of the pre-training config ``cfg`` (a ``PretrainConfig``): ``recipe: flexmol``
    gives FlexMol's stage ``cfg.stage`` with the ``objective`` section, ``recipe: m2umol``
    M2UMol's with the ``m2umol`` section. An unknown recipe raises a
    :class:`~flexmol.config.ConfigError` naming the key."""
    if cfg.recipe == "flexmol":
        return FlexMolObjective(cfg.objective, cfg.stage, model_key=f"config key 'model.size' ({cfg.model.size})",
                                alignment_count=cfg.validation.alignment_count)
    if cfg.recipe == "m2umol":
        from flexmol.objectives.m2umol import M2UMolObjective

        return M2UMolObjective(cfg)
    from flexmol.config import ConfigError

    raise ConfigError(f"config key 'recipe': '{cfg.recipe}' is not one of {', '.join(RECIPES)}")


__all__ = ["RECIPES", "FlexMolObjective", "Objective", "ObjectiveConfig", "build_objective", "mask_atoms",
           "pretraining_losses", "validate_objective"]
