#!/usr/bin/env bash
# Set up, make sure the system packages the tests use are there, run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ -f .ci/install_slurm.sh ]; then bash .ci/install_slurm.sh || true; fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec .venv/bin/python -m pytest -q "$@"
