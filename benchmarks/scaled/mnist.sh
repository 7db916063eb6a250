#!/usr/bin/env bash
# MNIST, 2 ranks, time to 97% side by side in one run: configs/mnist-adam.yaml, the fast APTS
# config, and issue 22's settings on top of it.  OUT/tta.json, OUT/tta.md.
#   benchmarks/scaled/mnist.sh DATA_ROOT OUT [EPOCHS] [ROUND 1|2]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
data="$(cd "$1" && pwd)"; out="$2"; epochs="${3:-12}"
source "$root/.venv/bin/activate"; export OMP_NUM_THREADS=1; cd "$root"
common=(--set data.root="$data" --set epochs="$epochs" --set target_accuracy=0.97 --set checkpoint_every=1000)
run() { name="$1"; cfg="$2"; shift 2
  mpiexec -n 2 python -m mpi4py -m apts_mpi train "configs/$cfg.yaml" --out "$out/$name" "${common[@]}" "$@" > "$out/$name.log" 2>&1; }
mkdir -p "$out"
if [ "${4:-1}" = 1 ]; then  # round 1
run adam mnist-adam
run apts-fast mnist-apts-fast-n2
run fast-scaled mnist-apts-fast-n2 --set optimizer.scaling=adam
run fast-scaled-combined mnist-apts-fast-n2 --set optimizer.scaling=adam --set optimizer.radius_control=combined
run fast-adamstep-combined mnist-apts-fast-n2 --set optimizer.step=adam --set optimizer.radius_control=combined
run adam-again mnist-adam
else  # round 2: what radius control and damping add
run adam mnist-adam
run fast-combined mnist-apts-fast-n2 --set optimizer.radius_control=combined
run scaled mnist-apts-scaled-n2
run scaled-damped mnist-apts-scaled-n2 --set optimizer.damping=true
run adam-again mnist-adam
fi
python -m apts_mpi.bench tta "$out"/*/ --target 0.97 --json "$out/tta.json" | tee "$out/tta.md"
