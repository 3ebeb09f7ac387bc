#!/usr/bin/env bash
# LoRA on BLOOM-176B for WikiSQL with the paper's recipe: only the q and v slices of BLOOM's fused
# query_key_value are adapted (k untouched), AdamW lr 2e-4, weight decay 0.1, 2 epochs.
#
#   sbatch slurm/bloom_wikisql.sh /models/bloom                   # 1 node x 8 GPUs, TP 1
#   DS_CONFIG=ds_configs/zero3_hpz8.json sbatch --nodes=4 slurm/bloom_wikisql.sh /models/bloom
#
# Overrides as in gpt3_wikisql.sh: #SBATCH lines on the sbatch command line; MODEL_DIR (or $1),
# DATA_DIR, DS_CONFIG, OUTPUT_DIR, LORA_R, LORA_ALPHA, LORA_TARGETS, LR, EPOCHS, MAX_STEPS, SEED,
# SAVE_EVERY, KEEP_LAST, EVAL_EVERY, ACTIVATION_CHECKPOINTING, EXTRA_ARGS, LAUNCH_MODE, ...
#
# Why TP 1: BLOOM uses ALiBi, whose per-head slopes DeepSpeed 0.19.8's AutoTP does not shard with
# the heads, so the trainer refuses BLOOM under TP. ZeRO-3 alone splits the base over every GPU.
#
# Memory, from `lora-dist plan --model bloom-176b --nodes N --gpus_per_node 8 --tp 1 --zero 3
#   --lora_r 4 --lora_targets q,v --micro_batch 1 --max_length 2048 --dtype bf16 --gpu_gib 80
#   --ds_config ds_configs/zero3_large.json`:
#   bf16 weights: 176.2e9 params x 2 B = 328 GiB; ZeRO-3 splits them over all N*8 GPUs: 41.1 GiB
#     per GPU on 1 node, 20.5 on 2, 10.3 on 4.
#   LoRA r=4 on the q,v slices: 70 layers x 2 x (14336*4 + 4*14336) = 16,056,320 params; the
#     adapter file is 64.2 MB in bf16.
#   Activations, checkpointing on, micro-batch 1 x 2048 tokens: 11.7 GiB per GPU (no TP to split
#     them), plus ZeRO-3's gather buffers sized from the model.
#   Plan's total per GPU: 66.2 GiB on 1 node, 45.6 on 2, 35.4 on 4 (full fine-tuning: 365, 201,
#     118 GiB).
# Communication, from the same plan: with TP 1 every ZeRO-3 gather of the base spans the whole
#   data-parallel group. On 1 node it stays on NVLink: floor 22.1 s of gathers against 35.9 s of
#   compute per step of 128, compute bound. On 2 or 4 nodes the gathers cross InfiniBand every
#   micro-batch (106.6 s and 55.1 s against 17.9 s and 9.0 s of compute): slower than one node.
#   So the default is 1 node. To scale out use ZeRO++ hpZ, which keeps a second copy of the base
#   partitioned inside each node: DS_CONFIG=ds_configs/zero3_hpz8.json sbatch --nodes=4 (76.4
#   GiB per GPU, 5.5 s of NVLink gathers against 9.0 s of compute; it does not fit on 2 nodes).
#
#SBATCH --job-name=lora-bloom-wikisql
#SBATCH --nodes=1
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
[[ -n "$MODEL_DIR" ]] || lc_die "give the BLOOM-176B checkpoint: sbatch slurm/bloom_wikisql.sh DIR"
lc_wikisql_recipe bloom ds_configs/zero3_large.json 64  # TP 1, batch 128 at micro-batch 1

lc_trainer_args
lc_main "${LC_TRAIN_ARGS[@]}"
