#!/usr/bin/env bash
# Install lora-dist and everything its tests need on a fresh machine.
#   TORCH_SPEC  the torch requirement; default: the CPU build 2.13.0. On a GPU cluster set
#               TORCH_SPEC=torch (or a CUDA wheel) before running this script.
#   SKIP_SYSTEM_PACKAGES=1  skip the apt-get step (Slurm, munge, shellcheck are for tests only).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

python -m pip install --upgrade pip
python -m pip install "${TORCH_SPEC:-torch==2.13.0}"
python -m pip install -e ".[dev]"

if [[ "${SKIP_SYSTEM_PACKAGES:-0}" != 1 ]] && command -v apt-get >/dev/null && [[ $(id -u) == 0 ]]; then
  # A local Slurm cluster (tests/test_slurm.py) and shellcheck for the batch scripts.
  packages=(slurmctld slurmd slurm-client munge shellcheck procps)
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null ||
    { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null; }
fi
echo "lora-dist installed: $(command -v lora-dist)"
