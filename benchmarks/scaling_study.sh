#!/usr/bin/env bash
# The first scaling studies (BENCHMARKS.md, "Scaling studies"): the data, both sweeps, fits and
# figures. Every step resumes: a rerun goes on from what is finished.
#   bash benchmarks/scaling_study.sh            # about 40 min of wall-clock on 2 CPU cores
set -euo pipefail
cd "$(dirname "$0")/.."
flexmol=".venv/bin/flexmol"
data=outputs/scaling/data
$flexmol featurize qm9 --modality paired --limit 50000 --out $data/qm9 job.shard_size=2000
$flexmol featurize moses --modality 2d --limit 100000 --out $data/moses_2d job.shard_size=20000
for study in ladder paired_vs_single; do
  $flexmol scaling plan configs/scaling/$study.yaml
  $flexmol scaling run configs/scaling/$study.yaml --out outputs/scaling/$study
done
$flexmol scaling fit outputs/scaling/ladder/runs.csv --out outputs/scaling/ladder
$flexmol scaling fit outputs/scaling/ladder/runs.csv --out outputs/scaling/ladder/fit_atom --loss-column val/paired/atom
for study in ladder paired_vs_single; do
  $flexmol scaling plot outputs/scaling/$study
done
