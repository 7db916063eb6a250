#!/usr/bin/env bash
# Tiny Shakespeare, gpt-small, 2 ranks, EPOCHS epochs side by side: AdamW (lr 3e-3, the best of its
# sweep) and APTS N=2 (configs/shakespeare-small-apts-n2.yaml) with issue 22's settings.
#   benchmarks/scaled/gpt.sh DATA_ROOT OUT [EPOCHS [NAME ...]]    (NAMEs: only those runs)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
data="$(cd "$1" && pwd)"; out="$2"; epochs="${3:-2}"; only=" ${*:4} "
source "$root/.venv/bin/activate"; export OMP_NUM_THREADS=1; cd "$root"; mkdir -p "$out"
common=(--set data.root="$data" --set epochs="$epochs" --set checkpoint_every=1000)
run() { name="$1"; cfg="$2"; shift 2
  [ "$only" = "  " ] || [[ "$only" == *" $name "* ]] || return 0
  mpiexec -n 2 python -m mpi4py -m apts_mpi train "configs/$cfg.yaml" --out "$out/$name" "${common[@]}" "$@" > "$out/$name.log" 2>&1; }
run adamw shakespeare-small-adamw
run apts shakespeare-small-apts-n2
run apts-adamstep-combined shakespeare-small-apts-n2 --set optimizer.step=adam --set optimizer.radius_control=combined
run apts-scaled-combined shakespeare-small-apts-n2 --set optimizer.scaling=adam --set optimizer.radius_control=combined
