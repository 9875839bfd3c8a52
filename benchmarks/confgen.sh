#!/usr/bin/env bash
# BENCHMARKS.md's conformation-generation table: a pre-trained export fine-tuned for conformer
# generation (flexmol finetune-confgen with its packaged defaults, one run per seed), each run
# scored by flexmol evaluate confgen on the same held-out QM9 molecules beside ETKDGv3, ETKDGv3 +
# MMFF94 and the pre-trained coordinate head; the table gives mean ± std (population) over the
# seeds per method, and the fine-tuned MAT minus ETKDG + MMFF's on the same seed.
#   bash benchmarks/confgen.sh [EXPORT]          # default: outputs/bench9/stage2/export
# Environment (defaults in brackets):
#   BENCH_OUT   run directory [outputs/bench_confgen]: task_s<seed>/ (task models), eval_s<seed>/
#   SEEDS       fine-tuning seeds [0 1 2]: train.seed and data.split_seed of the run, --seed of its
#               evaluation (so the ETKDG rows vary with the seed too)
#   COUNT       held-out QM9 molecules [200] (every 130th row from row 100,000)
#   EXCLUDE     pre-training datasets, never scored [outputs/bench9/shards/qm9 outputs/bench9/shards/moses_paired
#               outputs/bench9/shards/moses_2d]
#   PARALLEL    seeds fine-tuned at once [1]; each run uses OMP_NUM_THREADS threads [2]. With more than
#               one, build the shared input-conformer cache first (one seed alone, or FT_ARGS
#               data.cache_dir=DIR of an earlier run), or every run builds it
#   FT_ARGS     extra key=value overrides of flexmol finetune-confgen [none]
#   NAME        results: benchmarks/out/NAME.json and NAME.md [confgen]
#   REUSE       1: keep a seed's task model already in BENCH_OUT (a task.json not marked
#               interrupted) and only evaluate it again [0]
# Molecules a task model was fine-tuned or validated on are skipped by its evaluation (counted in
# eval_s<seed>/confgen.json), as are those of EXCLUDE.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
FLEXMOL=.venv/bin/flexmol
EXPORT=${1:-outputs/bench9/stage2/export}
OUT=${BENCH_OUT:-outputs/bench_confgen}
SEEDS=${SEEDS:-0 1 2}
COUNT=${COUNT:-200}
EXCLUDE=${EXCLUDE:-outputs/bench9/shards/qm9 outputs/bench9/shards/moses_paired outputs/bench9/shards/moses_2d}
PARALLEL=${PARALLEL:-1}
REUSE=${REUSE:-0}
NAME=${NAME:-confgen}
read -r -a ft_args <<< "${FT_ARGS:-}"
read -r -a exclude <<< "$EXCLUDE"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
one_seed() {
  local seed=$1 ft_log=/dev/stderr ev_log=/dev/stderr
  if [ "$PARALLEL" -gt 1 ]; then ft_log="$OUT/finetune_s$seed.log"; ev_log="$OUT/evaluate_s$seed.log"; fi
  # the input conformers do not depend on the seed: one cache serves every run (it is checked
  # against its definition and rebuilt when FT_ARGS changed it)
  if [ "$REUSE" = 1 ] && [ -f "$OUT/task_s$seed/task.json" ] && ! grep -q interrupted_at_step "$OUT/task_s$seed/task.json"; then
    echo "seed $seed: task model kept ($OUT/task_s$seed)" >&2
  else
    $FLEXMOL finetune-confgen --checkpoint "$EXPORT" --out "$OUT/task_s$seed" train.seed="$seed" \
      train.threads="$OMP_NUM_THREADS" data.split_seed="$seed" data.cache_dir="$OUT/inputs" "${ft_args[@]}" \
      2> "$ft_log"
  fi
  $FLEXMOL evaluate confgen --task-model "$OUT/task_s$seed" --checkpoint "$EXPORT" \
    --exclude-shards "${exclude[@]}" --count "$COUNT" --seed "$seed" --out "$OUT/eval_s$seed" \
    2> "$ev_log"
}
mkdir -p "$OUT"
running=0
for seed in $SEEDS; do
  one_seed "$seed" &
  running=$((running + 1))
  if [ "$running" -ge "$PARALLEL" ]; then wait -n; running=$((running - 1)); fi
done
wait
$PY - "$OUT" "$NAME" "$EXPORT" $SEEDS <<'PYEOF'
import json
import sys
from pathlib import Path

import numpy as np

out, name, export, seeds = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4:]
evals = [json.loads((out / f"eval_s{s}" / "confgen.json").read_text()) for s in seeds]
tasks = [json.loads((out / f"task_s{s}" / "task.json").read_text()) for s in seeds]
stats = ("cov_mean", "cov_median", "mat_mean", "mat_median", "stereo_mean")


def spread(values):
    v = np.asarray(values, dtype=float)  # the sample standard deviation over the seeds
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "values": v.tolist()}


methods = {m: {k: spread([e["scores"][m][k] for e in evals]) for k in stats + ("conformers_mean",)}
           for m in evals[0]["scores"]}
gap = spread([e["scores"]["finetuned"]["mat_mean"] - e["scores"]["etkdg_mmff"]["mat_mean"] for e in evals])
res = {
    "export": export, "seeds": seeds, "run_dir": str(out),
    "molecules": [len(e["molecules"]) for e in evals], "skipped": [e["skipped"] for e in evals],
    "rejected": [len(e["rejected"]) for e in evals], "num_confs": evals[0]["num_confs"], "delta": evals[0]["delta"],
    "reference": evals[0]["reference"], "note": evals[0]["note"], "held_out": evals[0]["held_out"],
    "finetune": [{"train_molecules": t["counts"].get("train_molecules"),
                  "val_molecules": t["counts"].get("val_molecules"),
                  "steps": t["train"]["steps"], "best_step": t["train"]["best_step"],
                  "prepare_wall_s": t["train"]["prepare_wall_s"], "train_wall_s": t["train"]["train_wall_s"],
                  "threads": t["train"]["threads"], "data": t["data"], "input": t["input"],
                  "validation": t.get("validation")} for t in tasks],
    "seconds": [e["seconds"] for e in evals],
    "methods": methods, "finetuned_minus_etkdg_mmff_mat": gap,
}
Path("benchmarks/out").mkdir(exist_ok=True)
Path(f"benchmarks/out/{name}.json").write_text(json.dumps(res, indent=1) + "\n")
ft = res["finetune"][0]
lines = [f"{min(res['molecules'])}-{max(res['molecules'])} held-out QM9 molecules, {res['num_confs']} conformers, "
         f"delta {res['delta']} A, seeds {' '.join(seeds)}; fine-tuning: {ft['train_molecules']} train + "
         f"{ft['val_molecules']} validation molecules ({ft['data']['source']} rows {ft['data']['start']}-{ft['data']['stop']}"
         f" every {ft['data'].get('stride', 1)}), "
         f"{ft['steps']} steps, {np.mean([f['train_wall_s'] for f in res['finetune']]):.0f} s training + "
         f"{np.mean([f['prepare_wall_s'] for f in res['finetune']]):.0f} s data per seed, {ft['threads']} threads",
         "", "| method | conformers | COV mean | COV median | MAT mean (Å) | MAT median (Å) | stereo agrees |",
         "|---|---|---|---|---|---|---|"]
for m, s in methods.items():
    lines.append(f"| {m} | {s['conformers_mean']['mean']:.1f} | "
                 + " | ".join(f"{s[k]['mean']:.3f} ± {s[k]['std']:.3f}" for k in stats) + " |")
beyond = -gap["mean"] > gap["std"]
lines += ["", f"fine-tuned MAT - ETKDG + MMFF MAT on the same molecules and inputs, per seed "
              f"{', '.join(f'{g:+.4f}' for g in gap['values'])}: {gap['mean']:+.4f} ± {gap['std']:.4f} A "
              f"(mean ± sample std); below ETKDG + MMFF by more than the seed-to-seed spread: "
              f"{'yes' if beyond else 'no'}",
          "(± is the sample standard deviation over the seeds; each seed fine-tunes with its own split and "
          "initialisation order and evaluates with its own ETKDG seed)"]
Path(f"benchmarks/out/{name}.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
print(f"details: benchmarks/out/{name}.json")
PYEOF
