#!/usr/bin/env bash
# BENCHMARKS.md's M2UMol table: the M2UMol recipe's 2D encoder against FlexMol's 2D mode and
# against random initialisation, fine-tuned (LoRA r=64 and full) and linear-probed on BBBP, ESOL
# and B3DB with the MoleculeNet protocol. Uses the shards of benchmarks/pretrain_for_finetune.sh
# (BENCH_OUT=outputs/bench9 QM9=50000 MOSES_PAIRED=5000 MOSES_2D=100000 FEATURIZE_ONLY=1) and the
# FlexMol rows of outputs/bench9/ft (same splits, seeds and settings). Writes under outputs/bench13/.
#   FLEXMOL_MOLECULENET_DIR=../shared/data/moleculenet bash benchmarks/m2umol.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
DATA=${DATA:-outputs/bench9/shards}
OUT=${BENCH_OUT:-outputs/bench13}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
$PY launch/pretrain.py --config configs/pretrain/m2umol.yaml \
  "data.paired=[$DATA/qm9,$DATA/moses_paired]" "data.single_2d=[$DATA/moses_2d]" \
  train.max_steps=4000 train.warmup_steps=200 train.lr=3e-4 train.save_every=500 wandb.mode=disabled \
  output_dir=$OUT/m2umol
# the same network, randomly initialised (seed 0), as an export: the random-initialisation arms
$PY - "$OUT" <<'PYEOF'
import sys

import torch

from flexmol import load_pretrained, save_pretrained
from flexmol.model.summary import network

trained = load_pretrained(f"{sys.argv[1]}/m2umol/export")
torch.manual_seed(0)
model = network(trained.cfg)
state = model.state_dict()
state.update(dict(trained.named_buffers()))  # the vector modalities' standardisation (not weights)
model.load_state_dict(state)
save_pretrained(model, f"{sys.argv[1]}/m2umol_random/export")
PYEOF
for init in m2umol m2umol_random; do
  for sets in bbbp,esol b3db; do   # two processes side by side
    $PY benchmarks/finetune.py --checkpoint $OUT/$init --out $OUT/ft${init#m2umol} train.epochs=20 train.patience=5 \
      data.num_workers=1 "baselines=[flexmol_full,probe_flexmol]" --sets $sets &
  done
  wait
done
