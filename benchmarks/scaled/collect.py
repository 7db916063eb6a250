"""Raw numbers of benchmarks/scaled/*.sh runs into JSON: python benchmarks/scaled/collect.py
{pinn|gpt} RUN_DIR... --out FILE.json [--budget EVALS] (MNIST: python -m apts_mpi.bench tta)."""
import argparse
import json
import os

import numpy as np

from apts_mpi.results import METRICS_FILE, read_metrics


def pinn(d, budget=None, target=1e-3):
    """Acceptance of the combined steps, the evaluations to L2 error ``target`` and the best error
    within ``budget`` gradient evaluations (the per-epoch series: one APTS iteration an epoch)."""
    it, ep, attrs = read_metrics(os.path.join(d, METRICS_FILE))
    apts = np.isfinite(np.asarray(it["rho"]))  # the APTS iterations (Adam's have no rho)
    acc = np.asarray(it["accepted"])[apts]
    l2 = np.asarray(ep["l2_error"]) if "l2_error" in ep else np.full(len(ep["epoch"]), np.nan)
    evals = np.asarray(ep["grad_evals"])  # cumulative, at the end of each epoch
    hit = np.flatnonzero(l2 <= target)
    within = l2[evals <= budget] if budget else l2
    return dict(run=os.path.basename(os.path.normpath(d)), apts_iterations=int(apts.sum()),
                accepted=int(acc.sum()), acceptance=float(acc.mean()) if acc.size else None,
                final_l2_error=float(l2[-1]), best_l2_error=float(np.nanmin(l2)),
                evals_to_target=int(evals[hit[0]]) if hit.size else None, target=target,
                budget=budget, best_l2_within_budget=float(np.nanmin(within)) if within.size else None,
                grad_evals=int(evals[-1]), seconds=float(np.asarray(ep["seconds"])[-1]))


def gpt(d):
    it, ep, attrs = read_metrics(os.path.join(d, METRICS_FILE))
    keys = [k for k in ("val_loss", "test_loss") if k in ep]
    return dict(run=os.path.basename(os.path.normpath(d)), epochs=[int(e) for e in ep["epoch"]],
                val_loss=[float(v) for v in ep[keys[0]]] if keys else None,
                seconds=[float(s) for s in ep["seconds"]],
                grad_evals_per_epoch=[int(e) for e in ep["grad_evals"]] if "grad_evals" in ep else None,
                grad_evals=int(np.asarray(it["grad_evals"]).sum()) if "grad_evals" in it else None)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=("pinn", "gpt"))
    p.add_argument("runs", nargs="+")
    p.add_argument("--out", required=True)
    p.add_argument("--budget", type=float, help="pinn: the best L2 error within this many evaluations")
    a = p.parse_args()
    rows = [pinn(d, a.budget) if a.what == "pinn" else gpt(d) for d in a.runs]
    with open(a.out, "w") as f:
        json.dump(rows, f, indent=1)
    for r in rows:
        print(r)
