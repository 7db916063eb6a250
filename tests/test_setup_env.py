"""scripts/setup_env: which torch and which MPI it asks pip for, on a machine with and without a GPU.

The script runs for real (bash, sourced as scripts/run does) in a copy of the project's layout whose
``.venv/bin/python`` records every command it is given instead of installing: pip's answers are
played from the environment (``FAKE_PIP_FAIL``: a pattern of install commands that fail).  What a
real install does is pip's business; what is checked here is what the script asks for.
"""
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYTHON = r"""#!/bin/bash
echo "$*" >> "$FAKE_LOG"
case "$*" in
    "-c import torch") exit 1 ;;                       # no torch in the new venv yet
    *"Get_library_version"*) echo "setup_env: mpi4py 4.1.2 with Open MPI v5.0.3"; exit 0 ;;
esac
if [ -n "${FAKE_PIP_FAIL:-}" ] && [[ "$*" == *$FAKE_PIP_FAIL* ]]; then exit 1; fi
exit 0
"""


@pytest.fixture
def project(tmp_path):
    """A checkout with scripts/setup_env and setup.cfg, a recording .venv/bin/python, a bin folder."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "setup_env", tmp_path / "scripts" / "setup_env")
    (tmp_path / "setup.cfg").write_text("[metadata]\n")
    for folder in (tmp_path / ".venv" / "bin", tmp_path / "bin"):
        folder.mkdir(parents=True)
    python = tmp_path / ".venv" / "bin" / "python"
    python.write_text(PYTHON)
    python.chmod(python.stat().st_mode | stat.S_IXUSR)
    return tmp_path


def add_tool(project, name, body="#!/bin/sh\nexit 0\n"):
    tool = project / "bin" / name
    tool.write_text(body)
    tool.chmod(tool.stat().st_mode | stat.S_IXUSR)


def setup(project, **env):
    """Source the script as scripts/run does; (result, the pip install commands it ran)."""
    log = project / "python.log"
    log.unlink(missing_ok=True)
    (project / ".venv" / ".apts_mpi-installed").unlink(missing_ok=True)
    base = {k: v for k, v in os.environ.items()
            if k not in ("TORCH_INDEX_URL", "TORCH_VERSION", "APTS_MPI", "PYTHON")}
    # only the bin folder and the basic tools: no nvidia-smi or mpicc of this machine
    base["PATH"] = f"{project / 'bin'}:/usr/bin:/bin"
    result = subprocess.run(["bash", "-c", f"source {project / 'scripts' / 'setup_env'}"],
                            capture_output=True, text=True, timeout=60,
                            env={**base, "FAKE_LOG": str(log), **env})
    calls = log.read_text().splitlines() if log.exists() else []
    return result, [c for c in calls if " install " in f" {c} "]


def torch_installs(calls):
    return [c for c in calls if "torch" in c and "-e " not in c]


def test_without_a_gpu_only_the_cpu_build_is_asked_for(project):
    result, calls = setup(project)
    assert result.returncode == 0, result.stderr
    (first,) = torch_installs(calls)  # found by pip's own sources (a local wheel): one call
    assert first.endswith("install torch==2.13.0+cpu"), first
    # nowhere else: the CPU index, and still the +cpu build (PyPI's plain torch is the CUDA one)
    result, calls = setup(project, FAKE_PIP_FAIL="install torch==2.13.0+cpu")
    assert result.returncode == 0, result.stderr
    first, second = torch_installs(calls)
    assert second.endswith("--extra-index-url https://download.pytorch.org/whl/cpu "
                           "torch==2.13.0+cpu"), second


def test_a_gpu_machine_gets_the_pinned_torch(project):
    add_tool(project, "nvidia-smi", "#!/bin/sh\necho 'GPU 0: NVIDIA H100'\n")
    result, calls = setup(project)
    assert result.returncode == 0, result.stderr
    (install,) = torch_installs(calls)
    assert install.endswith("install torch==2.13.0"), install
    result, calls = setup(project, TORCH_INDEX_URL="https://download.pytorch.org/whl/cu126")
    (install,) = torch_installs(calls)
    assert install.endswith("--index-url https://download.pytorch.org/whl/cu126 torch==2.13.0")


def test_system_mpi_builds_mpi4py_from_source_and_says_which_mpi(project):
    add_tool(project, "mpicc")
    result, calls = setup(project, APTS_MPI="system")
    assert result.returncode == 0, result.stderr
    (mpi4py,) = [c for c in calls if "mpi4py>=" in c]
    assert "--no-binary mpi4py" in mpi4py and "--force-reinstall" in mpi4py
    (project_install,) = [c for c in calls if "-e " in c]
    assert project_install.endswith("[test]"), project_install  # not PyPI's MPICH
    assert "with Open MPI v5.0.3" in result.stdout
    # the default: PyPI's MPICH, and the library printed all the same
    result, calls = setup(project)
    assert [c for c in calls if "-e " in c][0].endswith("[test,mpich]")
    assert not any("--no-binary" in c for c in calls) and "setup_env: mpi4py" in result.stdout


def test_system_mpi_without_mpicc_is_one_line(project):
    result, calls = setup(project, APTS_MPI="system")
    assert result.returncode == 2
    assert result.stderr.strip().startswith("setup_env: APTS_MPI=system needs the site MPI's mpicc")
    assert not any("mpi4py" in c for c in calls)


def test_readme_says_multi_node_runs_use_the_site_mpi():
    text = " ".join((ROOT / "README.md").read_text().split())
    assert "Multi-node runs should use the site's MPI" in text
