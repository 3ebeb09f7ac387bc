#!/usr/bin/env bash
# LoRA on a 7B-70B LLaMA for WikiSQL on 1-2 nodes, with the paper's recipe (q,v adapted, AdamW
# lr 2e-4, 2 epochs; weight decay and batch size in the DeepSpeed JSON).
#
#   sbatch slurm/llama_wikisql.sh /models/Llama-2-7b-hf                     # 1 node, ZeRO-3
#   DS_CONFIG=ds_configs/zero3_tp8.json sbatch --nodes=2 slurm/llama_wikisql.sh /models/Llama-2-70b-hf
#
# Overrides as in gpt3_wikisql.sh: #SBATCH lines on the sbatch command line; MODEL_DIR (or $1),
# DATA_DIR, DS_CONFIG, OUTPUT_DIR, LORA_R, LORA_ALPHA, LORA_TARGETS, LR, EPOCHS, MAX_STEPS, SEED,
# SAVE_EVERY, KEEP_LAST, EVAL_EVERY, ACTIVATION_CHECKPOINTING, EXTRA_ARGS, LAUNCH_MODE, ...
#
# Size, from `lora-dist plan --model llama-2-{7b,13b,70b} --nodes N --gpus_per_node 8 --tp 1
#   --zero 3 --lora_r 8 --lora_targets q,v --micro_batch 1 --max_length 2048 --dtype bf16`:
#   bf16 weights 2 B/param split over N*8 GPUs: 7B 1.6 GiB, 13B 3.0 GiB, 70B 16.1 GiB per GPU on
#   1 node; activations 2.0 / 2.6 / 5.0 GiB; LoRA per GPU in total 6.9 / 8.9 / 24.7 GiB on one
#   node of 80 GiB GPUs, so 1 node runs all three; 2 nodes only add throughput (or headroom for
#   40 GiB GPUs with 70B: 16.6 GiB per GPU).
#
#SBATCH --job-name=lora-llama-wikisql
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gres=gpu:8
#SBATCH --time=1-00:00:00
#SBATCH --requeue
# B: = signal the batch shell only; launch_common.sh forwards it to the ranks (see there why).
#SBATCH --signal=B:USR1@600
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail

REPO_DIR="${REPO_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}"
if [[ ! -f "$REPO_DIR/slurm/launch_common.sh" ]]; then
    echo "cannot find slurm/launch_common.sh under $REPO_DIR: submit from the repository root" \
        "or set REPO_DIR" >&2
    exit 2
fi
cd "$REPO_DIR"
# shellcheck source=slurm/launch_common.sh
source slurm/launch_common.sh

MODEL_DIR="${1:-${MODEL_DIR:-}}"
DATA_DIR="${DATA_DIR:-}"
DS_CONFIG="${DS_CONFIG:-ds_configs/zero3.json}"
LORA_R="${LORA_R:-8}"
lc_require_int LORA_R "$LORA_R" 1 256
LORA_ALPHA="${LORA_ALPHA:-$((2 * LORA_R))}"
LORA_TARGETS="${LORA_TARGETS:-attn}"
LR="${LR:-2e-4}"
EPOCHS="${EPOCHS:-2}"
MAX_STEPS="${MAX_STEPS:-}"
SAVE_EVERY="${SAVE_EVERY:-100}"
ACTIVATION_CHECKPOINTING="${ACTIVATION_CHECKPOINTING:-1}"
OUTPUT_DIR="${OUTPUT_DIR:-runs/llama-wikisql-r${LORA_R}}"

lc_trainer_args
lc_main "${LC_TRAIN_ARGS[@]}"
