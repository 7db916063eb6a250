#!/usr/bin/env bash
# Tiny Shakespeare, gpt-small, 2 ranks, EPOCHS epochs: AdamW (lr 3e-3, the best of its sweep),
# Schedule-Free AdamW, and APTS N=2 with issue 22's settings (`old`: configs/shakespeare-small-apts-n2.yaml
# as it was before the issue; the b256 runs: the recommended setting and its variants).
#   benchmarks/scaled/gpt.sh DATA_ROOT OUT [EPOCHS [NAME ...]]    (NAMEs: only those runs)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
data="$(cd "$1" && pwd)"; out="$2"; epochs="${3:-2}"; only=" ${*:4} "
source "$root/.venv/bin/activate"; export OMP_NUM_THREADS=1; cd "$root"; mkdir -p "$out"
common=(--set data.root="$data" --set epochs="$epochs" --set checkpoint_every=1000)
run() { name="$1"; cfg="$2"; shift 2
  [ "$only" = "  " ] || [[ "$only" == *" $name "* ]] || return 0
  mpiexec -n 2 python -m mpi4py -m apts_mpi train "configs/$cfg.yaml" --out "$out/$name" "${common[@]}" "$@" > "$out/$name.log" 2>&1; }
old=(--set data.batch_size=1024 --set optimizer.step=cauchy --set optimizer.radius_control=global
     --set optimizer.local_iters=5 --set optimizer.global_iters=1 --set optimizer.acceptance=ratio)
b256=(--set optimizer.acceptance=ratio)  # the recommended config with the ratio test
run adamw shakespeare-small-adamw
run schedulefree shakespeare-small-adamw --set optimizer.method=schedulefree --set optimizer.lr=2.5e-3 \
  --set optimizer.weight_decay=0
run apts shakespeare-small-apts-n2 "${old[@]}"
run apts-adamstep-combined shakespeare-small-apts-n2 "${old[@]}" --set optimizer.step=adam --set optimizer.radius_control=combined
run apts-scaled-combined shakespeare-small-apts-n2 "${old[@]}" --set optimizer.scaling=adam --set optimizer.radius_control=combined
# minibatch 256, one local iteration, no global pass: 2 gradient evaluations an iteration at N = 2
run apts-adamstep-b256 shakespeare-small-apts-n2 "${b256[@]}"
# with looser thresholds: accept any real decrease (eta1 0.01), grow Delta when rho > 0.25
run apts-adamstep-b256-eta shakespeare-small-apts-n2 "${b256[@]}" --set optimizer.eta1=0.01 --set optimizer.eta2=0.25
# the recommended config (the nonmonotone test)
run apts-adamstep-b256-nonmono shakespeare-small-apts-n2
