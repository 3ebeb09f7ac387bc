#!/usr/bin/env bash
# LoRA on Falcon-180B for WikiSQL with the paper's recipe: only the q and v slices of Falcon's
# fused query_key_value (query heads grouped by KV head) are adapted, k untouched; AdamW lr 2e-4,
# weight decay 0.1, 2 epochs. TP 8 inside a node, ZeRO-3 across nodes.
#
#   sbatch slurm/falcon_wikisql.sh /models/falcon-180B            # 2 nodes x 8 GPUs, TP 8
#   DATA_DIR=/data/wikisql LORA_R=8 sbatch --nodes=4 slurm/falcon_wikisql.sh /models/falcon-180B
#
# Overrides as in gpt3_wikisql.sh: #SBATCH lines on the sbatch command line; MODEL_DIR (or $1),
# DATA_DIR, DS_CONFIG, OUTPUT_DIR, LORA_R, LORA_ALPHA, LORA_TARGETS, LR, EPOCHS, MAX_STEPS, SEED,
# SAVE_EVERY, KEEP_LAST, EVAL_EVERY, ACTIVATION_CHECKPOINTING, EXTRA_ARGS, LAUNCH_MODE, ...
#
# TP is at most 8: AutoTP shards Falcon-180B's fused map by KV head, and it has 8 KV heads
# (each with its 29 query heads). Falcon-40B/7B's older multi-query layout is refused under TP.
#
# Memory, from `lora-dist plan --model falcon-180b --nodes N --gpus_per_node 8 --tp 8 --zero 3
#   --lora_r 4 --lora_targets q,v --micro_batch 8 --max_length 2048 --dtype bf16 --gpu_gib 80
#   --ds_config ds_configs/zero3_tp8.json`:
#   bf16 weights: 178.6e9 params x 2 B = 333 GiB; ZeRO-3 splits them over all N*8 GPUs: 41.6 GiB
#     per GPU on 1 node, 20.8 on 2, 10.4 on 4.
#   LoRA r=4 on the q,v slices (q 14848 wide, v one KV head of 64 per group x 8 = 512 wide):
#     80 layers x ((14848*4 + 4*14848) + (14848*4 + 4*512)) = 14,417,920 params; 39.3 MB adapter.
#   Activations, checkpointing on, micro-batch 8 x 2048 tokens, split by TP 8.
#   Plan's total per GPU: 89.5 GiB on 1 node, 68.6 on 2, 58.1 on 4 (full fine-tuning: 385, 219,
#     136 GiB). 1 node does not fit 80 GiB GPUs at micro-batch 8 (use micro-batch 4 there, as
#     gpt3_wikisql.sh explains); 2 nodes is the default.
# Communication, from the same plan: TP 8 fills a node, so the ZeRO-3 gathers cross InfiniBand
#   every micro-batch; at micro-batch 8 they take 14.4 s against 18.2 s of compute per step of
#   128 on 2 nodes and 9.0 s against 9.1 s on 4: compute bound (see gpt3_wikisql.sh for why a
#   micro-batch of 1 would be gather bound).
#
#SBATCH --job-name=lora-falcon-wikisql
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gres=gpu:8
#SBATCH --time=2-00:00:00
#SBATCH --requeue
# B: = signal the batch shell only; launch_common.sh forwards it to the ranks (see there why).
# 900 s before the time limit leaves room to finish a step and write a checkpoint.
#SBATCH --signal=B:USR1@900
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail

# sbatch runs a spooled copy of this file, so find the checkout from the submit directory.
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
[[ -n "$MODEL_DIR" ]] || lc_die "give the Falcon-180B checkpoint: sbatch slurm/falcon_wikisql.sh DIR"
lc_wikisql_recipe falcon ds_configs/zero3_tp8.json 64

lc_trainer_args
lc_main "${LC_TRAIN_ARGS[@]}"
