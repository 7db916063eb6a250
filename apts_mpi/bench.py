"""Benchmarks of one optimiser iteration on the paper's MNIST network (784-512-256-10, 535,818
parameters) and a 10,000-image minibatch.

    python -m apts_mpi.bench apts --subdomains 2 --out runs/bench/results.jsonl        # serial emulation
    python -m apts_mpi.bench apts --subdomains 2 --option space=data --out runs/bench/results.jsonl
    python -m apts_mpi.bench apts --subdomains 2 --config configs/mnist-apts-fast-n2.yaml
    mpiexec -n 2 python -m mpi4py -m apts_mpi.bench apts --out runs/bench/results.jsonl
    mpiexec -n 2 python -m mpi4py -m apts_mpi.bench allreduce --out runs/bench/results.jsonl
    python -m apts_mpi.bench baseline --method adam --out runs/bench/results.jsonl
    python -m apts_mpi.bench summary runs/bench/results.jsonl --json runs/bench/bench.json

Each measurement appends one JSON line; ``summary`` prints the table and writes the JSON.
``scripts/bench`` runs the whole set.  APTS times are split with ``Comm(measure_wait=True)``: a
barrier before each collective counts the wait for the slowest rank apart from the transfer.
The minibatch is the first 10,000 MNIST training images when ``--data`` (or ``APTS_DATA``) holds
MNIST, else random data of MNIST's shape (the cost of an iteration does not depend on the values).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np
import torch

from .apts import APTS
from .comm import Comm
from .models import build_model, count_parameters


def minibatch(root=None, size=10000):
    from .data import DataError, load_dataset
    try:
        data = load_dataset("mnist", root)
        return data.train_x[:size], data.train_y[:size], "mnist"
    except DataError:
        g = torch.Generator().manual_seed(0)
        return torch.randn(size, 1, 28, 28, generator=g), torch.randint(0, 10, (size,), generator=g), "random"


def _model():
    torch.manual_seed(0)
    return build_model("mnist-fc", (1, 28, 28), 10)


def _world():
    from mpi4py import MPI
    return MPI.COMM_WORLD


CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def config_options(path) -> dict:
    """The APTS keywords of the config file ``path`` (validated, defaults filled in), less
    ``method`` and ``subdomains`` (the benchmark's world sets those): the benchmarks take a
    config's settings from the file itself, never from a copy."""
    from .config import load
    keywords = dict(load(path)["optimizer"])
    if keywords.pop("method") != "apts":
        raise SystemExit(f"{path}: not an APTS config")
    keywords.pop("subdomains")
    return keywords


def _keywords(args) -> dict:
    """The ``--option KEY=VALUE`` APTS keywords (values read as YAML: 0.5, shard, true)."""
    import yaml
    pairs = [o.partition("=") for o in args.option]
    if any(not sep for _, sep, _ in pairs):
        raise SystemExit(f"--option needs KEY=VALUE; got {args.option}")
    return {k: yaml.safe_load(v) for k, _, v in pairs}


def bench_apts(args):
    comm = _world()
    x, y, source = minibatch(args.data)
    model = _model()
    keywords = config_options(args.config) if args.config else {}
    keywords.update({k: v for k, v in (("local_iters", args.local_iters),
                                       ("global_iters", args.global_iters)) if v is not None})
    keywords.update(_keywords(args))
    opt = APTS(model, torch.nn.functional.cross_entropy, comm,
               subdomains=args.subdomains if comm.Get_size() == 1 else None, **keywords)
    opt.comm = Comm(comm, measure_wait=comm.Get_size() > 1)  # benchmark only: split wait from transfer
    rows = []
    for k in range(args.warmup + args.iterations):
        b0 = opt.comm.bytes
        comm.Barrier()
        t = time.perf_counter()
        opt.step(x, y)
        total = time.perf_counter() - t
        r = opt.report
        if k >= args.warmup:
            rows.append(dict(total=total, local=r.seconds_local, comm=r.seconds_comm,
                             waiting=r.seconds_wait, global_=r.seconds_global,
                             bytes=opt.comm.bytes - b0))
    gathered = comm.gather(rows, root=0)
    if comm.Get_rank() == 0:
        # per iteration: the breakdown of the critical rank (the one with the most local work), and
        # the longest wait of any rank (the idle time that load imbalance costs)
        per_iteration = []
        for i in range(len(rows)):
            ranks = [r[i] for r in gathered]
            crit = max(ranks, key=lambda row: row["local"])
            other = crit["total"] - crit["local"] - crit["global_"] - crit["comm"] - crit["waiting"]
            per_iteration.append(dict(crit, other=other, waiting=max(row["waiting"] for row in ranks)))
        med = {k: statistics.median(row[k] for row in per_iteration) for k in per_iteration[0]}
        label = " ".join([f"APTS MPI N={comm.Get_size()}" if comm.Get_size() > 1
                          else f"APTS serial N={args.subdomains}",
                          *([os.path.basename(args.config)] if args.config else []), *args.option])
        return dict(kind="apts", label=label, ranks=comm.Get_size(), subdomains=opt.n_subdomains,
                    parameters=count_parameters(model), data=source, iterations=args.iterations,
                    seconds=med["total"], local=med["local"], comm=med["comm"], waiting=med["waiting"],
                    global_=med["global_"], bytes=med["bytes"], bookkeeping=med["other"])


def ablation(args):
    """Seconds per serial-emulation iteration with each local-phase saving switched off in turn,
    and a torch.profiler table of one iteration (where the time goes)."""
    x, y, source = minibatch(args.data)
    results = {}
    for name, freeze, cache in (("both savings", True, True), ("no prefix cache", True, False),
                                ("no freezing, no prefix cache", False, False)):
        model = _model()
        opt = APTS(model, torch.nn.functional.cross_entropy, subdomains=args.subdomains)
        opt.freeze_others, opt.cache_prefix = freeze, cache
        times = []
        for k in range(args.warmup + args.iterations):
            t = time.perf_counter()
            opt.step(x, y)
            times.append(time.perf_counter() - t)
        results[name] = dict(seconds=statistics.median(times[args.warmup:]),
                             local=opt.report.seconds_local)
    from torch.profiler import ProfilerActivity, profile
    opt = APTS(_model(), torch.nn.functional.cross_entropy, subdomains=args.subdomains)
    opt.step(x, y)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        opt.step(x, y)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
    return dict(kind="ablation", label=f"APTS serial N={args.subdomains}", data=source,
                results=results, profile=table)


def bench_allreduce(args):
    """Raw Allreduce bandwidth for an n-float32 buffer, n = the network's parameter count."""
    from mpi4py import MPI
    comm = _world()
    n = count_parameters(_model())
    buf = np.ones(n, dtype=np.float32)
    times = []
    for k in range(args.warmup + 3 * args.iterations):
        comm.Barrier()
        t = time.perf_counter()
        comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        times.append(time.perf_counter() - t)
    t_ar = statistics.median(times[args.warmup:])
    times = []
    counts = [n * (p + 1) // comm.Get_size() - n * p // comm.Get_size() for p in range(comm.Get_size())]
    displs = [n * p // comm.Get_size() for p in range(comm.Get_size())]
    for k in range(args.warmup + 3 * args.iterations):
        comm.Barrier()
        t = time.perf_counter()
        comm.Allgatherv(MPI.IN_PLACE, [buf, counts, displs, MPI.FLOAT])
        times.append(time.perf_counter() - t)
    t_ag = statistics.median(times[args.warmup:])
    if comm.Get_rank() == 0:
        p = comm.Get_size()
        return dict(kind="allreduce", label=f"raw MPI, {p} ranks", ranks=p, bytes=4 * n,
                    allreduce_seconds=t_ar, allgatherv_seconds=t_ag,
                    # bus bandwidth: 2(p-1)/p * S / t for a ring Allreduce, (p-1)/p * S / t for Allgather
                    allreduce_gbps=2 * (p - 1) / p * 4 * n / t_ar / 1e9,
                    allgatherv_gbps=(p - 1) / p * 4 * n / t_ag / 1e9)


def bench_baseline(args):
    from .optimizers import build_optimizer
    comm = _world()
    x, y, source = minibatch(args.data)
    model = _model()
    kw = {"adam": dict(lr=2.5e-3), "sgd": dict(lr=0.1, momentum=0.9), "tr": {},
          "lbfgs": dict(lr=1.0, history_size=10, max_iter=1)}[args.method]
    opt = build_optimizer({"seed": 0, "optimizer": dict(method=args.method, **kw)}, model,
                          torch.nn.functional.cross_entropy, comm)
    times = []
    for k in range(args.warmup + args.iterations):
        comm.Barrier()
        t = time.perf_counter()
        opt.step(x, y)
        times.append(time.perf_counter() - t)
    if comm.Get_rank() == 0:
        return dict(kind="baseline", label=f"{args.method} ({comm.Get_size()} rank data-parallel)",
                    ranks=comm.Get_size(), data=source, seconds=statistics.median(times[args.warmup:]),
                    evals_per_iteration=opt.record()["grad_evals"])


def summary(paths, json_out=None):
    from .results import format_table
    rows = [json.loads(line) for p in paths for line in open(p) if line.strip()]
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
    tables = [format_table(["run", "ranks", "s/iter", "local", "comm", "waiting", "global", "other",
                            "MB moved/rank", "comb. GB/s", "raw allreduce GB/s"], cells,
                           style="markdown")]
    tables.append(format_table(
        ["baseline iteration", "ranks", "s/iter", "evaluations/iter"],
        [[r["label"], str(r["ranks"]), f"{r['seconds']:.3f}", str(r["evals_per_iteration"])]
         for r in rows if r["kind"] == "baseline"], style="markdown"))
    tables.append(format_table(
        ["raw MPI (535,818 float32)", "Allreduce s", "Allreduce GB/s", "Allgatherv s",
         "Allgatherv GB/s"],
        [[r["label"], f"{r['allreduce_seconds']:.4f}", f"{r['allreduce_gbps']:.2f}",
          f"{r['allgatherv_seconds']:.4f}", f"{r['allgatherv_gbps']:.2f}"] for r in raw.values()],
        style="markdown"))
    for r in (r for r in rows if r["kind"] == "ablation"):
        tables.append(format_table(
            [f"{r['label']}: local-phase savings", "s/iter", "local s"],
            [[name, f"{v['seconds']:.3f}", f"{v['local']:.3f}"] for name, v in r["results"].items()],
            style="markdown"))
        tables.append("\n".join(["```", r["profile"].rstrip(), "```"]))
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
    table = "\n".join(["\n\n".join(tables), ""] + [f"- {t}" for t in targets])
    if json_out:
        with open(json_out, "w") as f:
            json.dump(dict(rows=rows, targets=targets), f, indent=1)
    return table


def time_to_accuracy(run_dirs, target, json_out=None):
    """Seconds and epochs until the test accuracy first reaches ``target``, one row per run."""
    from .results import METRICS_FILE, format_table, read_metrics
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
    if json_out:
        with open(json_out, "w") as f:
            json.dump(dict(target=target, rows=rows), f, indent=1)
    return format_table(["run", "ranks", f"reached {100 * target:.0f}% at epoch", "seconds",
                         "best test acc %", "final test acc %", "epochs run", "seconds run"], cells,
                        style="markdown")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m apts_mpi.bench", description=__doc__.split("\n")[0])
    p.add_argument("what", choices=("apts", "allreduce", "baseline", "ablation", "summary", "tta"))
    p.add_argument("paths", nargs="*", help="summary: the JSON-lines files; tta: run folders")
    p.add_argument("--target", type=float, default=0.97, help="tta: the test accuracy to reach")
    p.add_argument("--out", help="append the result to this JSON-lines file")
    p.add_argument("--json", help="summary: write the table's numbers here")
    p.add_argument("--subdomains", type=int, default=1)
    p.add_argument("--method", choices=("adam", "sgd", "tr", "lbfgs"), default="adam")
    p.add_argument("--iterations", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--config", help="apts: take the APTS keywords of this config file")
    p.add_argument("--local-iters", type=int, help="apts: local iterations (over --config's)")
    p.add_argument("--global-iters", type=int, help="apts: global iterations (over --config's)")
    p.add_argument("--data", default=os.environ.get("APTS_DATA"))
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="apts: an APTS keyword (a YAML value) over --config's, e.g. local_batch=shard; "
                        "repeatable")
    args = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if args.what == "summary":
        print(summary(args.paths, args.json))
        return
    if args.what == "tta":
        print(time_to_accuracy(args.paths, args.target, args.json))
        return
    result = {"apts": bench_apts, "allreduce": bench_allreduce, "baseline": bench_baseline,
              "ablation": ablation}[args.what](args)
    if result is not None:
        print(json.dumps(result))
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
