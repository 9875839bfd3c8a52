"""The main job on the default data: what ``flexmol demo`` runs.

Featurises a QM9 subset as paired 2D+3D data (DFT geometries) and a MOSES subset as 2D-only data,
both through the Ray job, checks both datasets and prints their summaries. Later stages of the
pipeline (pre-training, fine-tuning) extend this job as they land.
"""
from __future__ import annotations

from pathlib import Path

from flexmol import config
from flexmol.data.shards import inspect
from flexmol.featurize import FeaturizeError, run_featurize


def run_demo(out: Path, qm9_limit: int, moses_limit: int) -> int:
    # Shards small enough that every core gets work on these subsets.
    steps = [
        ("qm9", "paired", qm9_limit, out / "shards" / "qm9_paired", 250),
        ("moses", "2d", moses_limit, out / "shards" / "moses_2d", 2500),
    ]
    reports = []
    for source, modality, limit, directory, shard_size in steps:
        print(f"== featurise {source} ({modality}, first {limit} molecules) -> {directory}", flush=True)
        cfg = config.build(config.FeaturizeConfig, {"source": source, "modality": modality, "limit": limit,
                                                    "out": str(directory), "job": {"shard_size": shard_size}})
        try:
            run_featurize(cfg)
        except FeaturizeError as exc:
            print(f"flexmol demo: {exc}")
            return 2
        reports.append(inspect(directory))
    print()
    for r in reports:
        print(r.summary())
    return 0 if all(r.ok for r in reports) else 1
