"""The featurisation job (sources -> WebDataset shards), on Ray or in-process."""


def __getattr__(name):
    # Lazy: a Ray worker imports flexmol.featurize.task and should not pay for the driver's modules.
    if name in ("FeaturizeError", "run_featurize"):
        from flexmol.featurize import job

        return getattr(job, name)
    raise AttributeError(name)


__all__ = ["FeaturizeError", "run_featurize"]
