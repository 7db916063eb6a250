"""The benchmark suite of the authors' current problems, CPU-sized (docs/method.md section 7).

    scripts/reproduce_suite DATA_ROOT [--seeds "0 1 2"] [--cores C] [--device cpu] [--out runs/suite]
                            [--quick] [--only pinn,shakespeare,scaling]

Runs, each a config of ``configs/`` (resumed where a checkpoint exists), as many at once as
``--cores`` allows (a run of r ranks takes r cores):

* **PINN** (2-D Poisson): APTS N = 2 and 4, alone and after 1000 Adam steps (``adam-apts``),
  against Adam-then-L-BFGS, every seed; target: relative L2 error <= 1e-3.
* **Tiny Shakespeare** (small GPT): APTS N = 2, Schedule-Free AdamW, an AdamW learning-rate sweep
  (every seed) and an SGD-with-momentum sweep (first seed); target: the final validation loss of the
  best AdamW of the sweep.
* **Scaling** (PINN, APTS, 15 iterations): strong (1080 points, N = 1, 2, 4, 8) and weak (250 N
  interior points) on N ranks, beside the serial emulation's per-iteration critical path (the
  longest subdomain's local phase plus the shared global work divided by N).

Writes ``OUT/suite.md`` (the tables), ``OUT/suite.json`` (their numbers), ``OUT/pinn.png`` and
``OUT/shakespeare.png`` (metric against epochs, seconds and gradient evaluations).  Gradient
evaluations are counted as the runs count them (one per evaluation of a minibatch's objective and
gradient, every subdomain's and every rank's included); "gradient work" multiplies them by the
minibatch size over the training-set size (epochs' worth of per-sample gradients), so that methods
with different minibatches compare.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..results import plot_runs
from . import tables

ROOT = Path(__file__).resolve().parents[2]
ADAMW_LRS = (3e-4, 1e-3, 3e-3, 1e-2)
SGD_LRS = (0.03, 0.1, 0.3, 1.0)


@dataclass
class Run:
    problem: str          # pinn | shakespeare | scaling
    method: str           # the row it belongs to
    config: str
    ranks: int
    seed: int
    sets: dict = field(default_factory=dict)
    tag: str = ""         # what tells apart runs of one method and seed (a swept value)

    @property
    def name(self) -> str:
        return f"{self.method}{'-' + self.tag if self.tag else ''}-seed{self.seed}"


def plan(seeds, quick=False, only=("pinn", "shakespeare", "scaling"), pinn_iterations=None,
         lm_epochs=4) -> list[Run]:
    """Every run of the suite; ``quick`` shortens each to a smoke test of the whole pipeline.

    ``pinn_iterations``: APTS iterations on the PINN (None: the configs' epochs; the two-stage
    schedules always run their configs' epochs: Adam then L-BFGS 1000 Adam steps and 500 L-BFGS
    steps, its converged reference 1000 and 250 with zero tolerances, Adam then APTS 1000 Adam steps
    and at most 150 APTS iterations); ``lm_epochs``: epochs of every language-model run."""
    apts_epochs = {} if pinn_iterations is None else {"epochs": pinn_iterations}
    pinn_sets = {"apts": {"epochs": 10} if quick else apts_epochs,
                 "adam-lbfgs": {"epochs": 12, "optimizer.adam_steps": 10} if quick else {}}
    lm_epochs = 1 if quick else lm_epochs
    runs = []
    if "pinn" in only:
        for s in seeds:
            runs += [Run("pinn", f"apts-n{n}", f"configs/poisson2d-apts-n{n}.yaml", n, s,
                         dict(pinn_sets["apts"])) for n in (2, 4)]
            runs += [Run("pinn", method, f"configs/poisson2d-{method}.yaml", 1, s,
                         dict(pinn_sets["adam-lbfgs"]))
                     for method in ("adam-lbfgs", "adam-lbfgs-converged")]
            runs += [Run("pinn", f"adam-apts-n{n}", f"configs/poisson2d-adam-apts-n{n}.yaml", n, s,
                         dict(pinn_sets["adam-lbfgs"])) for n in (2, 4)]
    if "shakespeare" in only:
        small = {"epochs": lm_epochs} | ({"data.batch_size": 2048} if quick else {})
        for s in seeds:
            runs.append(Run("shakespeare", "apts-n2", "configs/shakespeare-small-apts-n2.yaml", 2, s, small))
            runs.append(Run("shakespeare", "schedulefree", "configs/shakespeare-small-adamw.yaml", 1, s,
                            {**small, "optimizer.method": "schedulefree", "optimizer.lr": 2.5e-3,
                             "optimizer.weight_decay": 0.0}))
            for lr in ADAMW_LRS[:1] if quick else ADAMW_LRS:
                runs.append(Run("shakespeare", "adamw", "configs/shakespeare-small-adamw.yaml", 1, s,
                                {**small, "optimizer.lr": lr}, f"lr{lr:g}"))
        for lr in SGD_LRS[:1] if quick else SGD_LRS:
            runs.append(Run("shakespeare", "sgd", "configs/shakespeare-small-adamw.yaml", 1, seeds[0],
                            {**small, "optimizer.method": "sgd", "optimizer.lr": lr,
                             "optimizer.momentum": 0.9, "optimizer.weight_decay": 0.0}, f"lr{lr:g}"))
    if "scaling" in only:
        for n in (1, 2, 4, 8):
            for kind, points in (("strong", 1000), ("weak", 250 * n)):
                # the optimiser settings the committed scaling results were measured with (one
                # global iteration, five local ones): the per-iteration split of local and shared work
                base = {"epochs": 3 if quick else 15, "optimizer.subdomains": n,
                        "data.interior_points": points, "target": None, "optimizer.local_iters": 5,
                        "optimizer.global_iters": 1, "optimizer.memory": 10}
                runs.append(Run("scaling", f"{kind}-ranks", "configs/poisson2d-apts-n2.yaml", n,
                                seeds[0], dict(base), f"n{n}"))
                if n > 1:
                    runs.append(Run("scaling", f"{kind}-serial", "configs/poisson2d-apts-n2.yaml", 1,
                                    seeds[0], dict(base), f"n{n}"))
    return runs


def _command(run: Run, out: Path, data: str, device: str) -> list[str]:
    mpiexec = shutil.which("mpiexec", path=str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"])
    sets = {"seed": run.seed, "data.root": data, "device": device, **run.sets}
    args = ["train", str(ROOT / run.config), "--out", str(out / run.problem / run.name)]
    if (out / run.problem / run.name / "checkpoint.h5").exists():
        args.append("--resume")
    for k, v in sets.items():
        args += ["--set", f"{k}={'null' if v is None else v}"]
    return [mpiexec, "-n", str(run.ranks), sys.executable, "-m", "mpi4py", "-m", "apts_mpi", *args]


def launch(runs: list[Run], out: Path, data: str, device: str, cores: int) -> None:
    """Start the runs, as many at once as ``cores`` allows; each logs to OUT/<problem>/<name>.log."""
    pending, active, failed = list(runs), [], []
    env = dict(os.environ, OMP_NUM_THREADS="1")
    while pending or active:
        for proc, run, log in list(active):
            if proc.poll() is not None:
                active.remove((proc, run, log))
                log.close()
                status = "done" if proc.returncode in (0, 3) else f"FAILED ({proc.returncode})"
                print(f"{status}: {run.problem}/{run.name}", flush=True)
                if proc.returncode not in (0, 3):  # 3: a numerical stop, metrics kept
                    failed.append(run)
        busy = sum(r.ranks for _, r, _ in active)
        while pending and (not active or busy + pending[0].ranks <= cores):
            run = pending.pop(0)
            (out / run.problem).mkdir(parents=True, exist_ok=True)
            log = open(out / run.problem / f"{run.name}.log", "a")
            active.append((subprocess.Popen(_command(run, out, data, device), stdout=log,
                                            stderr=subprocess.STDOUT, env=env), run, log))
            busy += run.ranks
        time.sleep(0.5)
    if failed:
        raise SystemExit(f"{len(failed)} run(s) failed: {', '.join(r.name for r in failed)} "
                         f"(see their .log files under {out})")


def summarize(runs: list[Run], out: Path) -> str:
    """The suite's tables (markdown) and figures; also OUT/suite.json."""
    parts, numbers = [], {}
    out.mkdir(parents=True, exist_ok=True)
    path = lambda r: out / r.problem / r.name  # noqa: E731
    pinn = [(r, path(r)) for r in runs if r.problem == "pinn"]
    if pinn:
        table, numbers["pinn"] = tables.suite_problem(pinn, "l2_error", "min", 1e-3, tables.gradient_work)
        parts += ["### PINN: 2-D Poisson, relative L2 error (target 1e-3)", "", table, ""]
        table, numbers["pinn_equal_evals"] = tables.suite_equal_evaluations(pinn, "l2_error")
        parts += ["### PINN: best L2 error so far at APTS's gradient evaluations, against the "
                  "Adam-then-L-BFGS runs of the same seed", "", table, ""]
        _plot([p for _, p in pinn], out / "pinn.png")
    lm = [(r, path(r)) for r in runs if r.problem == "shakespeare"]
    if lm:
        adamw = [(r, p) for r, p in lm if r.method == "adamw" and (p / "metrics.h5").exists()]
        target = None
        if adamw:
            finals = {}
            for r, p in adamw:
                finals.setdefault(r.sets["optimizer.lr"], []).append(tables.run_series(p)[1]["val_loss"][-1])
            best_lr = min(finals, key=lambda lr: np.mean(finals[lr]))
            target = float(np.mean(finals[best_lr]))
            numbers["shakespeare_target"] = dict(best_lr=best_lr, val_loss=target)
        table, numbers["shakespeare"] = tables.suite_problem(lm, "val_loss", "min", target,
                                                             tables.gradient_work)
        sweep = sum(tables.run_series(p)[1]["seconds"][-1] for r, p in lm
                    if r.method in ("adamw", "sgd") and (p / "metrics.h5").exists())
        parts += [f"### Tiny Shakespeare, small GPT: validation loss in nats per character "
                  f"(target {target:.4f}: the best AdamW of the sweep)" if target else
                  "### Tiny Shakespeare, small GPT: validation loss", "", table, "",
                  f"Total seconds of the AdamW and SGD learning-rate sweeps: {sweep:.0f}.", ""]
        _plot([p for _, p in lm], out / "shakespeare.png")
    scaling = [r for r in runs if r.problem == "scaling"]
    if scaling:
        table, numbers["scaling"] = tables.suite_scaling(scaling, out)
        parts += ["### Scaling: APTS on the PINN, seconds per iteration (median)", "", table, ""]
    text = "\n".join(parts)
    (out / "suite.md").write_text(text)
    (out / "suite.json").write_text(json.dumps(numbers, indent=1, default=float))
    return text


def _plot(paths, figure):
    done = [p for p in paths if (p / "metrics.h5").exists()]
    if done:
        plot_runs(done, figure)


def main(argv=None):
    p = argparse.ArgumentParser(prog="reproduce_suite", description=__doc__.split("\n")[0])
    p.add_argument("data", help="folder holding tinyshakespeare/input.txt (e.g. ../shared/data)")
    p.add_argument("--seeds", default="0 1 2")
    p.add_argument("--cores", type=int, default=os.cpu_count())
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=str(ROOT / "runs" / "suite"))
    p.add_argument("--quick", action="store_true", help="a smoke test: a few iterations of each run")
    p.add_argument("--only", default="pinn,shakespeare,scaling")
    p.add_argument("--pinn-iterations", type=int, default=None,
                   help="APTS iterations on the PINN (default: the configs' epochs)")
    p.add_argument("--lm-epochs", type=int, default=4)
    p.add_argument("--summarize-only", action="store_true")
    args = p.parse_args(argv)
    out = Path(args.out).absolute()
    runs = plan([int(s) for s in args.seeds.split()], args.quick, tuple(args.only.split(",")),
                args.pinn_iterations, args.lm_epochs)
    if not args.summarize_only:
        start = time.perf_counter()
        launch(runs, out, str(Path(args.data).absolute()), args.device, args.cores)
        print(f"{len(runs)} runs in {time.perf_counter() - start:.0f} s on {args.cores} cores")
    print(summarize(runs, out))


if __name__ == "__main__":
    main()
