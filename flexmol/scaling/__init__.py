"""Scaling studies: a sweep spec (model ladder x data budgets x paired:single mixes x seeds),
every run trained and evaluated the same way (on Ray, resumable), one results table with measured
compute, power-law fits with bootstrap intervals, and the figures.

    flexmol scaling plan configs/scaling/ladder.yaml
    flexmol scaling run configs/scaling/ladder.yaml --out outputs/scaling/ladder
    flexmol scaling fit outputs/scaling/ladder/runs.csv --out outputs/scaling/ladder
    flexmol scaling plot outputs/scaling/ladder
"""
from __future__ import annotations


class ScalingError(ValueError):
    """A spec, table or directory a study cannot use; the message names it and says why."""
