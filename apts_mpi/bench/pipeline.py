"""Benchmark of model-parallel APTS (apts_mpi/model_parallel.py) beside data-parallel APTS.

    mpiexec -n N python -m mpi4py -m apts_mpi.bench.pipeline run --network mnist --out FILE.jsonl
    python -m apts_mpi.bench.pipeline summary FILE.jsonl --json FILE.json

``run`` times ``--iterations`` APTS iterations (after one warm-up) with ``decomposition="stages"``
on one of three networks (``mnist``: 784-512-256-10; ``deep``: a uniform MLP of 16 layers
512 -> 512; ``gpt``: the small GPT, 2 blocks of width 64, on random characters) and appends one
JSON line: per rank, the parameter scalars held, the peak resident set size (``ru_maxrss``; it
includes the whole model that every rank builds from the seed before the optimiser releases the
other blocks), the bytes each rank sent down and up the pipe per iteration; and the median
seconds per iteration.  ``--mode data-parallel`` runs today's APTS (every rank holds the whole
network) for comparison.  ``summary`` prints the table and writes the JSON.  ``scripts/bench_pipeline``
runs the whole set.
"""
from __future__ import annotations

import argparse
import json
import resource

import torch

from ..comm import world
from ..models import build_model
from . import tables
from .harness import append_jsonl, build_apts, median, read_jsonl, time_steps, write_json

NETWORKS = ("mnist", "deep", "gpt")


def problem(name: str, batch: int):
    """(model, x, y) of a network, seeded."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if name == "gpt":
        from ..problems.language import GPT_SIZES, gpt
        layers, heads, width, context = GPT_SIZES["gpt-small"]
        ids = torch.randint(0, 65, (batch, context + 1), generator=g)
        return gpt(65, layers, heads, width, context), ids[:, :-1], ids[:, 1:]
    if name == "deep":
        layers = []
        for _ in range(16):
            layers += [torch.nn.Linear(512, 512), torch.nn.ReLU()]
        model = torch.nn.Sequential(*layers[:-1])
        return model, torch.randn(batch, 512, generator=g), torch.randint(0, 512, (batch,), generator=g)
    model = build_model("mnist-fc", (1, 28, 28), 10)
    return model, torch.randn(batch, 1, 28, 28, generator=g), torch.randint(0, 10, (batch,), generator=g)


def run(args):
    comm = world()
    model, x, y = problem(args.network, args.batch)
    total = sum(p.numel() for p in model.parameters())
    mp = args.mode == "model-parallel"
    opt = build_apts(model, torch.nn.functional.cross_entropy, comm.comm, decomposition="stages",
                     model_parallel=mp, local_iters=args.local_iters, micro_batch=args.micro_batch)
    sent = []
    seconds = time_steps(lambda: opt.step(x, y), 1, args.iterations, comm=comm, barrier_after=True,
                         after=lambda _: sent.append(opt.bytes_per_link if mp else (0, 0)))
    held = opt.params_held if mp else total
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (Linux: KiB)
    per_rank = comm.gather_object(dict(params_held=held, peak_rss_mib=rss,
                                       bytes_down=median(s[0] for s in sent),
                                       bytes_up=median(s[1] for s in sent)), root=0)
    if comm.rank == 0:
        row = dict(network=args.network, mode=args.mode, ranks=comm.size, total=total,
                   batch=args.batch, micro_batch=args.micro_batch, local_iters=args.local_iters,
                   seconds=median(seconds), per_rank=per_rank, oversubscribed=comm.size > args.cores)
        append_jsonl(args.out, row)
        print(json.dumps(row))


def summary(paths, json_out=None):
    rows = read_jsonl(paths)
    print(tables.pipeline(rows))
    if json_out:
        write_json(json_out, rows)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m apts_mpi.bench.pipeline", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="time model-parallel (or data-parallel) APTS on this world")
    r.add_argument("--network", choices=NETWORKS, default="mnist")
    r.add_argument("--mode", choices=("model-parallel", "data-parallel"), default="model-parallel")
    r.add_argument("--batch", type=int, default=2000)
    r.add_argument("--micro-batch", type=int, default=None)
    r.add_argument("--local-iters", type=int, default=5)
    r.add_argument("--iterations", type=int, default=3)
    r.add_argument("--cores", type=int, default=2, help="cores of the machine (label oversubscription)")
    r.add_argument("--out", required=True)
    s = sub.add_parser("summary", help="print the table of JSON lines files and write the JSON")
    s.add_argument("paths", nargs="+")
    s.add_argument("--json")
    args = p.parse_args(argv)
    if args.command == "run":
        run(args)
    else:
        summary(args.paths, args.json)


if __name__ == "__main__":
    main()
