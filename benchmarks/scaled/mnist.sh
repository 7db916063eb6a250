#!/usr/bin/env bash
# MNIST, 2 ranks, time to 97% side by side in one run: configs/mnist-adam.yaml, the fast APTS config
# as it was before issue 22 (`base`) and issue 22's settings on top of it; ROUND picks the variants
# (rounds 1-4: the sweep; "seeds": the recommended configs/mnist-apts-fast-n2.yaml against Adam,
# seeds 0-2, APTS run EPOCHS epochs without stopping at 97% for its final accuracy).
# OUT/tta.json, OUT/tta.md.
#   benchmarks/scaled/mnist.sh DATA_ROOT OUT [EPOCHS] [ROUND 1|2|3|4|5|seeds]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
data="$(cd "$1" && pwd)"; out="$2"; epochs="${3:-12}"
source "$root/.venv/bin/activate"; export OMP_NUM_THREADS=1; cd "$root"
common=(--set data.root="$data" --set epochs="$epochs" --set target_accuracy=0.97 --set checkpoint_every=1000)
run() { name="$1"; cfg="$2"; shift 2
  mpiexec -n 2 python -m mpi4py -m apts_mpi train "configs/$cfg.yaml" --out "$out/$name" "${common[@]}" "$@" > "$out/$name.log" 2>&1; }
fast() { name="$1"; shift; run "$name" mnist-apts-fast-n2 "${base[@]}" "$@"; }
base=(--set optimizer.scaling=none --set optimizer.radius_control=global --set optimizer.radius=0.01)
s=(--set optimizer.scaling=adam --set optimizer.radius_control=combined)
mkdir -p "$out"
case "${4:-1}" in
1)  # round 1
run adam mnist-adam
fast apts-fast
fast fast-scaled --set optimizer.scaling=adam
fast fast-scaled-combined "${s[@]}"
fast fast-adamstep-combined --set optimizer.step=adam --set optimizer.radius_control=combined
run adam-again mnist-adam ;;
2)  # round 2: what radius control and damping add
run adam mnist-adam
fast fast-combined --set optimizer.radius_control=combined
fast scaled "${s[@]}"
fast scaled-damped "${s[@]}" --set optimizer.damping=true
run adam-again mnist-adam ;;
3)  # round 3: cheaper iterations of the scaled, combined setting
run adam mnist-adam
fast s-l6 "${s[@]}" --set optimizer.local_iters=6
fast s-g0 "${s[@]}" --set optimizer.global_iters=0
fast s-l6-g0 "${s[@]}" --set optimizer.local_iters=6 --set optimizer.global_iters=0
fast s-r03 "${s[@]}" --set optimizer.radius=0.03
fast adamstep-l3-g0 --set optimizer.step=adam --set optimizer.radius_control=combined \
  --set optimizer.local_iters=3 --set optimizer.global_iters=0
run adam-again mnist-adam ;;
4)  # round 4: around round 3's best (s-r03: initial radius 0.03, now configs/mnist-apts-fast-n2.yaml)
run adam mnist-adam
fast s-r1 "${s[@]}" --set optimizer.radius=0.1
fast s-r03-l8 "${s[@]}" --set optimizer.radius=0.03 --set optimizer.local_iters=8
fast s-r03-l6-lb25 "${s[@]}" --set optimizer.radius=0.03 --set optimizer.local_iters=6 --set optimizer.local_batch=0.25
fast s-r03-max03 "${s[@]}" --set optimizer.radius=0.03 --set optimizer.max_radius=0.3
fast s-r03-l16 "${s[@]}" --set optimizer.radius=0.03 --set optimizer.local_iters=16
run adam-again mnist-adam ;;
5)  # round 5: the combined step's rho sits near 0.5 (median), so eta2 = 0.75 never grows Delta
run adam mnist-adam
fast s-r03-eta2-05 "${s[@]}" --set optimizer.radius=0.03 --set optimizer.eta2=0.5
fast s-r03-eta-01-04 "${s[@]}" --set optimizer.radius=0.03 --set optimizer.eta1=0.1 --set optimizer.eta2=0.4
fast s-r03-eta2-05-l8 "${s[@]}" --set optimizer.radius=0.03 --set optimizer.eta2=0.5 --set optimizer.local_iters=8
run adam-again mnist-adam ;;
seeds)  # the recommended config against Adam, 3 seeds, side by side
for seed in 0 1 2; do
  run adam-s$seed mnist-adam --set seed=$seed
  run apts-fast-s$seed mnist-apts-fast-n2 --set seed=$seed --set target_accuracy=null
done ;;
esac
python -m apts_mpi.bench tta "$out"/*/ --target 0.97 --json "$out/tta.json" | tee "$out/tta.md"
