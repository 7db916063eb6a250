"""Raw numbers of benchmarks/scaled/*.sh runs into JSON: python benchmarks/scaled/collect.py
{pinn|gpt} RUN_DIR... --out FILE.json (MNIST: python -m apts_mpi.bench tta)."""
import argparse
import json
import os

import numpy as np

from apts_mpi.results import METRICS_FILE, read_metrics


def pinn(d):
    it, ep, attrs = read_metrics(os.path.join(d, METRICS_FILE))
    apts = np.isfinite(np.asarray(it["rho"]))  # the APTS iterations (Adam's have no rho)
    acc = np.asarray(it["accepted"])[apts]
    l2 = np.asarray(ep["l2_error"]) if "l2_error" in ep else np.asarray([np.nan])
    evals = np.cumsum(np.asarray(it["grad_evals"]))
    return dict(run=os.path.basename(os.path.normpath(d)), apts_iterations=int(apts.sum()),
                accepted=int(acc.sum()), acceptance=float(acc.mean()) if acc.size else None,
                final_l2_error=float(l2[-1]), best_l2_error=float(np.nanmin(l2)),
                grad_evals=int(evals[-1]), seconds=float(np.asarray(ep["seconds"])[-1]))


def gpt(d):
    it, ep, attrs = read_metrics(os.path.join(d, METRICS_FILE))
    keys = [k for k in ("val_loss", "test_loss") if k in ep]
    return dict(run=os.path.basename(os.path.normpath(d)), epochs=[int(e) for e in ep["epoch"]],
                val_loss=[float(v) for v in ep[keys[0]]] if keys else None,
                seconds=[float(s) for s in ep["seconds"]],
                grad_evals=int(np.asarray(it["grad_evals"]).sum()) if "grad_evals" in it else None)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=("pinn", "gpt"))
    p.add_argument("runs", nargs="+")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    rows = [(pinn if a.what == "pinn" else gpt)(d) for d in a.runs]
    with open(a.out, "w") as f:
        json.dump(rows, f, indent=1)
    for r in rows:
        print(r)
