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
``scripts/bench`` runs the whole set.  APTS is handed a ``Comm(measure_wait=True)``: a barrier
before each collective counts the wait for the slowest rank apart from the transfer.  Build, warm-up,
timing, median and JSON are the harness's (:mod:`apts_mpi.bench.harness`), the tables
:mod:`apts_mpi.bench.tables`'s.
The minibatch is the first 10,000 MNIST training images when ``--data`` (or ``APTS_DATA``) holds
MNIST, else random data of MNIST's shape (the cost of an iteration does not depend on the values).
"""
from __future__ import annotations

import argparse
import json
import os

import torch

from ..comm import Comm, world
from ..models import build_model, count_parameters
from . import tables
from .harness import (append_jsonl, build_apts, config_options, median, read_jsonl, time_steps,
                      write_json)


def minibatch(root=None, size=10000):
    from ..data import DataError, load_dataset
    try:
        data = load_dataset("mnist", root)
        return data.train_x[:size], data.train_y[:size], "mnist"
    except DataError:
        g = torch.Generator().manual_seed(0)
        return torch.randn(size, 1, 28, 28, generator=g), torch.randint(0, 10, (size,), generator=g), "random"


def _model():
    torch.manual_seed(0)
    return build_model("mnist-fc", (1, 28, 28), 10)


def _keywords(args) -> dict:
    """The ``--option KEY=VALUE`` APTS keywords (values read as YAML: 0.5, shard, true)."""
    import yaml
    pairs = [o.partition("=") for o in args.option]
    if any(not sep for _, sep, _ in pairs):
        raise SystemExit(f"--option needs KEY=VALUE; got {args.option}")
    return {k: yaml.safe_load(v) for k, _, v in pairs}


def bench_apts(args):
    # benchmark only: a barrier before each collective splits the wait from the transfer
    comm = Comm(world(), measure_wait=world().size > 1)
    x, y, source = minibatch(args.data)
    model = _model()
    keywords = config_options(args.config) if args.config else {}
    keywords.update({k: v for k, v in (("local_iters", args.local_iters),
                                       ("global_iters", args.global_iters)) if v is not None})
    keywords.update(_keywords(args))
    opt = build_apts(model, torch.nn.functional.cross_entropy, comm,
                     subdomains=args.subdomains if comm.size == 1 else None, **keywords)
    rows, moved = [], [comm.bytes]

    def record(total):
        r = opt.report
        rows.append(dict(total=total, local=r.seconds_local, comm=r.seconds_comm,
                         waiting=r.seconds_wait, global_=r.seconds_global,
                         bytes=comm.bytes - moved[-1]))

    def step():
        moved.append(comm.bytes)
        opt.step(x, y)
    time_steps(step, args.warmup, args.iterations, comm=comm, after=record)
    gathered = comm.gather_object(rows, root=0)
    if comm.rank == 0:
        # per iteration: the breakdown of the critical rank (the one with the most local work), and
        # the longest wait of any rank (the idle time that load imbalance costs)
        per_iteration = []
        for i in range(len(rows)):
            ranks = [r[i] for r in gathered]
            crit = max(ranks, key=lambda row: row["local"])
            other = crit["total"] - crit["local"] - crit["global_"] - crit["comm"] - crit["waiting"]
            per_iteration.append(dict(crit, other=other, waiting=max(row["waiting"] for row in ranks)))
        med = {k: median(row[k] for row in per_iteration) for k in per_iteration[0]}
        label = " ".join([f"APTS MPI N={comm.size}" if comm.size > 1
                          else f"APTS serial N={args.subdomains}",
                          *([os.path.basename(args.config)] if args.config else []), *args.option])
        return dict(kind="apts", label=label, ranks=comm.size, subdomains=opt.n_subdomains,
                    parameters=count_parameters(model), data=source, iterations=args.iterations,
                    seconds=med["total"], local=med["local"], comm=med["comm"], waiting=med["waiting"],
                    global_=med["global_"], bytes=med["bytes"], bookkeeping=med["other"])


def ablation(args):
    """Seconds per serial-emulation iteration with each local-phase saving switched off in turn
    (APTS's public switches ``freeze_others`` and ``cache_prefix``, set between steps), and a
    torch.profiler table of one iteration (where the time goes)."""
    x, y, source = minibatch(args.data)
    results = {}
    for name, freeze, cache in (("both savings", True, True), ("no prefix cache", True, False),
                                ("no freezing, no prefix cache", False, False)):
        opt = build_apts(_model(), torch.nn.functional.cross_entropy, subdomains=args.subdomains)
        opt.freeze_others, opt.cache_prefix = freeze, cache
        local = []
        times = time_steps(lambda: opt.step(x, y), args.warmup, args.iterations,
                           after=lambda _: local.append(opt.report.seconds_local))
        results[name] = dict(seconds=median(times), local=local[-1])
    from torch.profiler import ProfilerActivity, profile
    opt = build_apts(_model(), torch.nn.functional.cross_entropy, subdomains=args.subdomains)
    opt.step(x, y)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        opt.step(x, y)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
    return dict(kind="ablation", label=f"APTS serial N={args.subdomains}", data=source,
                results=results, profile=table)


def bench_allreduce(args):
    """Raw Allreduce and Allgatherv bandwidth for an n-float32 buffer, n = the network's parameter
    count (the communication layer's buffer methods, timed by the harness)."""
    comm = world()
    n = count_parameters(_model())
    buf = torch.ones(n, dtype=torch.float32)
    t_ar = median(time_steps(lambda: comm.allreduce_(buf), args.warmup, 3 * args.iterations,
                             comm=comm))
    counts = [n * (p + 1) // comm.size - n * p // comm.size for p in range(comm.size)]
    displs = [n * p // comm.size for p in range(comm.size)]
    t_ag = median(time_steps(lambda: comm.allgatherv_(buf, counts, displs), args.warmup,
                             3 * args.iterations, comm=comm))
    if comm.rank == 0:
        p = comm.size
        return dict(kind="allreduce", label=f"raw MPI, {p} ranks", ranks=p, bytes=4 * n,
                    allreduce_seconds=t_ar, allgatherv_seconds=t_ag,
                    # bus bandwidth: 2(p-1)/p * S / t for a ring Allreduce, (p-1)/p * S / t for Allgather
                    allreduce_gbps=2 * (p - 1) / p * 4 * n / t_ar / 1e9,
                    allgatherv_gbps=(p - 1) / p * 4 * n / t_ag / 1e9)


def bench_baseline(args):
    from ..optimizers import build_optimizer
    comm = world()
    x, y, source = minibatch(args.data)
    model = _model()
    kw = {"adam": dict(lr=2.5e-3), "sgd": dict(lr=0.1, momentum=0.9), "tr": {},
          "lbfgs": dict(lr=1.0, history_size=10, max_iter=1)}[args.method]
    opt = build_optimizer({"seed": 0, "optimizer": dict(method=args.method, **kw)}, model,
                          torch.nn.functional.cross_entropy, comm)
    times = time_steps(lambda: opt.step(x, y), args.warmup, args.iterations, comm=comm)
    if comm.rank == 0:
        return dict(kind="baseline", label=f"{args.method} ({comm.size} rank data-parallel)",
                    ranks=comm.size, data=source, seconds=median(times),
                    evals_per_iteration=opt.record()["grad_evals"])


def summary(paths, json_out=None):
    """The tables of the rows in the JSON-lines files ``paths`` (and their numbers in ``json_out``)."""
    rows = read_jsonl(paths)
    table, targets = tables.iteration_summary(rows)
    if json_out:
        write_json(json_out, dict(rows=rows, targets=targets))
    return table


def time_to_accuracy(run_dirs, target, json_out=None):
    """Seconds and epochs until the test accuracy first reaches ``target``, one row per run."""
    rows, table = tables.time_to_accuracy(run_dirs, target)
    if json_out:
        write_json(json_out, dict(target=target, rows=rows))
    return table


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
            append_jsonl(args.out, result)


if __name__ == "__main__":
    main()
