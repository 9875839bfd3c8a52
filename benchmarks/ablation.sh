#!/usr/bin/env bash
# Which stage-1 objective puts something into the embedding: short stage-1 runs with every loss
# on, then with each loss off in turn, each scored by a linear probe on B3DB (scaffold split,
# 3 seeds, a seeded 2,000 of its molecules) next to the probe of the random initialisation.
# Reads the shards of benchmarks/pretrain_for_finetune.sh (BENCH_OUT); writes BENCH_OUT/ablation/.
#   BENCH_OUT=outputs/bench9 STEPS=500 bash benchmarks/ablation.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${BENCH_OUT:-outputs/bench}
STEPS=${STEPS:-500}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$OUT/ablation"
for off in none contrastive consistency alignment atom coord spd dist; do
  run="$OUT/ablation/$off"
  extra=()
  [ "$off" != none ] && extra=("objective.$off=0")
  .venv/bin/python launch/pretrain.py --config stage1 \
    "data.paired=[$OUT/shards/qm9,$OUT/shards/moses_paired]" train.max_steps=$STEPS \
    train.warmup_steps=50 train.lr=3e-4 train.save_every=$STEPS validation.every=$STEPS \
    validation.alignment_count=1000 wandb.mode=disabled output_dir=$run "${extra[@]}" > "$run.log" 2>&1
  # the LoRA arm runs one epoch only: the probes are what this compares
  .venv/bin/flexmol finetune --checkpoint "$run" --data b3db --target bbb --task classification \
    --split scaffold --seeds 3 --baselines probe_flexmol,probe_scratch --out "$run/b3db_probe" \
    data.subsample=2000 data.num_workers=1 train.epochs=1 > "$run.finetune.log" 2>&1
  echo "$off: $(grep -E '^(probe_flexmol|probe_scratch)' "$run/b3db_probe/table.txt" | tr -s ' ' | paste -sd ';')"
done
