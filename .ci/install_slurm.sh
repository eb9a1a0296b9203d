#!/usr/bin/env bash
# Install a single-node Slurm (Debian packages) for tests/test_slurm.py, only when it is missing.
# Idempotent and quiet. Always exits 0: when apt cannot install, the Slurm tests skip and say why.
set -u
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"  # the daemons live in sbin

need=()
command -v slurmctld >/dev/null 2>&1 || need+=(slurmctld)
command -v slurmd >/dev/null 2>&1 || need+=(slurmd)
command -v sbatch >/dev/null 2>&1 || need+=(slurm-client)
command -v munged >/dev/null 2>&1 || need+=(munge)
if [ ${#need[@]} -eq 0 ]; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_slurm: apt-get not found; cannot install ${need[*]} (Slurm tests will be skipped)" >&2
    exit 0
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        sudo="sudo -n"
    else
        echo "install_slurm: not root and no passwordless sudo; cannot install ${need[*]}" >&2
        exit 0
    fi
fi
export DEBIAN_FRONTEND=noninteractive
log=$(mktemp)
if $sudo apt-get update -qq >"$log" 2>&1 &&
   $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >>"$log" 2>&1; then
    echo "install_slurm: installed ${need[*]}"
else
    echo "install_slurm: apt-get failed to install ${need[*]} (Slurm tests will be skipped):" >&2
    tail -n 5 "$log" >&2
fi
rm -f "$log"
exit 0
