#!/usr/bin/env bash
# PINN (Poisson 2-D), Adam then APTS at N = 4 in serial emulation (configs/poisson2d-adam-apts-n4.yaml),
# run to EPOCHS (1000 Adam steps, then APTS iterations) without stopping at the 1e-3 target, so that
# both the evaluations to L2 error 1e-3 and the best error within a budget can be read off:
# combined-step acceptance with and without the damped combination.
#   benchmarks/scaled/pinn.sh OUT [EPOCHS] [SEEDS...]      VARIANTS="plain damped" (default: both)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
out="$1"; epochs="${2:-1040}"; shift 2 || true; seeds=("${@:-0}")
source "$root/.venv/bin/activate"; export OMP_NUM_THREADS=1; cd "$root"; mkdir -p "$out"
declare -A extra=([plain]="" [damped]="--set optimizer.damping=true")
for seed in "${seeds[@]}"; do
  for name in ${VARIANTS:-plain damped}; do
    python -m apts_mpi train configs/poisson2d-adam-apts-n4.yaml --out "$out/$name-s$seed" --set seed=$seed \
      --set epochs=$epochs --set target=null --set checkpoint_every=100000 ${extra[$name]} \
      > "$out/$name-s$seed.log" 2>&1
  done
done
