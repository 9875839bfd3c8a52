"""The featurisation job (sources -> WebDataset shards), on Ray or in-process."""
from flexmol.featurize.job import FeaturizeError, run_featurize

__all__ = ["FeaturizeError", "run_featurize"]
