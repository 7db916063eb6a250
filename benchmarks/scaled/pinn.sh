#!/usr/bin/env bash
# PINN (Poisson 2-D), Adam then APTS at N = 4 in serial emulation (configs/poisson2d-adam-apts-n4.yaml),
# shortened to EPOCHS (1000 Adam steps, then APTS iterations): combined-step acceptance with and
# without the damped combination.  benchmarks/scaled/pinn.sh OUT [EPOCHS] [SEEDS...]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
out="$1"; epochs="${2:-1040}"; shift 2 || true; seeds=("${@:-0}")
source "$root/.venv/bin/activate"; export OMP_NUM_THREADS=1; cd "$root"; mkdir -p "$out"
for seed in "${seeds[@]}"; do
  for v in "plain|" "damped|--set optimizer.damping=true"; do
    IFS='|' read -r name extra <<< "$v"
    python -m apts_mpi train configs/poisson2d-adam-apts-n4.yaml --out "$out/$name-s$seed" --set seed=$seed \
      --set epochs=$epochs --set checkpoint_every=100000 $extra > "$out/$name-s$seed.log" 2>&1
  done
done
