# shellcheck shell=bash
# What the job scripts (jobs/*.sbatch) share, sourced by each after its settings:
#   JOB_NAME (the script's name in its messages) and the settings APTS_ROOT, MODULES, VENV, APTS_DATA,
#   OUT_ROOT, SEED, SRUN_MPI, ACCOUNT, PARTITION must be set.
# Functions, called in this order:
#   fail MESSAGE                 one line "JOB_NAME: error: MESSAGE", exit 2 (before any srun)
#   job_environment DATA CONFIG  modules, the virtual environment, the data root (DATA: what it holds),
#                                cd APTS_ROOT, the config file
#   job_run_dir RUN_DIR          sets resume and start: a run folder with checkpoint.h5 is continued
#   job_launch CONFIG RUN_DIR WHAT [train arguments...]
#                                the MPI step (srun), and a requeue when it stopped resumably

fail() { echo "$JOB_NAME: error: $*" >&2; exit 2; }

ntasks="${SLURM_NTASKS:?not inside a SLURM allocation (submit with sbatch)}"
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}

job_environment() {
    local holds="$1" config="$2"
    if [ -n "$MODULES" ]; then
        if ! command -v module >/dev/null 2>&1; then
            # shellcheck source=/dev/null  # the site's module-system set-up
            for init in /etc/profile.d/lmod.sh /etc/profile.d/modules.sh; do
                if [ -f "$init" ]; then set +u; . "$init"; set -u; break; fi
            done
        fi
        set +u  # module systems' shell functions read unset variables
        # shellcheck disable=SC2086  # MODULES is a space-separated list
        module load $MODULES
        set -u
    fi
    [ -x "$VENV/bin/python" ] || fail "no virtual environment at $VENV (create it with scripts/setup_env, or set VENV)"
    export VIRTUAL_ENV="$VENV" PATH="$VENV/bin:$PATH"
    [ -d "$APTS_DATA" ] || fail "data root $APTS_DATA does not exist (set APTS_DATA to the folder holding $holds)"
    export APTS_DATA
    cd "$APTS_ROOT" || fail "cannot enter APTS_ROOT $APTS_ROOT"
    [ -f "$config" ] || fail "no $config under $APTS_ROOT (submit from the checkout, or set APTS_ROOT)"
}

# A run folder with checkpoint.h5 is continued.  One without (the job stopped inside its first
# epoch) is removed when empty, else moved aside, so that the run starts again from epoch 0.
# The task count and the seed are in the folder's name: a checkpoint only resumes on the world
# size that wrote it, and each seed of an array (SEED from SLURM_ARRAY_TASK_ID) has its own folder.
job_run_dir() {
    local run_dir="$1" aside
    resume=() start="from epoch 0"
    if [ -f "$run_dir/checkpoint.h5" ]; then
        resume=(--resume) start="resuming its checkpoint"
    elif [ -d "$run_dir" ] && ! rmdir "$run_dir" 2>/dev/null; then
        aside="$run_dir.no-checkpoint.${SLURM_JOB_ID:-$$}"
        echo "$JOB_NAME: $run_dir holds no checkpoint.h5: moved to $aside, starting from epoch 0" >&2
        mv "$run_dir" "$aside"
    fi
    mkdir -p "$OUT_ROOT"
}

job_launch() {
    local config="$1" run_dir="$2" what="$3" job restart status=0
    shift 3
    # the job as squeue and the log file name show it (an array task: ARRAYJOB_TASK)
    job="${SLURM_ARRAY_JOB_ID:+${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID:-}}"
    job="${job:-${SLURM_JOB_ID:-?}}"

    # A requeued job keeps its job ID and numbers its steps from 0 again, and MPICH names a node's
    # shared-memory segment after JOBID.STEP: the segment a killed run left in /dev/shm would make
    # MPI_Init fail.  One empty step per earlier run moves this run's MPI step past theirs.
    for ((restart = 0; restart < ${SLURM_RESTART_COUNT:-0}; restart++)); do
        srun --ntasks=1 --nodes=1 true
    done

    local srun_args=(--kill-on-bad-exit=1)
    if [ -n "$SRUN_MPI" ]; then srun_args+=(--mpi="$SRUN_MPI"); fi
    # since Slurm 22.05 srun no longer inherits --cpus-per-task from sbatch
    if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then srun_args+=(--cpus-per-task="$SLURM_CPUS_PER_TASK"); fi

    echo "$JOB_NAME: job $job (account $ACCOUNT, partition $PARTITION): $what$config," \
         "$ntasks tasks x $OMP_NUM_THREADS threads, seed $SEED -> $run_dir, $start"
    # srun starts the ranks and its MPI plugin joins them into one world: --mpi=pmi2 with MPICH
    # (the PyPI mpich that scripts/setup_env puts in .venv, Intel MPI, MVAPICH), e.g. for Open MPI
    # with PMIx instead (SRUN_MPI=pmix, an mpi4py built against it: APTS_MPI=system scripts/setup_env):
    #   srun --mpi=pmix python -m mpi4py -m apts_mpi train "$config" --out "$run_dir" ...
    # Without a plugin that fits, srun starts N one-rank worlds, and apts-mpi stops with an error.
    # Or the MPI's own launcher (a rank per task; SLURM's signals reach ranks as it forwards them):
    #   mpirun -n "$SLURM_NTASKS" python -m mpi4py -m apts_mpi train "$config" --out "$run_dir" \
    #       --set seed="$SEED" ${resume[@]+"${resume[@]}"} "$@"
    srun "${srun_args[@]}" python -m mpi4py -m apts_mpi train "$config" --out "$run_dir" \
        --set seed="$SEED" ${resume[@]+"${resume[@]}"} "$@" || status=$?
    if [ "$status" = 75 ]; then
        # apts-mpi stopped resumably (exit 75) after a checkpoint, on SIGUSR1 (sbatch
        # --signal=USR1@300) or a signal sent to the step only (scancel --signal=USR1 JOBID): back
        # into the queue, and the next run resumes.  (At the time limit, on scancel, requeue or
        # pre-emption this shell is killed with the step; the checkpoint is written all the same.)
        echo "$JOB_NAME: stopped with a checkpoint: requeueing job $job" >&2
        scontrol requeue "$SLURM_JOB_ID"
    fi
    return "$status"
}
