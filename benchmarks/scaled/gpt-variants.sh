#!/usr/bin/env bash
# The APTS variants of benchmarks/scaled/gpt.sh at EPOCHS epochs (the machine's time allowed one).
#   benchmarks/scaled/gpt-variants.sh DATA_ROOT OUT [EPOCHS]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
data="$(cd "$1" && pwd)"; out="$2"; epochs="${3:-1}"
source "$root/.venv/bin/activate"; export OMP_NUM_THREADS=1; cd "$root"; mkdir -p "$out"
common=(--set data.root="$data" --set epochs="$epochs" --set checkpoint_every=1000)
run() { name="$1"; cfg="$2"; shift 2
  mpiexec -n 2 python -m mpi4py -m apts_mpi train "configs/$cfg.yaml" --out "$out/$name" "${common[@]}" "$@" > "$out/$name.log" 2>&1; }
run apts-scaled-combined shakespeare-small-apts-n2 --set optimizer.scaling=adam --set optimizer.radius_control=combined
run apts-adamstep-combined shakespeare-small-apts-n2 --set optimizer.step=adam --set optimizer.radius_control=combined
