#!/usr/bin/env bash
# The pre-trained model behind BENCHMARKS.md's fine-tuning table: as far as one 2-core CPU machine
# gets in about an hour. Data: QM9 paired (first 100,000 rows; rows after them hold the
# conformation-generation test molecules), MOSES paired (20,000, ETKDG+MMFF conformers) and
# MOSES 2D (200,000). Tiny model, stage 1 then stage 2. Writes under outputs/bench/. Sizes and
# steps are environment variables (QM9, MOSES_PAIRED, MOSES_2D, STEPS1, STEPS2; BENCH_OUT).
#   bash benchmarks/pretrain_for_finetune.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUT=${BENCH_OUT:-outputs/bench}
STEPS1=${STEPS1:-3000}
STEPS2=${STEPS2:-3000}
QM9=${QM9:-100000}
MOSES_PAIRED=${MOSES_PAIRED:-20000}
MOSES_2D=${MOSES_2D:-200000}
mkdir -p "$OUT"
feat() { .venv/bin/flexmol featurize "$@" --no-progress; }
feat qm9 --modality paired --limit "$QM9" --shard-size 2000 --out "$OUT/shards/qm9"
feat moses --modality paired --limit "$MOSES_PAIRED" --shard-size 500 --out "$OUT/shards/moses_paired" featurizer.num_conformers=1
feat moses --modality 2d --limit "$MOSES_2D" --shard-size 10000 --out "$OUT/shards/moses_2d"
[ "${FEATURIZE_ONLY:-0}" = 1 ] && exit 0
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
$PY launch/pretrain.py --config configs/pretrain/stage1.yaml \
  "data.paired=[$OUT/shards/qm9,$OUT/shards/moses_paired]" train.max_steps=$STEPS1 \
  train.warmup_steps=200 train.lr=3e-4 train.save_every=500 output_dir=$OUT/stage1
$PY launch/pretrain.py --config configs/pretrain/stage2.yaml \
  "data.paired=[$OUT/shards/qm9,$OUT/shards/moses_paired]" "data.single_2d=[$OUT/shards/moses_2d]" \
  train.max_steps=$STEPS2 train.warmup_steps=100 train.lr=1e-4 train.save_every=500 \
  init_from=$OUT/stage1 output_dir=$OUT/stage2
