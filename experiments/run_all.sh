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
python experiments/tune.py --scenario canary --seeds 100,101 \
  --updates first-order,diagonal-newton,finetune                                                  # ~10 min

jaxforget run --workdir runs/default-fresh --out experiments/results/default                     # ~3.5 min
jaxforget run --workdir runs/work --seeds 0,1,2,3,4,5,6,7,8,9 \
  --out experiments/results/label-flip-10-seeds                                                   # ~35 min
jaxforget run --workdir runs/backdoor --scenario backdoor --correction relabel --seeds 0,1,2,3,4 \
  --updates first-order,diagonal-newton,finetune,finetune-ascent --out experiments/results/backdoor-relabel  # ~25 min
jaxforget run --workdir runs/backdoor-rt --scenario backdoor --correction remove-trigger --seeds 0,1,2 \
  --updates first-order,diagonal-newton,finetune --out experiments/results/backdoor-remove-trigger  # ~15 min
# The sweeps share the main study's workdir (outputs are keyed by their settings): they reuse its models and curvature.
python experiments/sweep.py budget --values 0.0005,0.001,0.003,0.01,0.1 --seeds 0,1,2 \
  --workdir runs/work                                                                             # ~15 min
python experiments/sweep.py group-size --values 200,500,1000 --seeds 0,1,2 --workdir runs/work  # ~20 min

# Forgetting against many retrained models: the K needed, then the main job with --forgetting.
python experiments/forgetting_models.py                                                           # ~1.5 min
jaxforget run --dataset digits --model mlp --forgetting 32 --seeds 0,1,2 --workdir runs/forgetting-digits-mlp \
  --out experiments/results/forgetting-digits-mlp-k32                                             # ~12 min
for steps in 200 1000; do
  jaxforget run --dataset digits --model mlp --forgetting 32 --selections hessian-largest,last-layer,all \
    --updates finetune,finetune-corrected --finetune-steps "$steps" --workdir runs/forgetting-digits-mlp \
    --out "experiments/results/forgetting-digits-mlp-k32-finetune-$steps"                         # ~1 min each
done
jaxforget run --forgetting 8 --workdir runs/forgetting-mnist5k-cnn \
  --out experiments/results/forgetting-mnist5k-cnn-k8                                             # ~20 min

# The text canary: memorization, the default run, ten seeds, the budget sweep on their workdir.
python experiments/canary_memorization.py --steps 1000 --every 100                              # ~2.5 min
python experiments/canary_memorization.py --steps 3000 --every 500 --text-characters 0 \
  --learning-rate 1e-3                                                                            # ~4 min
jaxforget run --scenario canary --workdir runs/canary-fresh --out experiments/results/canary-default  # ~4 min
jaxforget run --scenario canary --seeds 0,1,2,3,4,5,6,7,8,9 --workdir runs/canary-10 \
  --out experiments/results/canary-10-seeds                                                       # ~40 min
python experiments/sweep.py budget --values 0.001,0.01,0.1 --seeds 0,1,2,3,4 \
  --updates first-order,diagonal-newton,finetune --workdir runs/canary-10 \
  --out experiments/results/sweep-budget-canary --scenario canary                                 # ~15 min

# Floating-point drift (the bound of --check-reproduction), and the default command reproducing itself.
taskset -c 0 jaxforget run --workdir runs/drift/work-1core --out runs/drift/1core --quiet          # ~5 min
XLA_FLAGS=--xla_cpu_enable_fast_math=true jaxforget run --workdir runs/drift/work-fastmath \
  --out runs/drift/fastmath --quiet                                                               # ~3.5 min
python experiments/drift.py runs/drift/1core runs/drift/fastmath --reference experiments/results/default
jaxforget run --workdir runs/default-new --quiet                                                  # ~3.5 min
jaxforget evaluate --workdir runs/default-new --out experiments/results/reproduction --quiet \
  --check-reproduction experiments/results/default
