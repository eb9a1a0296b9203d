# Shared by launch/slurm/*.sbatch (sourced, not run): rendezvous address, a log header, and
# "checkpoint, then requeue" when Slurm warns that the time limit is near.
#
# Signals, and who sends them:
#   --signal=B:USR1@600  Slurm -> this batch shell, 10 min before the time limit. We forward USR1 to every
#                        process of the job's steps (scancel --signal), the ranks agree at the next step,
#                        save a checkpoint and exit 0; then we `scontrol requeue` the job, and the next run
#                        resumes from <checkpoint.dir>/latest.
#   SIGTERM              preemption or `scancel` (Slurm signals the steps itself; we forward it too), or
#                        `scancel --batch --signal=TERM` (this shell only): the ranks checkpoint and exit 0.
#                        A preempted job is requeued by Slurm (PreemptMode=REQUEUE); otherwise resubmit the
#                        same command and it resumes.
#   SIGINT               `scancel --batch --signal=INT`: forwarded the same way; the ranks checkpoint and exit
#                        130, like an interrupted command.
# Environment knobs: PYTHON (interpreter, default python), MEGAGPT2_REQUEUE=0 (never requeue).

# Sets MASTER_ADDR/MASTER_PORT for the job, cds to the submit directory, prints a header.
megagpt2_setup() {
    set -uo pipefail
    cd "${SLURM_SUBMIT_DIR:-$PWD}" || exit 1
    PYTHON=${PYTHON:-python}
    if [ ! -f launch/pretrain_gpt2.py ]; then
        echo "error: submit from the megagpt2 checkout (no launch/pretrain_gpt2.py in $PWD)" >&2
        exit 2
    fi
    # Rank 0 runs on the first host of the allocation; the port is derived from the job id like
    # megagpt2.distributed.port_for_job, so concurrent jobs on one node do not collide.
    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    export MASTER_ADDR
    export MASTER_PORT=$((15000 + SLURM_JOB_ID % 16000))
    # Since Slurm 22.05 srun does not inherit --cpus-per-task from the allocation by itself.
    if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then
        export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK
    fi
    echo "megagpt2: job $SLURM_JOB_ID (${SLURM_JOB_NAME:-}) run $((${SLURM_RESTART_COUNT:-0} + 1)) on" \
         "${SLURM_JOB_NUM_NODES:-1} node(s) [$SLURM_JOB_NODELIST], rendezvous $MASTER_ADDR:$MASTER_PORT," \
         "started $(date -Is)"
}

_megagpt2_on_signal() {
    MEGAGPT2_SIGNAL=$1
    echo "megagpt2: batch script got SIG$1 at $(date -Is); asking every rank to checkpoint and stop"
    # Every process of every step (not this shell): the ranks themselves, whichever launcher is in between.
    scancel --signal="$1" "$SLURM_JOB_ID" || echo "megagpt2: scancel --signal=$1 failed" >&2
}

# Runs "$@" (the command that starts the ranks) and waits for it while handling the signals above.
megagpt2_run() {
    MEGAGPT2_SIGNAL=""
    trap '_megagpt2_on_signal USR1' USR1
    trap '_megagpt2_on_signal TERM' TERM
    trap '_megagpt2_on_signal INT' INT
    echo "megagpt2: $*"
    "$@" &
    local pid=$! rc=0
    while :; do
        wait "$pid"
        rc=$?
        kill -0 "$pid" 2>/dev/null || break  # wait returned early because a trap ran
    done
    echo "megagpt2: ranks finished with exit code $rc at $(date -Is)"
    if [ "$MEGAGPT2_SIGNAL" = USR1 ] && [ "$rc" -eq 0 ] && [ "${MEGAGPT2_REQUEUE:-1}" != 0 ]; then
        echo "megagpt2: requeueing job $SLURM_JOB_ID; the next run resumes from the latest checkpoint"
        scontrol requeue "$SLURM_JOB_ID" || echo "megagpt2: requeue failed (job not requeueable?);" \
            "resubmit the same command to resume" >&2
    fi
    exit "$rc"
}
