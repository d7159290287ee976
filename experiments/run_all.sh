#!/usr/bin/env bash
# Reproduces every folder under experiments/results, in order (times measured on 2 CPU cores).
# 1. Tuning on validation data and tuning seeds 100-101 (never reported); writes jaxforget/tuned.json.
# 2. The main job and the studies, on reported seeds 0-9, with the tuned defaults.
set -euo pipefail
cd "$(dirname "$0")/.."

python experiments/tune.py --scenario label-flip --seeds 100,101                                 # ~12 min
python experiments/tune.py --scenario backdoor --correction relabel --seeds 100,101 \
  --updates first-order,diagonal-newton,finetune,finetune-ascent                                  # ~20 min
python experiments/tune.py --scenario backdoor --correction remove-trigger --seeds 100,101 \
  --updates first-order,diagonal-newton,finetune                                                  # ~15 min

jaxforget run --workdir runs/default-fresh --out experiments/results/default                     # ~3.5 min
jaxforget run --workdir runs/work --seeds 0,1,2,3,4,5,6,7,8,9 \
  --out experiments/results/label-flip-10-seeds                                                   # ~35 min
jaxforget run --workdir runs/backdoor --scenario backdoor --correction relabel --seeds 0,1,2,3,4 \
  --updates first-order,diagonal-newton,finetune,finetune-ascent --out experiments/results/backdoor-relabel  # ~25 min
jaxforget run --workdir runs/backdoor-rt --scenario backdoor --correction remove-trigger --seeds 0,1,2 \
  --updates first-order,diagonal-newton,finetune --out experiments/results/backdoor-remove-trigger  # ~15 min
# The sweeps work on a copy of the main study's seeds, so that its workdir keeps the study's own stage records.
mkdir -p runs/sweep-budget runs/sweep && for s in 0 1 2; do cp -r runs/work/seed-$s runs/sweep-budget/; done
python experiments/sweep.py budget --values 0.0005,0.001,0.003,0.01,0.1 --seeds 0,1,2 \
  --workdir runs/sweep-budget                                                                     # ~15 min
ln -sfn ../sweep-budget runs/sweep/group-200  # the group of 200 is the main study's: reuse its models
python experiments/sweep.py group-size --values 200,500,1000 --seeds 0,1,2 --workdir runs/sweep     # ~20 min
