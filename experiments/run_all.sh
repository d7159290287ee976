#!/usr/bin/env bash
# Reproduces every results folder under experiments/results (about 15 minutes on 2 CPU cores).
set -euo pipefail
cd "$(dirname "$0")/.."
jaxforget run --workdir runs/work --out experiments/results/default
jaxforget run --workdir runs/work --seeds 0,1,2 --out experiments/results/label-flip-3-seeds
jaxforget run --workdir runs/backdoor --scenario backdoor --out experiments/results/backdoor
jaxforget run --workdir runs/work --updates first-order,diagonal-newton,finetune,cg --out experiments/results/with-cg
