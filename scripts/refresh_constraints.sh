#!/usr/bin/env bash
# Re-resolve constraints.txt: install the newest versions pyproject.toml allows into a fresh
# virtual environment and record exactly what was installed. Run .ci/run afterwards: commit the
# new constraints.txt only if the test suite passes with it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
venv=$(mktemp -d)/venv
python3 -m venv "$venv"
# shellcheck disable=SC1091
source "$venv/bin/activate"
LORA_DIST_NO_CONSTRAINTS=1 SKIP_SYSTEM_PACKAGES=1 bash scripts/install.sh
{
  echo "# Exact versions the test suite last passed with (scripts/install.sh and .ci/run use them)."
  echo "# Refresh: bash scripts/refresh_constraints.sh, then run .ci/run before committing the result."
  echo "# Opt out for one install: LORA_DIST_NO_CONSTRAINTS=1 bash scripts/install.sh"
  python -m pip freeze --exclude-editable | sed 's/+cpu$//' | grep -v '^lora-dist'
} >constraints.txt
echo "wrote constraints.txt from $venv; now run .ci/run"
