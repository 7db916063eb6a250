#!/usr/bin/env bash
# One APTS setting, unchanged on the three problems (issue 22, item 6), against AdamW at PyTorch's
# default learning rate (1e-3) and a sweep of it; each problem's data and model from its config.
#   benchmarks/scaled/shared.sh DATA_ROOT OUT [SEED]        PROBLEMS="mnist gpt pinn" (the default)
#   MNIST: 10 epochs (mnist-adam.yaml's data: minibatch 10000); GPT: 2 epochs (minibatch 256);
#   PINN from a random start: AdamW 3000 steps, APTS 250 iterations (about as many evaluations).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
data="$(cd "$1" && pwd)"; out="$2"; seed="${3:-0}"
source "$root/.venv/bin/activate"; export OMP_NUM_THREADS=1; cd "$root"; mkdir -p "$out"
APTS='optimizer={method: apts, subdomains: 2, step: adam, radius_control: combined, damping: true}'
LRS="1e-4 3e-4 1e-3 3e-3 1e-2"
run() { name="$1"; cfg="$2"; shift 2
  mpiexec -n 2 python -m mpi4py -m apts_mpi train "configs/$cfg.yaml" --out "$out/$name" --set seed="$seed" \
    --set checkpoint_every=100000 --set target=null "$@" > "$out/$name.log" 2>&1 \
    || echo "$name: exit $? (its log says why; metrics.h5 holds the epochs run)"; }
for problem in ${PROBLEMS:-mnist gpt pinn}; do  # a run stopped early (a stalled radius) is reported
  case $problem in
    mnist) cfg=mnist-adam; set_=(--set data.root="$data" --set epochs=10 --set target_accuracy=null); n=10 ;;
    gpt) cfg=shakespeare-small-adamw; set_=(--set data.root="$data" --set epochs=2); n=2 ;;
    pinn) cfg=poisson2d-adam-lbfgs; set_=(--set epochs=3000); n=250 ;;
  esac
  run "$problem-apts" "$cfg" "${set_[@]}" --set epochs=$n --set "$APTS"
  for lr in $LRS; do
    run "$problem-adamw-lr$lr" "$cfg" "${set_[@]}" --set "optimizer={method: adamw, lr: $lr}"
  done
done
