"""scripts/gpu_bench's module as a CPU smoke test: every row runs, the JSON holds what the table
prints, and a machine without CUDA gets one message."""
import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args, timeout=240):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "apts_mpi.bench.gpu", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_quick_run_on_the_cpu(tmp_path):
    proc = run("--device", "cpu", "--quick", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    result = json.load(open(tmp_path / "gpu_bench.json"))
    assert os.listdir(tmp_path) == ["gpu_bench.json"]  # the workers' file is gone
    rows = result["rows"]
    assert not [r for r in rows if "error" in r] or shutil.which("mpiexec") is None
    single = [r for r in rows if r.get("ranks") == 1]
    assert {(r["network"], r["option"]) for r in single} == {
        ("mnist-fc", o) for o in ("default", "bf16", "cost", "bf16+cost", "device", "fast",
                                  "fast+device", "adam")} | {
        ("cifar-lenet5", o) for o in ("default", "bf16+cost", "device", "adam")}
    for r in rows:
        if "error" in r:
            continue
        assert r["seconds"] > 0 and r["peak_mb"] > 0
        if r["option"] != "adam":
            assert abs(sum(r["predicted"]) - 1) < 1e-12 and len(r["predicted"]) == r["subdomains"]
            if r["ranks"] == 1:  # serial emulation: the longest local phase within all of them
                assert 0 < r["local_critical"] <= r["local_total"]
            else:  # each rank's local phase
                assert len(r["local_seconds"]) == r["subdomains"]
                assert all(v > 0 for v in r["local_seconds"].values())
            assert sum(r["parameters"]) == (535818 if r["network"] == "mnist-fc" else 62006)
    if shutil.which("mpiexec"):
        assert [r["option"] for r in rows if r.get("ranks") == 2] == ["default", "cost", "device",
                                                                        "fast+device"]
    assert [t["method"] for t in result["tta"]] == ["apts", "apts-fast", "adam"]
    assert "ms/iter" in proc.stdout and "time to 97%" in proc.stdout


def test_no_cuda_is_one_message(tmp_path):
    import pytest
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = run("--out", str(tmp_path / "out"), timeout=60)
    assert proc.returncode != 0
    assert "no CUDA device" in proc.stderr and not (tmp_path / "out").exists()
