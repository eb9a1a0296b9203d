#!/usr/bin/env bash
# Set up, make sure the system packages the tests use are there, lint, type-check and run the
# whole test suite. Arguments go to pytest (e.g. `bash scripts/test.sh -m "not slow"`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ -f .ci/install_slurm.sh ]; then bash .ci/install_slurm.sh || true; fi
echo "[test] ruff check, ruff format --check"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "[test] basedpyright (basic)"
.venv/bin/basedpyright
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec .venv/bin/python -m pytest -q "$@"
