"""The benchmarks' tables: from their JSON rows to Markdown, through the package's one formatter
(:func:`apts_mpi.tables.format_table`, the one ``apts-mpi report`` uses too).

* :func:`iteration_summary`: ``python -m apts_mpi.bench summary`` (seconds per iteration, split);
* :func:`time_to_accuracy`: ``python -m apts_mpi.bench tta`` (run folders to a test accuracy);
* :func:`pipeline`: ``python -m apts_mpi.bench.pipeline summary`` (model-parallel APTS);
* :func:`gpu`: ``scripts/gpu_bench`` (:mod:`apts_mpi.bench.gpu`).

* :func:`suite_problem`, :func:`suite_equal_evaluations`, :func:`suite_scaling`:
  ``scripts/reproduce_suite`` (:mod:`apts_mpi.bench.suite`), from its run folders.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..tables import format_table


def iteration_summary(rows: list[dict]) -> tuple[str, list[str]]:
    """The tables of the iteration benchmark's rows (apts, baseline, allreduce, ablation) and the
    lines of its targets (speed-up of N ranks over the serial emulation, communication share)."""
    apts = [r for r in rows if r["kind"] == "apts"]
    raw = {r["ranks"]: r for r in rows if r["kind"] == "allreduce"}
    cells = []
    for r in apts:
        comb = raw_bw = ""
        if r["ranks"] > 1 and r["comm"] > 0:
            comb = f"{r['bytes'] / r['comm'] / 1e9:.2f}"
        if r["ranks"] in raw:
            raw_bw = f"{raw[r['ranks']]['allreduce_gbps']:.2f}"
        cells.append([r["label"], str(r["ranks"]), f"{r['seconds']:.3f}", f"{r['local']:.3f}",
                      f"{r['comm']:.4f}", f"{r['waiting']:.3f}", f"{r['global_']:.3f}",
                      f"{r['bookkeeping']:.3f}", f"{r['bytes'] / 1e6:.2f}", comb, raw_bw])
    out = [format_table(["run", "ranks", "s/iter", "local", "comm", "waiting", "global", "other",
                         "MB moved/rank", "comb. GB/s", "raw allreduce GB/s"], cells,
                        style="markdown")]
    out.append(format_table(
        ["baseline iteration", "ranks", "s/iter", "evaluations/iter"],
        [[r["label"], str(r["ranks"]), f"{r['seconds']:.3f}", str(r["evals_per_iteration"])]
         for r in rows if r["kind"] == "baseline"], style="markdown"))
    out.append(format_table(
        ["raw MPI (535,818 float32)", "Allreduce s", "Allreduce GB/s", "Allgatherv s",
         "Allgatherv GB/s"],
        [[r["label"], f"{r['allreduce_seconds']:.4f}", f"{r['allreduce_gbps']:.2f}",
          f"{r['allgatherv_seconds']:.4f}", f"{r['allgatherv_gbps']:.2f}"] for r in raw.values()],
        style="markdown"))
    for r in (r for r in rows if r["kind"] == "ablation"):
        out.append(format_table(
            [f"{r['label']}: local-phase savings", "s/iter", "local s"],
            [[name, f"{v['seconds']:.3f}", f"{v['local']:.3f}"] for name, v in r["results"].items()],
            style="markdown"))
        out.append("\n".join(["```", r["profile"].rstrip(), "```"]))
    by = {r["label"]: r for r in apts}
    targets = []
    for n in (2, 4):
        s, m = by.get(f"APTS serial N={n}"), by.get(f"APTS MPI N={n}")
        if s and m:
            targets.append(f"speed-up of {n} MPI ranks over serial emulation with {n} subdomains: "
                           f"{s['seconds'] / m['seconds']:.2f}x")
            targets.append(f"communication + bookkeeping at N={n}: "
                           f"{100 * (m['comm'] + m['bookkeeping']) / m['seconds']:.1f}% of the iteration "
                           f"(waiting for the slowest rank {100 * m['waiting'] / m['seconds']:.1f}%)")
    return "\n".join(["\n\n".join(out), ""] + [f"- {t}" for t in targets]), targets


def time_to_accuracy(run_dirs, target: float) -> tuple[list[dict], str]:
    """Seconds and epochs until the test accuracy of each run folder first reaches ``target``:
    (rows, table)."""
    from ..results import METRICS_FILE, read_metrics
    rows, cells = [], []
    for d in run_dirs:
        _, epochs, attrs = read_metrics(os.path.join(d, METRICS_FILE))
        acc = np.asarray(epochs["test_accuracy"])
        hit = np.flatnonzero(acc >= target)
        row = dict(run=os.path.basename(os.path.normpath(d)), ranks=attrs.get("world_size"),
                   epoch=int(epochs["epoch"][hit[0]]) if hit.size else None,
                   seconds=float(epochs["seconds"][hit[0]]) if hit.size else None,
                   best=float(100 * acc.max()), final=float(100 * acc[-1]), epochs=int(len(acc)),
                   seconds_total=float(epochs["seconds"][-1]))
        rows.append(row)
        reached = [str(row["epoch"]), f"{row['seconds']:.0f}"] if hit.size else ["not reached", "-"]
        cells.append([row["run"], str(row["ranks"]), *reached, f"{row['best']:.2f}",
                      f"{row['final']:.2f}", str(row["epochs"]), f"{row['seconds_total']:.0f}"])
    return rows, format_table(["run", "ranks", f"reached {100 * target:.0f}% at epoch", "seconds",
                               "best test acc %", "final test acc %", "epochs run", "seconds run"],
                              cells, style="markdown")


def pipeline(rows: list[dict]) -> str:
    """The model-parallel benchmark's rows: parameters and peak memory per rank, seconds per
    iteration, bytes per link of the pipe."""
    cells = []
    for r in rows:
        held = " / ".join(f"{q['params_held']:,} ({q['params_held'] / r['total']:.2f})"
                          for q in r["per_rank"])
        rss = " / ".join(f"{q['peak_rss_mib']:.0f}" for q in r["per_rank"])
        links = " / ".join(f"{q['bytes_down'] / 1e6:.1f} ({r['per_rank'][i + 1]['bytes_up'] / 1e6:.1f})"
                           for i, q in enumerate(r["per_rank"][:-1])) or "-"
        links = links if r["mode"] == "model-parallel" else "- (collectives)"
        ranks = f"{r['ranks']} (oversubscribed)" if r["oversubscribed"] else str(r["ranks"])
        cells.append([r["network"], r["mode"], ranks, held, rss, f"{r['seconds']:.3f}", links])
    return format_table(["network", "mode", "ranks", "params held per rank (share)",
                         "peak RSS per rank MiB", "s/iter", "MB per link per iter, down (up)"],
                        cells, style="markdown")


# -- scripts/gpu_bench ------------------------------------------------------------------------------
def _split(row) -> str:
    """Predicted cost share against measured local-seconds share, per subdomain (ranks: each
    rank's local phase), or against the critical path's share (serial emulation: the longest
    local phase over all of them, the one number the report gives per iteration)."""
    if "local_seconds" in row:
        measured = [row["local_seconds"][k] for k in sorted(row["local_seconds"], key=int)]
        total = sum(measured) or 1.0
        return " ".join(f"{100 * p:.0f}/{100 * m / total:.0f}"
                        for p, m in zip(row["predicted"], measured))
    predicted = " ".join(f"{100 * p:.0f}" for p in row["predicted"])
    return (f"{predicted} / longest {100 * row['local_critical'] / (row['local_total'] or 1.0):.0f}"
            f" (max {100 * max(row['predicted']):.0f})")


def _critical_local(row) -> float:
    if "local_seconds" in row:
        return max(row["local_seconds"].values())
    return row["local_critical"]


def gpu(result, target: float) -> str:
    """The GPU benchmark's table (one row per network, method and option), its time-to-accuracy
    lines and its targets."""
    cells = []
    for r in result["rows"]:
        if "error" in r:
            cells.append([r["network"], r["option"], "-", "-", "-", "-", "-", "FAILED: " + r["error"]])
            continue
        apts = r["option"] != "adam"
        label = "Adam" if not apts else f"APTS {r['option']}"
        where = "1" if r["ranks"] == 1 else f"{r['ranks']} ranks"
        cells.append([r["network"], label, where, str(r["subdomains"] or "-"),
                      f"{r['seconds'] * 1e3:.1f}", f"{r['peak_mb']:.0f}",
                      f"{_critical_local(r) * 1e3:.1f}" if apts else "-",
                      _split(r) if apts else ""])
    lines = [f"device: {result['device']}, torch {result['torch']}, data: {result['data']}",
             format_table(["network", "method", "ranks", "N", "ms/iter", "peak MB",
                           "critical local ms", "split % predicted/measured"], cells,
                          style="markdown"), ""]
    for r in result["tta"]:
        if "error" in r:
            lines.append(f"- MNIST time to {100 * target:.0f}%, {r['method']}: FAILED: {r['error']}")
        elif r["epoch"] is None:
            lines.append(f"- MNIST time to {100 * target:.0f}%, {r['method']}: not reached in "
                         f"{r['epochs']} epochs (best {100 * r['best']:.2f}%)")
        else:
            lines.append(f"- MNIST time to {100 * target:.0f}%, {r['method']}: {r['seconds']:.2f} s "
                         f"(epoch {r['epoch']}, best {100 * r['best']:.2f}%)")
    lines += _gpu_targets(result, target)
    return "\n".join(lines)


def _gpu_targets(result, target) -> list[str]:
    """The GPU targets: MNIST APTS iteration <= 10 ms, time to 97% <= 2x Adam's, ResNet-18 APTS
    iteration (serial N = 4) <= 3.5 s; the best option of each row."""
    out = []
    single = [r for r in result["rows"] if "error" not in r and r["ranks"] == 1 and r["option"] != "adam"]
    for network, limit in (("mnist-fc", 0.010), ("resnet18", 3.5)):
        rows = [r for r in single if r["network"] == network]
        if rows:
            best = min(rows, key=lambda r: r["seconds"])
            out.append(f"- target {network} APTS iteration <= {limit:g} s: best {best['seconds']:.4f} s "
                       f"({best['option']}): {'met' if best['seconds'] <= limit else 'not met'}")
    tta = {r["method"]: r for r in result["tta"] if r.get("seconds") is not None}
    apts = [m for m in tta if m.startswith("apts")]
    if apts and "adam" in tta:
        best = min(apts, key=lambda m: tta[m]["seconds"])
        ratio = tta[best]["seconds"] / tta["adam"]["seconds"]
        out.append(f"- target MNIST time to {100 * target:.0f}% <= 2x Adam's: {ratio:.2f}x ({best}): "
                   f"{'met' if ratio <= 2 else 'not met'}")
    return out


# -- scripts/reproduce_suite ------------------------------------------------------------------------
def run_series(run_dir):
    """(iterations, epochs, attrs) of a run folder's metrics.h5."""
    from ..results import read_metrics
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


def suite_problem(runs, metric, mode, target, work_of):
    """Rows of one problem: per method, seeds, final and best metric, time/evaluations to target."""
    rows, numbers = [], []
    by_method = {}
    for run, path in runs:
        by_method.setdefault(run.name.rsplit("-seed", 1)[0], []).append(path)
    for method, paths in by_method.items():
        series = [run_series(p) for p in paths if (Path(p) / "metrics.h5").exists()]
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


def suite_equal_evaluations(runs, metric):
    """Per APTS run (alone or after Adam): its final gradient evaluations E and best ``metric``,
    beside the best of every Adam-then-L-BFGS run of the same seed within E evaluations."""
    done = [(r, p) for r, p in runs if (p / "metrics.h5").exists()]
    baselines = sorted({r.method for r, _ in done if r.method.startswith("adam-lbfgs")})
    rows, numbers = [], []
    for run, path in done:
        if "apts" not in run.method:
            continue
        epochs = run_series(path)[1]
        evals, best = float(epochs["grad_evals"][-1]), float(np.min(epochs[metric]))
        others = {}
        for b in baselines:
            twin = [p for r, p in done if r.method == b and r.seed == run.seed]
            others[b] = _best_at(run_series(twin[0])[1], metric, evals) if twin else float("nan")
        numbers.append(dict(method=run.method, seed=run.seed, grad_evals=evals, best=best, **others))
        rows.append([run.method, str(run.seed), f"{evals:.0f}", f"{best:.3g}",
                     *(f"{v:.3g} ({'APTS at least as accurate' if best <= v else 'APTS behind'})"
                       if np.isfinite(v) else "-" for v in others.values())])
    header = ["run", "seed", "grad evals E", f"best {metric}", *(f"{b} within E" for b in baselines)]
    return format_table(header, rows, style="markdown"), numbers


def gradient_work(attrs, epochs):
    """Gradient evaluations times minibatch over training-set size (epochs of per-sample gradients)."""
    n_train = attrs.get("n_train")
    batch = attrs.get("config", {}).get("data", {}).get("batch_size")
    if not n_train or not batch:
        return float("nan")
    return float(epochs["grad_evals"][-1]) * min(batch, n_train) / n_train


def suite_scaling(runs, out):
    """Seconds per iteration of the scaling runs, N ranks beside the serial emulation's predicted
    critical path (the longest local phase plus the shared global work divided by N)."""
    rows, numbers, base = [], [], {}
    for run in runs:
        p = out / run.problem / run.name
        if not (p / "metrics.h5").exists():
            continue
        it = run_series(p)[0]
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
