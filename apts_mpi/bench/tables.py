"""The benchmarks' tables: from their JSON rows to Markdown, through the package's one formatter
(:func:`apts_mpi.tables.format_table`, the one ``apts-mpi report`` uses too).

* :func:`iteration_summary`: ``python -m apts_mpi.bench summary`` (seconds per iteration, split);
* :func:`time_to_accuracy`: ``python -m apts_mpi.bench tta`` (run folders to a test accuracy);
* :func:`pipeline`: ``python -m apts_mpi.bench.pipeline summary`` (model-parallel APTS);
* :func:`gpu`: ``scripts/gpu_bench`` (:mod:`apts_mpi.bench.gpu`).

The suite's tables (:mod:`apts_mpi.bench.suite`) compute their numbers from run folders beside
them and format them with the same formatter.
"""
from __future__ import annotations

import os

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
