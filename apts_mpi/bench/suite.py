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

from ..results import plot_runs, read_metrics
from ..tables import format_table

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


def _series(run_dir):
    iterations, epochs, attrs = read_metrics(Path(run_dir) / "metrics.h5")
    return iterations, epochs, attrs


def _to_target(epochs, metric, target, mode):
    """(epoch, seconds, grad_evals) when ``metric`` first reaches ``target``, or None."""
    values = np.asarray(epochs[metric])
    hit = np.flatnonzero(values >= target if mode == "max" else values <= target)
    if not hit.size:
        return None
    i = hit[0]
    return int(epochs["epoch"][i]), float(epochs["seconds"][i]), float(epochs["grad_evals"][i])


def _mean_std(values, fmt):
    values = np.asarray(values, dtype=float)
    if values.size > 1:
        return f"{fmt.format(values.mean())} ± {fmt.format(values.std(ddof=1))}"
    return fmt.format(values.mean())


def _problem_table(runs, metric, mode, target, work_of):
    """Rows of one problem: per method, seeds, final and best metric, time/evaluations to target."""
    rows, numbers = [], []
    by_method = {}
    for run, path in runs:
        by_method.setdefault(run.name.rsplit("-seed", 1)[0], []).append(path)
    for method, paths in by_method.items():
        series = [_series(p) for p in paths if (Path(p) / "metrics.h5").exists()]
        if not series:
            continue
        final = [e[metric][-1] for _, e, _ in series]
        best = [(np.nanmax if mode == "max" else np.nanmin)(e[metric]) for _, e, _ in series]
        hits = [_to_target(e, metric, target, mode) for _, e, _ in series] if target is not None else []
        reached = [h for h in hits if h is not None]
        evals = [e["grad_evals"][-1] for _, e, _ in series]
        seconds = [e["seconds"][-1] for _, e, _ in series]
        work = [work_of(a, e) for _, e, a in series]
        ran = sorted({int(e["epoch"][-1]) for _, e, _ in series})  # runs stopped at the target differ
        row = dict(method=method, seeds=len(series), epochs=ran[-1],
                   final=final, best=best, reached=len(reached),
                   to_target_seconds=[h[1] for h in reached], to_target_evals=[h[2] for h in reached],
                   grad_evals=evals, gradient_work=work, seconds=seconds)
        numbers.append(row)
        rows.append([method, str(len(series)), "-".join(map(str, sorted({ran[0], ran[-1]}))),
                     _mean_std(final, "{:.4g}"), _mean_std(best, "{:.4g}"),
                     f"{len(reached)}/{len(series)}",
                     _mean_std(row["to_target_seconds"], "{:.0f}") if reached else "-",
                     _mean_std(row["to_target_evals"], "{:.0f}") if reached else "-",
                     _mean_std(evals, "{:.0f}"), _mean_std(work, "{:.1f}"), _mean_std(seconds, "{:.0f}")])
    header = ["run", "seeds", "epochs", f"final {metric}", f"best {metric}", "reached target",
              "seconds to target", "grad evals to target", "grad evals", "gradient work (epochs)",
              "seconds"]
    return format_table(header, rows, style="markdown"), numbers


def _best_at(epochs, metric, evals):
    """The smallest ``metric`` of a run among its epochs ended within ``evals`` gradient evaluations."""
    within = np.asarray(epochs["grad_evals"]) <= evals
    return float(np.min(np.asarray(epochs[metric])[within])) if within.any() else float("nan")


def _equal_evals_table(runs, metric):
    """Per APTS run (alone or after Adam): its final gradient evaluations E and best ``metric``,
    beside the best of every Adam-then-L-BFGS run of the same seed within E evaluations."""
    done = [(r, p) for r, p in runs if (p / "metrics.h5").exists()]
    baselines = sorted({r.method for r, _ in done if r.method.startswith("adam-lbfgs")})
    rows, numbers = [], []
    for run, path in done:
        if "apts" not in run.method:
            continue
        epochs = _series(path)[1]
        evals, best = float(epochs["grad_evals"][-1]), float(np.min(epochs[metric]))
        others = {}
        for b in baselines:
            twin = [p for r, p in done if r.method == b and r.seed == run.seed]
            others[b] = _best_at(_series(twin[0])[1], metric, evals) if twin else float("nan")
        numbers.append(dict(method=run.method, seed=run.seed, grad_evals=evals, best=best, **others))
        rows.append([run.method, str(run.seed), f"{evals:.0f}", f"{best:.3g}",
                     *(f"{v:.3g} ({'APTS at least as accurate' if best <= v else 'APTS behind'})"
                       if np.isfinite(v) else "-" for v in others.values())])
    header = ["run", "seed", "grad evals E", f"best {metric}", *(f"{b} within E" for b in baselines)]
    return format_table(header, rows, style="markdown"), numbers


def _work(attrs, epochs):
    """Gradient evaluations times minibatch over training-set size (epochs of per-sample gradients)."""
    n_train = attrs.get("n_train")
    batch = attrs.get("config", {}).get("data", {}).get("batch_size")
    if not n_train or not batch:
        return float("nan")
    return float(epochs["grad_evals"][-1]) * min(batch, n_train) / n_train


def summarize(runs: list[Run], out: Path) -> str:
    """The suite's tables (markdown) and figures; also OUT/suite.json."""
    parts, numbers = [], {}
    out.mkdir(parents=True, exist_ok=True)
    path = lambda r: out / r.problem / r.name  # noqa: E731
    pinn = [(r, path(r)) for r in runs if r.problem == "pinn"]
    if pinn:
        table, numbers["pinn"] = _problem_table(pinn, "l2_error", "min", 1e-3, _work)
        parts += ["### PINN: 2-D Poisson, relative L2 error (target 1e-3)", "", table, ""]
        table, numbers["pinn_equal_evals"] = _equal_evals_table(pinn, "l2_error")
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
                finals.setdefault(r.sets["optimizer.lr"], []).append(_series(p)[1]["val_loss"][-1])
            best_lr = min(finals, key=lambda lr: np.mean(finals[lr]))
            target = float(np.mean(finals[best_lr]))
            numbers["shakespeare_target"] = dict(best_lr=best_lr, val_loss=target)
        table, numbers["shakespeare"] = _problem_table(lm, "val_loss", "min", target, _work)
        sweep = sum(_series(p)[1]["seconds"][-1] for r, p in lm
                    if r.method in ("adamw", "sgd") and (p / "metrics.h5").exists())
        parts += [f"### Tiny Shakespeare, small GPT: validation loss in nats per character "
                  f"(target {target:.4f}: the best AdamW of the sweep)" if target else
                  "### Tiny Shakespeare, small GPT: validation loss", "", table, "",
                  f"Total seconds of the AdamW and SGD learning-rate sweeps: {sweep:.0f}.", ""]
        _plot([p for _, p in lm], out / "shakespeare.png")
    scaling = [r for r in runs if r.problem == "scaling"]
    if scaling:
        table, numbers["scaling"] = _scaling_table(scaling, out)
        parts += ["### Scaling: APTS on the PINN, seconds per iteration (median)", "", table, ""]
    text = "\n".join(parts)
    (out / "suite.md").write_text(text)
    (out / "suite.json").write_text(json.dumps(numbers, indent=1, default=float))
    return text


def _plot(paths, figure):
    done = [p for p in paths if (p / "metrics.h5").exists()]
    if done:
        plot_runs(done, figure)


def _scaling_table(runs, out):
    rows, numbers, base = [], [], {}
    for run in runs:
        p = out / run.problem / run.name
        if not (p / "metrics.h5").exists():
            continue
        it = _series(p)[0]
        n, kind = run.sets["optimizer.subdomains"], run.method.split("-")[0]
        seconds = float(np.median(it["seconds"][1:] if len(it["seconds"]) > 1 else it["seconds"]))
        if run.method.endswith("serial"):
            local_max = np.asarray(it["seconds_local_max"])
            shared = np.asarray(it["seconds_global"])
            path_n = float(np.median(local_max + shared / n))
            numbers.append(dict(kind=kind, n=n, serial_seconds=seconds, critical_path=path_n))
            rows.append([kind, str(n), "1 (serial emulation)", f"{seconds:.3f}", f"{path_n:.3f}", "", ""])
        else:
            base.setdefault(kind, seconds if n == 1 else None)
            b = base.get(kind)
            speedup = b / seconds if b else float("nan")
            eff = speedup / n if kind == "strong" else b / seconds if b else float("nan")
            numbers.append(dict(kind=kind, n=n, ranks_seconds=seconds, speedup=speedup, efficiency=eff))
            rows.append([kind, str(n), f"{n} (measured)", f"{seconds:.3f}", "",
                         f"{speedup:.2f}" if kind == "strong" else "", f"{eff:.2f}"])
    header = ["scaling", "N", "ranks", "s / iteration", "predicted N-rank critical path s",
              "speed-up", "efficiency"]
    return format_table(header, rows, style="markdown"), numbers


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
