"""APTS on one GPU: seconds per iteration with each option, the cost split, MNIST time to 97%.

    scripts/gpu_bench [--data ROOT] [--out DIR]                    (one GPU, under 5 minutes)
    python -m apts_mpi.bench.gpu --device cpu --quick --out DIR    (smoke test: tiny sizes, seconds)

Rows (each timed between device synchronisations, median over the timed iterations):

* MNIST network 784-512-256-10, 10,000-image minibatch, APTS serial emulation N = 2 with the
  paper's run's keywords (configs/mnist-apts-n2.yaml), and Adam (lr 2.5e-3) on the same batch;
* ResNet-18 on a synthetic CIFAR-shaped minibatch of 10,000 images, micro-batch 1000, APTS serial
  N = 4 (configs/cifar10-resnet18-apts-n4.yaml), and Adam with the same micro-batches;
* each APTS row once per option: ``default``, ``autocast=bf16``, ``decomposition=cost``, both,
  ``local_decisions=device`` (branch-free local phases), and for MNIST the fast config's options
  (``fast``: configs/mnist-apts-fast-n2.yaml) with and without device decisions;
  the peak device memory of the row (``torch.cuda.max_memory_allocated``; on the CPU the process's
  peak resident set, which never goes down); the predicted cost share of each subdomain
  (:func:`apts_mpi.decomposition.evaluation_costs`) beside the measured share: on 2 ranks each
  subdomain's local-phase seconds, in serial emulation the longest local phase over all of them
  (the iteration report's ``seconds_local_max`` and ``seconds_local``);
* the MNIST rows on 2 MPI ranks sharing the device (``balanced``, ``cost``, ``device`` and
  ``fast+device``), where ``mpiexec``
  is found (``MPIEXEC`` to choose it), launched as ``mpiexec -n 2 python -m mpi4py``;
* MNIST time to 97% test accuracy for APTS (N = 2 serial) and Adam: real MNIST from ``--data``
  (or ``APTS_DATA``), minibatches of 10,000 drawn without overlap from a seeded permutation per
  epoch; training seconds only (the test evaluation after each epoch is not counted).

Prints the table and writes ``DIR/gpu_bench.json``.  ``--quick`` shrinks every size (random data, the
LeNet-5 CNN in place of ResNet-18) so that the whole script runs in seconds on a CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from ..decomposition import evaluation_costs
from ..models import build_model
from ..objective import as_objective
from . import tables
from .harness import (CONFIGS, build_apts, config_options, median, peak_memory_mb,
                      reset_peak_memory, sync, time_steps, write_json)

# the paper's MNIST setting and the fast config, read from their config files
MNIST_APTS = config_options(CONFIGS / "mnist-apts-n2.yaml")
FAST = config_options(CONFIGS / "mnist-apts-fast-n2.yaml")
RESNET_APTS = dict(acceptance="none", global_iters=1)
# branch-free local phases, one transfer each (the scaled norm forms its steps on the host)
DEVICE = dict(local_decisions="device", scaling="none")
OPTIONS = {"default": {}, "bf16": dict(autocast="bf16"), "cost": dict(decomposition="cost"),
           "bf16+cost": dict(autocast="bf16", decomposition="cost"), "device": DEVICE,
           "fast": FAST, "fast+device": dict(FAST, **DEVICE)}
RESNET_OPTIONS = ("default", "bf16", "cost", "bf16+cost", "device")
ADAM_LR = 2.5e-3
TARGET = 0.97


def sizes(quick: bool) -> dict:
    if quick:
        # a CPU smoke test: ResNet-18 (11M parameters, slow bfloat16 convolutions on most CPUs)
        # replaced by the small LeNet-5 CNN
        return dict(mnist_batch=64, conv="cifar-lenet5", resnet_batch=8, resnet_micro=4, warmup=0,
                    mnist_iters=1, resnet_iters=1, tta_train=128, tta_test=64, tta_batch=64,
                    tta_epochs=1)
    return dict(mnist_batch=10000, conv="resnet18", resnet_batch=10000, resnet_micro=1000, warmup=1,
                mnist_iters=10, resnet_iters=2, tta_train=None, tta_test=None, tta_batch=10000,
                tta_epochs=40)


def _random_batch(n, shape, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return x.to(device), y.to(device)


def _model(name, shape, device):
    torch.manual_seed(0)
    if name == "deep-mlp":  # uniform layers: where the cost split departs from the parameter count
        layers = [torch.nn.Flatten(), torch.nn.Linear(784, 512), torch.nn.ReLU()]
        for _ in range(7):
            layers += [torch.nn.Linear(512, 512), torch.nn.ReLU()]
        return torch.nn.Sequential(*layers, torch.nn.Linear(512, 10)).to(device)
    return build_model(name, shape, 10).to(device)


def apts_row(network, option, batch, device, s, comm=None, subdomains=None):
    """Median seconds per APTS iteration, peak memory, predicted and measured split (from the
    iteration report: the longest local phase and all of them; ``comm``, a Comm: this rank's)."""
    x, y = batch
    shape = tuple(x.shape[1:])
    model = _model(network, shape, device)
    fully_connected = network in ("mnist-fc", "deep-mlp")
    keywords = dict(MNIST_APTS if fully_connected else RESNET_APTS, **OPTIONS[option])
    if not fully_connected:
        keywords["micro_batch"] = s["resnet_micro"]
    example = x[:2]
    reset_peak_memory(device)
    opt = build_apts(model, F.cross_entropy, None if comm is None else comm.comm,
                     subdomains=subdomains, example=example, **keywords)
    iters = s["mnist_iters"] if fully_connected else s["resnet_iters"]
    critical, total = [], []

    def record(_):
        critical.append(opt.report.seconds_local_max)
        total.append(opt.report.seconds_local)
    times = time_steps(lambda: opt.step(x, y), s["warmup"], iters, comm=comm, device=device,
                       after=record)
    prefix_cached = as_objective(F.cross_entropy).sequential_inputs \
        and isinstance(model, torch.nn.Sequential)  # a frozen prefix is run once: the split knows
    predicted = evaluation_costs(model, opt.subdomains, example, prefix_cached=prefix_cached)
    return dict(network=network, option=option, ranks=1 if comm is None else comm.size,
                subdomains=opt.n_subdomains, seconds=median(times), peak_mb=peak_memory_mb(device),
                predicted=[c / sum(predicted) for c in predicted],
                parameters=[sd.numel for sd in opt.subdomains],
                local_critical=median(critical), local_total=median(total))


def adam_row(network, batch, device, s, micro=None):
    x, y = batch
    model = _model(network, tuple(x.shape[1:]), device)
    opt = torch.optim.Adam(model.parameters(), lr=ADAM_LR)
    reset_peak_memory(device)
    times = time_steps(lambda: _adam_step(model, opt, x, y, micro), s["warmup"],
                       max(s["mnist_iters"], 1 if s["warmup"] == 0 else 3), device=device)
    return dict(network=network, option="adam", ranks=1, subdomains=None, seconds=median(times),
                peak_mb=peak_memory_mb(device))


def _adam_step(model, opt, x, y, micro=None):
    opt.zero_grad()
    step = micro or len(y)
    for a in range(0, len(y), step):  # the mean over the batch, accumulated over micro-batches
        (F.cross_entropy(model(x[a:a + step]), y[a:a + step]) * (len(y[a:a + step]) / len(y))).backward()
    opt.step()


def _accuracy(model, x, y, chunk=10000):
    with torch.no_grad():
        hits = sum(int((model(x[a:a + chunk]).argmax(1) == y[a:a + chunk]).sum())
                   for a in range(0, len(y), chunk))
    return hits / len(y)


def time_to_accuracy(method, data, device, s):
    """Training seconds and epochs until the test accuracy first reaches TARGET (None if not)."""
    train_x, train_y, test_x, test_y = data
    model = _model("mnist-fc", (1, 28, 28), device)
    if method.startswith("apts"):  # the paper's keywords, or the fast config's with device decisions
        fast = dict(OPTIONS["fast+device"], micro_batch=s["tta_batch"] // 8) if method == "apts-fast" else {}
        opt = build_apts(model, F.cross_entropy, subdomains=2, **dict(MNIST_APTS, **fast))
        step = opt.step
    else:
        adam = torch.optim.Adam(model.parameters(), lr=ADAM_LR)

        def step(x, y):
            _adam_step(model, adam, x, y)
    g = torch.Generator().manual_seed(0)
    seconds, best, b = 0.0, 0.0, s["tta_batch"]
    for epoch in range(1, s["tta_epochs"] + 1):
        order = torch.randperm(len(train_y), generator=g).to(device)
        sync(device)
        t = time.perf_counter()
        for a in range(0, len(order) - b + 1, b):
            idx = order[a:a + b]
            step(train_x[idx], train_y[idx])
        sync(device)
        seconds += time.perf_counter() - t
        acc = _accuracy(model, test_x, test_y)
        best = max(best, acc)
        if acc >= TARGET:
            return dict(method=method, epoch=epoch, seconds=seconds, best=best)
    return dict(method=method, epoch=None, seconds=None, best=best, epochs=s["tta_epochs"])


def mnist_data(root, device, s):
    """(train_x, train_y, test_x, test_y) of MNIST on ``device``; random data of MNIST's shape with
    ``--quick``.  Raises DataError without MNIST under ``root`` (a full run needs it)."""
    if s["tta_train"] is not None:
        x, y = _random_batch(s["tta_train"], (1, 28, 28), device, seed=1)
        tx, ty = _random_batch(s["tta_test"], (1, 28, 28), device, seed=2)
        return x, y, tx, ty, "random"
    from ..data import load_dataset
    d = load_dataset("mnist", root)
    return (d.train_x.to(device), d.train_y.to(device), d.test_x.to(device), d.test_y.to(device),
            "mnist")


def split_sizes(quick: bool) -> dict:
    return dict(mnist_batch=64 if quick else 10000, deep_batch=64 if quick else 2000,
                warmup=0 if quick else 1, mnist_iters=1 if quick else 3)


def split_benchmark(args):
    """Predicted against measured local seconds, ``balanced`` against ``cost``: the MNIST network
    (10,000 images) and a deep uniform MLP 784-512x8-10 (2,000 images), serial N = 2 and 4, and 2
    MPI ranks (where mpiexec is found); writes ``DIR/gpu_bench_split.json``."""
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_bench: torch finds no CUDA device on this machine (--device cpu to run here)")
    s, device, rows = split_sizes(args.quick), torch.device(args.device), []
    os.makedirs(args.out, exist_ok=True)
    for network in ("mnist-fc", "deep-mlp"):
        batch = _random_batch(s["mnist_batch"] if network == "mnist-fc" else s["deep_batch"],
                              (1, 28, 28), device)
        for n in (2, 4):
            for option in ("default", "cost"):
                rows.append(apts_row(network, option, batch, device, s, subdomains=n))
    if not args.no_mpi:
        rows += mpi_rows(args)
    result = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                  torch=torch.__version__, data="random", quick=args.quick, sizes=s, rows=rows, tta=[])
    print(tables.gpu(result, TARGET))
    write_json(os.path.join(args.out, "gpu_bench_split.json"), result)


# -- two MPI ranks ----------------------------------------------------------------------------------
def worker(args):
    """Under ``mpiexec -n 2``: the MNIST rows on two ranks; rank 0 writes them to ``args.worker``."""
    from ..comm import library_version, select_device, world
    comm = world()
    if comm.size != 2:  # mpiexec of one MPI library, mpi4py bound to another: singletons
        sys.exit(f"gpu_bench: this rank sees a world of {comm.size}, not 2: mpiexec and "
                 f"mpi4py's MPI library ({library_version()}) differ; "
                 "point MPI4PY_LIBMPI at the library of this mpiexec")
    device = select_device(comm, args.device)
    s = split_sizes(args.quick) if args.split else sizes(args.quick)
    rows = []
    for network in ("mnist-fc", "deep-mlp") if args.split else ("mnist-fc",):
        batch = _random_batch(s["mnist_batch"] if network == "mnist-fc" else s["deep_batch"],
                              (1, 28, 28), device)
        for option in ("default", "cost") if args.split else ("default", "cost", "device", "fast+device"):
            row = apts_row(network, option, batch, device, s, comm=comm)
            every = comm.gather_object(row.pop("local_total"), root=0)  # one subdomain per rank
            del row["local_critical"]
            row["local_seconds"] = {str(d): v for d, v in enumerate(every or [])}
            rows.append(row)
    if comm.rank == 0:
        with open(args.worker, "w") as f:
            json.dump(rows, f)


def mpi_rows(args):
    mpiexec = os.environ.get("MPIEXEC") or shutil.which("mpiexec")
    if mpiexec is None:
        return [dict(network="mnist-fc", option="2 ranks", error="no mpiexec found")]
    path = os.path.join(args.out, "mpi-rows.json")
    cmd = [mpiexec, "-n", "2", sys.executable, "-m", "mpi4py", "-m", "apts_mpi.bench.gpu",
           "--device", args.device, "--worker", path] + (["--quick"] if args.quick else []) \
        + (["--split"] if args.split else [])
    package_root = str(CONFIGS.parent)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired:
        return [dict(network="mnist-fc", option="2 ranks", error="timed out after 240 s")]
    if proc.returncode != 0 or not os.path.exists(path):
        return [dict(network="mnist-fc", option="2 ranks", error=proc.stderr.strip()[-400:])]
    with open(path) as f:
        rows = json.load(f)
    os.remove(path)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m apts_mpi.bench.gpu", description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    p.add_argument("--data", default=os.environ.get("APTS_DATA"), help="MNIST under DATA/MNIST/raw")
    p.add_argument("--out", default="runs/gpu_bench")
    p.add_argument("--no-mpi", action="store_true", help="leave out the 2-rank rows")
    p.add_argument("--split", action="store_true",
                   help="only the cost split: MNIST network and a deep uniform MLP, balanced against "
                        "cost, serial N = 2 and 4 and 2 MPI ranks")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.split:
        return split_benchmark(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_bench: torch finds no CUDA device on this machine (--device cpu to run here)")
    from ..data import DataError
    s = sizes(args.quick)
    device = torch.device(args.device)
    try:
        mnist = mnist_data(args.data, device, s)
    except DataError as e:
        sys.exit(f"gpu_bench: the time-to-accuracy rows need MNIST: {e}")
    os.makedirs(args.out, exist_ok=True)
    rows = []
    batch = _random_batch(s["mnist_batch"], (1, 28, 28), device)
    for option in OPTIONS:
        rows.append(apts_row("mnist-fc", option, batch, device, s, subdomains=2))
    rows.append(adam_row("mnist-fc", batch, device, s))
    batch = _random_batch(s["resnet_batch"], (3, 32, 32), device)
    for option in RESNET_OPTIONS if not args.quick else ("default", "bf16+cost", "device"):
        rows.append(apts_row(s["conv"], option, batch, device, s, subdomains=4))
    rows.append(adam_row(s["conv"], batch, device, s, micro=s["resnet_micro"]))
    del batch
    if not args.no_mpi:
        rows += mpi_rows(args)
    tta = [time_to_accuracy(method, mnist[:4], device, s) for method in ("apts", "apts-fast", "adam")]
    result = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                  torch=torch.__version__, data=mnist[4], quick=args.quick, sizes=s, rows=rows,
                  tta=tta)
    print(tables.gpu(result, TARGET))
    write_json(os.path.join(args.out, "gpu_bench.json"), result)


if __name__ == "__main__":
    main()
