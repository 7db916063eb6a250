"""jobs/*.sbatch: shell syntax, Slurm directive placement, the configs they name, the launch line,
and, with a stand-in ``srun`` on PATH, the command each script builds (no Slurm needed)."""
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from apts_mpi import config as configuration

ROOT = Path(__file__).resolve().parents[1]
JOBS = sorted((ROOT / "jobs").glob("*.sbatch"))
EXPECTED = {"mnist-apts.sbatch", "mnist-baselines.sbatch", "cifar10-resnet18.sbatch",
            "shakespeare-gpt.sbatch"}
CONFIG_REF = re.compile(r"configs/[^\s\"',;)]*?\.yaml")
LAUNCH = "python -m mpi4py -m apts_mpi train"

by_name = pytest.mark.parametrize("script", JOBS, ids=[p.name for p in JOBS])


COMMON = ROOT / "jobs" / "common.sh"


def job_text(script):
    """The script with jobs/common.sh, which it sources, after it: what runs on the node."""
    text = script.read_text()
    return text + "\n" + COMMON.read_text() if ". \"$APTS_ROOT/jobs/common.sh\"" in text else text


def logical_lines(text):
    """Non-comment command lines, with backslash continuations joined."""
    lines, current = [], ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        lines.append(current + stripped)
        current = ""
    return lines


def test_every_job_family_has_a_script():
    assert EXPECTED <= {p.name for p in JOBS}


@by_name
def test_bash_syntax(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@by_name
def test_sbatch_directives_come_before_the_first_command(script):
    # sbatch stops reading #SBATCH lines at the first line that is neither blank nor a comment
    lines = script.read_text().splitlines()
    assert lines[0].startswith("#!"), "no shebang line"
    first_command = next(i for i, line in enumerate(lines)
                         if line.strip() and not line.lstrip().startswith("#"))
    late = [f"line {i + 1}: {line}" for i, line in enumerate(lines)
            if i > first_command and line.lstrip().startswith("#SBATCH")]
    assert not late, f"#SBATCH after the first command (line {first_command + 1}), ignored by sbatch: {late}"
    assert any(line.startswith("#SBATCH") for line in lines[:first_command])


@by_name
def test_named_configs_exist_and_load(script):
    refs = sorted(set(CONFIG_REF.findall(script.read_text())))
    assert refs, "the script names no configs/*.yaml"
    for ref in refs:
        assert re.fullmatch(r"configs/[\w.-]+\.yaml", ref), f"{ref}: name configs literally, so they can be checked"
        path = ROOT / ref
        assert path.is_file(), f"{ref} does not exist"
        configuration.load(path)  # raises ConfigError naming the key


@by_name
def test_launches_with_srun_and_mpi4py(script):
    launches = [line for line in logical_lines(job_text(script))
                if re.match(r"(exec\s+)?srun\b", line) and LAUNCH in line]
    assert launches, f"no command line 'srun ... {LAUNCH} ...'"


@by_name
def test_site_settings_and_conventions(script):
    own, text = script.read_text(), job_text(script)
    for var in ("APTS_ROOT", "MODULES", "VENV", "APTS_DATA", "OUT_ROOT"):
        assert re.search(rf'^{var}="\$\{{{var}:-', own, re.M), f"{var} is not set as ${{{var}:-default}}"
    assert re.search(r"^set -euo pipefail$", own, re.M)
    assert re.search(r"^export OMP_NUM_THREADS=\$\{SLURM_CPUS_PER_TASK:-1\}$", text, re.M)
    assert re.search(r"^#SBATCH --requeue$", text, re.M)
    assert re.search(r"^\s*#.*srun --mpi=pmix ", text, re.M), "no commented srun --mpi=pmix line"
    assert re.search(r'^\s*#.*mpirun -n "?\$SLURM_NTASKS"? ' + re.escape(LAUNCH), text, re.M), \
        "no commented mpirun equivalent"
    assert re.search(r"^#\s+sbatch .*jobs/" + re.escape(script.name), own, re.M), \
        "the header does not show how to submit it"


@pytest.mark.parametrize("script", [*JOBS, COMMON], ids=[p.name for p in [*JOBS, COMMON]])
def test_shellcheck(script):
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed: static analysis of the job scripts not run")
    result = subprocess.run([shellcheck, "--shell=bash", "--external-sources", str(script)],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


# ---- the command each script builds, with a stand-in srun ------------------------------------

FAKE_SRUN = """#!/bin/bash
{ printf '%s\\n' "OMP_NUM_THREADS=$OMP_NUM_THREADS" "APTS_DATA=$APTS_DATA" "--"; printf '%s\\n' "$@"; } > "$FAKE_SRUN_LOG"
echo "$*" >> "$FAKE_SRUN_LOG.all"
exit "${FAKE_SRUN_STATUS:-0}"
"""
FAKE_SCONTROL = """#!/bin/bash
echo "$*" >> "$FAKE_SRUN_LOG.scontrol"
"""


@pytest.fixture
def site(tmp_path):
    """A stand-in cluster: srun that records its arguments, a venv, a data root, an output root."""
    bin_dir, venv, data = tmp_path / "bin", tmp_path / "venv", tmp_path / "data"
    for folder in (bin_dir, venv / "bin", data):
        folder.mkdir(parents=True)
    for exe, body in ((bin_dir / "srun", FAKE_SRUN), (bin_dir / "scontrol", FAKE_SCONTROL),
                      (venv / "bin" / "python", "#!/bin/sh\nexit 0\n")):
        exe.write_text(body)
        exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))
           and k not in ("APTS_ROOT", "MODULES", "VENV", "APTS_DATA", "OUT_ROOT", "SEED", "METHOD",
                         "DEVICE", "VIRTUAL_ENV")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}",
               SLURM_SUBMIT_DIR=str(ROOT), SLURM_JOB_ID="1234", SLURM_CPUS_PER_TASK="2",
               VENV=str(venv), APTS_DATA=str(data), OUT_ROOT=str(tmp_path / "runs"),
               FAKE_SRUN_LOG=str(tmp_path / "srun.log"))
    return tmp_path, env


def submit(site, name, *args, **slurm):
    """Run jobs/NAME as the batch step would; returns (result, srun argv or None, srun env)."""
    tmp, env = site
    log = tmp / "srun.log"
    for path in (log, tmp / "srun.log.all", tmp / "srun.log.scontrol"):
        path.unlink(missing_ok=True)
    result = subprocess.run(["bash", str(ROOT / "jobs" / name), *args], cwd=tmp, capture_output=True,
                            text=True, env={**env, **slurm}, timeout=60)
    if not log.exists():
        return result, None, None
    lines = log.read_text().splitlines()
    cut = lines.index("--")
    return result, lines[cut + 1:], dict(line.split("=", 1) for line in lines[:cut])


def train_args(argv):
    """(config path, --out, --set overrides, --resume given) of the srun command line."""
    assert argv[argv.index("python"):][:6] == LAUNCH.split(), argv
    rest = argv[argv.index("train") + 1:]
    sets = [rest[i + 1] for i, a in enumerate(rest) if a == "--set"]
    return rest[0], rest[rest.index("--out") + 1], sets, "--resume" in rest


@pytest.mark.parametrize("ntasks", [2, 4, 6])
def test_mnist_apts_takes_the_config_of_its_task_count_and_resumes(site, ntasks):
    tmp, _ = site
    result, argv, env = submit(site, "mnist-apts.sbatch", SLURM_NTASKS=str(ntasks))
    assert result.returncode == 0, result.stderr
    assert "--kill-on-bad-exit=1" in argv and "--cpus-per-task=2" in argv
    assert env == {"OMP_NUM_THREADS": "2", "APTS_DATA": str(tmp / "data")}
    config, out, sets, resume = train_args(argv)
    assert config == f"configs/mnist-apts-n{ntasks}.yaml" and not resume
    assert out == str(tmp / "runs" / f"mnist-apts-n{ntasks}-seed0")
    cfg = configuration.load(ROOT / config, sets)
    assert cfg["optimizer"]["method"] == "apts" and cfg["optimizer"]["subdomains"] == ntasks

    # a checkpoint from an earlier (pre-empted) job: continued
    Path(out).mkdir(parents=True)
    (Path(out) / "checkpoint.h5").write_bytes(b"")
    result, argv, _ = submit(site, "mnist-apts.sbatch", SLURM_NTASKS=str(ntasks))
    assert result.returncode == 0, result.stderr
    assert train_args(argv)[3]


def test_a_run_folder_without_checkpoint_starts_again_and_keeps_its_files(site):
    tmp, _ = site
    out = tmp / "runs" / "mnist-apts-n4-seed0"
    out.mkdir(parents=True)  # empty: the job stopped inside its first epoch
    result, argv, _ = submit(site, "mnist-apts.sbatch", SLURM_NTASKS="4")
    assert result.returncode == 0, result.stderr
    assert not train_args(argv)[3] and not out.exists()

    out.mkdir()
    (out / "metrics.h5").write_bytes(b"partial")
    result, argv, _ = submit(site, "mnist-apts.sbatch", SLURM_NTASKS="4")
    assert result.returncode == 0, result.stderr
    assert not train_args(argv)[3] and not out.exists()
    assert (tmp / "runs" / "mnist-apts-n4-seed0.no-checkpoint.1234" / "metrics.h5").read_bytes() == b"partial"


def test_mnist_apts_refuses_a_task_count_without_a_config(site):
    result, argv, _ = submit(site, "mnist-apts.sbatch", SLURM_NTASKS="3")
    assert result.returncode == 2 and argv is None
    assert "N = 2, 4 or 6" in result.stderr


def test_missing_venv_or_data_stop_before_srun(site):
    tmp, _ = site
    result, argv, _ = submit(site, "mnist-apts.sbatch", SLURM_NTASKS="4", VENV=str(tmp / "nowhere"))
    assert result.returncode == 2 and argv is None and "no virtual environment" in result.stderr
    result, argv, _ = submit(site, "mnist-apts.sbatch", SLURM_NTASKS="4", APTS_DATA=str(tmp / "nowhere"))
    assert result.returncode == 2 and argv is None and "data root" in result.stderr


def test_extra_arguments_reach_train_and_seed_names_the_folder(site):
    tmp, _ = site
    result, argv, _ = submit(site, "mnist-apts.sbatch", "--set", "epochs=3", SLURM_NTASKS="2", SEED="5")
    assert result.returncode == 0, result.stderr
    config, out, sets, _ = train_args(argv)
    assert out == str(tmp / "runs" / "mnist-apts-n2-seed5")
    cfg = configuration.load(ROOT / config, sets)
    assert (cfg["seed"], cfg["epochs"]) == (5, 3)


@pytest.mark.parametrize("index,method", [(0, "adam"), (1, "sgd"), (2, "lbfgs"), (3, "tr")])
def test_mnist_baselines_array_index_picks_the_method(site, index, method):
    tmp, _ = site
    result, argv, _ = submit(site, "mnist-baselines.sbatch", SLURM_NTASKS="4",
                             SLURM_ARRAY_TASK_ID=str(index))
    assert result.returncode == 0, result.stderr
    config, out, sets, resume = train_args(argv)
    assert config == f"configs/mnist-{method}.yaml" and not resume
    assert out == str(tmp / "runs" / f"mnist-{method}-n4-seed0")
    assert configuration.load(ROOT / config, sets)["optimizer"]["method"] == method


def test_mnist_baselines_outside_an_array_stops(site):
    result, argv, _ = submit(site, "mnist-baselines.sbatch", SLURM_NTASKS="4")
    assert result.returncode == 2 and argv is None and "--array" in result.stderr


@pytest.mark.parametrize("script,method,ntasks", [
    ("cifar10-resnet18", "apts", 2), ("cifar10-resnet18", "apts", 4), ("cifar10-resnet18", "apts", 6),
    ("cifar10-resnet18", "adam", 4),
    ("shakespeare-gpt", "apts", 2), ("shakespeare-gpt", "apts", 4), ("shakespeare-gpt", "adamw", 2)])
def test_gpu_jobs_set_subdomains_to_the_task_count(site, script, method, ntasks):
    tmp, _ = site
    result, argv, _ = submit(site, f"{script}.sbatch", SLURM_NTASKS=str(ntasks), METHOD=method)
    assert result.returncode == 0, result.stderr
    config, out, sets, _ = train_args(argv)
    assert out == str(tmp / "runs" / f"{script}-{method}-n{ntasks}-seed0")
    cfg = configuration.load(ROOT / config, sets)
    model, dataset = {"cifar10-resnet18": ("resnet18", "cifar10"),
                      "shakespeare-gpt": ("gpt-shakespeare", "tinyshakespeare")}[script]
    assert cfg["optimizer"]["method"] == method and cfg["model"]["name"] == model
    assert cfg["data"]["dataset"] == dataset and cfg["device"] == "cuda"
    if method == "apts":
        assert cfg["optimizer"]["subdomains"] == ntasks


def test_cifar10_rejects_an_unknown_method(site):
    result, argv, _ = submit(site, "cifar10-resnet18.sbatch", SLURM_NTASKS="4", METHOD="sgd")
    assert result.returncode == 2 and argv is None and "METHOD" in result.stderr


def test_srun_joins_the_ranks_with_pmi2_unless_told_otherwise(site):
    result, argv, _ = submit(site, "mnist-apts.sbatch", SLURM_NTASKS="2")
    assert result.returncode == 0 and "--mpi=pmi2" in argv, result.stderr
    result, argv, _ = submit(site, "mnist-apts.sbatch", SLURM_NTASKS="2", SRUN_MPI="pmix")
    assert result.returncode == 0 and "--mpi=pmix" in argv and "--mpi=pmi2" not in argv


@by_name
def test_a_requeued_job_launches_past_the_steps_of_its_earlier_runs(site, script):
    """Restart 2 of a job: two empty steps (0 and 1, the MPI steps of runs 0 and 1), then step 2."""
    tmp, _ = site
    result, argv, _ = submit(site, script.name, SLURM_NTASKS="2", SLURM_RESTART_COUNT="2",
                             SLURM_ARRAY_TASK_ID="0")
    assert result.returncode == 0, result.stderr
    calls = (tmp / "srun.log.all").read_text().splitlines()
    assert calls[:2] == ["--ntasks=1 --nodes=1 true"] * 2 and len(calls) == 3, calls
    assert LAUNCH in calls[2]


@by_name
@pytest.mark.parametrize("status, requeued", [(75, True), (1, False), (3, False)])
def test_only_a_resumable_stop_requeues_the_job(site, script, status, requeued):
    tmp, _ = site
    result, _, _ = submit(site, script.name, SLURM_NTASKS="2", SLURM_ARRAY_TASK_ID="0",
                          FAKE_SRUN_STATUS=str(status))
    assert result.returncode == status, result.stderr
    scontrol = tmp / "srun.log.scontrol"
    assert (scontrol.read_text().split() == ["requeue", "1234"]) if requeued else not scontrol.exists()


def test_an_array_task_names_itself_as_its_log_file_does(site):
    result, _, _ = submit(site, "mnist-baselines.sbatch", SLURM_NTASKS="2", SLURM_ARRAY_TASK_ID="2",
                          SLURM_ARRAY_JOB_ID="1230")  # SLURM_JOB_ID=1234: this task's own ID
    assert result.returncode == 0, result.stderr
    assert "mnist-baselines: job 1230_2 " in result.stdout, result.stdout


# ---- shared lines, seeds of an array, SIGUSR1 before the time limit ---------------------------

def test_the_scripts_share_their_lines_through_common_sh():
    """The launch, the run-folder rule, module loading and the requeue live once, in common.sh."""
    shared = ("srun_args", "scontrol requeue", "module load", "no-checkpoint", "SLURM_RESTART_COUNT")
    for script in JOBS:
        text = script.read_text()
        assert '. "$APTS_ROOT/jobs/common.sh"' in text, f"{script.name} does not source common.sh"
        assert not [w for w in shared if w in text], f"{script.name} repeats lines of common.sh"
    commands = [set(logical_lines(s.read_text())) for s in JOBS]
    common_to_all = set.intersection(*commands)
    assert len(common_to_all) <= 20, sorted(common_to_all)  # the settings block, not the logic


@pytest.mark.parametrize("name, folder", [
    ("mnist-apts", "mnist-apts-n2"), ("cifar10-resnet18", "cifar10-resnet18-apts-n2"),
    ("shakespeare-gpt", "shakespeare-gpt-apts-n2")])
def test_an_array_task_without_seed_takes_its_index_as_the_seed(site, name, folder):
    tmp, _ = site
    for index in (0, 1):
        result, argv, _ = submit(site, f"{name}.sbatch", SLURM_NTASKS="2", SLURM_ARRAY_JOB_ID="1230",
                                 SLURM_ARRAY_TASK_ID=str(index))
        assert result.returncode == 0, result.stderr
        config, out, sets, _ = train_args(argv)
        assert out == str(tmp / "runs" / f"{folder}-seed{index}")  # a run folder per seed
        assert configuration.load(ROOT / config, sets)["seed"] == index
        assert f"seed {index} -> {out}" in result.stdout
    # SEED given: it wins over the index
    result, argv, _ = submit(site, f"{name}.sbatch", SLURM_NTASKS="2", SLURM_ARRAY_TASK_ID="1",
                             SEED="7")
    assert train_args(argv)[1].endswith("-seed7")


def test_the_baselines_array_index_stays_the_method_not_the_seed(site):
    result, argv, _ = submit(site, "mnist-baselines.sbatch", SLURM_NTASKS="2", SLURM_ARRAY_TASK_ID="3")
    assert result.returncode == 0, result.stderr
    assert train_args(argv)[1].endswith("mnist-tr-n2-seed0")


@pytest.mark.parametrize("name", ["cifar10-resnet18", "shakespeare-gpt"])
def test_gpu_jobs_ask_for_sigusr1_five_minutes_before_the_time_limit(name):
    """A GPU iteration can outlast SLURM's KillWait after SIGTERM: SIGUSR1 at 300 s lets the ranks
    finish it and write the checkpoint in time (the job requeues itself on exit 75)."""
    lines = (ROOT / "jobs" / f"{name}.sbatch").read_text().splitlines()
    first_command = next(i for i, line in enumerate(lines)
                         if line.strip() and not line.lstrip().startswith("#"))
    assert "#SBATCH --signal=USR1@300" in lines[:first_command]


def test_a_checkout_without_common_sh_is_one_line(site, tmp_path):
    result, argv, _ = submit(site, "mnist-apts.sbatch", SLURM_NTASKS="2", APTS_ROOT=str(tmp_path))
    assert result.returncode == 2 and argv is None
    assert result.stderr.strip() == (f"mnist-apts: error: no jobs/common.sh under {tmp_path} "
                                     "(submit from the checkout, or set APTS_ROOT)")
