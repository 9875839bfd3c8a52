"""Pre-training: the configuration (:mod:`~flexmol.train.config`), the learning-rate schedule, and
the DeepSpeed loop (:mod:`~flexmol.train.trainer`) with its parts: the data mix and its streams
(:mod:`~flexmol.train.data`), checkpoints (:mod:`~flexmol.train.checkpoint`), the metrics log
(:mod:`~flexmol.train.metrics`) and validation on held-out data (:mod:`~flexmol.train.validation`);
the recipe is an objective (:mod:`flexmol.objectives`)."""
