#!/usr/bin/env bash
# LoRA on GPT-3 175B for WikiSQL, the paper's run (Hu et al. 2021, Table 4: W_q and W_v adapted,
# AdamW lr 2e-4, weight decay 0.1, batch 128, 2 epochs; TP 8 inside a node, ZeRO-3 across nodes).
#
#   sbatch slurm/gpt3_wikisql.sh /models/gpt3-175b            # from the repository root
#   DATA_DIR=/data/wikisql LORA_R=8 sbatch --nodes=4 slurm/gpt3_wikisql.sh /models/gpt3-175b
#   # a 2-rank CPU smoke run of the same script with the small test model:
#   DS_CONFIG=tests/configs/zero3_fp32.json MODEL_DIR=tiny MAX_STEPS=4 sbatch --nodes=1 \
#       --ntasks-per-node=2 --cpus-per-task=1 --gres=none slurm/gpt3_wikisql.sh
#
# Every #SBATCH line can be overridden on the sbatch command line, every setting below from the
# environment (sbatch exports it): MODEL_DIR (or $1), DATA_DIR, DS_CONFIG, OUTPUT_DIR, LORA_R,
# LORA_ALPHA, LORA_TARGETS, LR, EPOCHS, MAX_STEPS, SEED, SAVE_EVERY, KEEP_LAST, EVAL_EVERY,
# ACTIVATION_CHECKPOINTING, EXTRA_ARGS, and launch_common.sh's LAUNCH_MODE, SITE_ENV (NCCL and
# other site settings), EXT_DIR, MAX_RESTARTS, ... Batch 128 and weight decay 0.1 live in the
# DeepSpeed JSON.
#
# Memory, from `lora-dist plan --model gpt3-175b --nodes N --gpus_per_node 8 --tp 8 --zero 3
#   --lora_r 4 --lora_targets q,v --micro_batch 1 --max_length 2048 --dtype bf16 --gpu_gib 80`:
#   bf16 weights: 174.6e9 params x 2 B = 349 GB (325 GiB); ZeRO-3 splits them over all N*8 GPUs:
#     325/8 = 40.7 GiB per GPU on 1 node, 20.4 on 2, 10.2 on 4.
#   LoRA r=4 on q,v: 96 layers x 2 x (12288*4 + 4*12288) = 18.9M params; with bf16 weights and
#     grads and fp32 Adam m, v and master copy (16 B/param) that is 0.3 GB for the whole job.
#   Activations, checkpointing on, micro-batch 1 x 2048 tokens: 96 saved layer inputs x 2048 x
#     12288 x 2 B = 4.8 GB per GPU (the 8 TP ranks each hold them); plan: 5.2 GiB with the rest.
#   Plan's total per GPU: 49.4 GiB on 1 node, 28.9 on 2, 18.6 on 4 (full fine-tuning: 338, 175,
#     94 GiB: it fits nowhere here, which is the paper's point).
# Communication, from the same plan with --global_batch 128 --micro_batch B [--tp 1 --hpz 8] on
#   80 GiB H100s (NVLink 450 GB/s, one 50 GB/s NIC per GPU, 989 TFLOP/s; the time floors assume
#   all three at their peak):
#   ZeRO-3 all-gathers the base again in every micro-batch's forward and backward. With TP 8
#     filling a node, the DP group has one rank per node, so every gather crosses InfiniBand:
#     2 x 40.7 GiB x (N-1)/N per micro-batch per GPU, whatever N is, while compute per
#     micro-batch grows with its size. So on 2+ nodes the micro-batch must be large enough to
#     hide the gathers (the plan prints the balancing size):
#       N=1, TP 8, micro 4:  64.9 GiB/GPU, no gathers at all (DP 1); floor 35.7 s/step, compute
#         bound (micro 8 needs 85.5 GiB: does not fit).
#       N=2, TP 8, micro 1:  28.9 GiB, but 62.5 s/step of gathers against 17.8 s of compute:
#         SLOWER than one node. More nodes do not "only buy throughput" at micro-batch 1.
#       N=2, TP 8, micro 8 (ds_configs/zero3_tp8.json, the default): 65.0 GiB, gathers 14.2 s
#         vs compute 17.8 s per step: compute bound, twice one node's rate.
#       N=4, TP 8, micro 8:  54.7 GiB, 8.8 s vs 8.9 s: balanced. N=8: 4.8 s vs 4.5 s, gathers
#         bound (balance at micro 9.1), and beyond that TP 8 stops scaling.
#       N>=8, TP 1 + ZeRO++ hpZ 8 (ds_configs/zero3_hpz8.json, micro 1): the frozen base keeps a
#         second partition inside each node, so after the first step every gather stays on
#         NVLink: 58.1 GiB/GPU and 2.7 s of gathers vs 4.5 s of compute at N=8 (55.6 GiB,
#         1.4 s vs 2.2 s at N=16): compute bound and scaling. hpZ needs TP 1 (DeepSpeed groups
#         consecutive ranks, which are TP peers when TP > 1).
#   32 GiB V100s (the paper's hardware; fp16, 12.5 GB/s NICs, 125 TFLOP/s): the 40.7 GiB slice
#     fits only split over DP. At N=16 with TP 8 a GPU holds 10.9 GiB at micro 1, but gathers
#     take 54.5 s vs 17.6 s of compute; micro 4 (26.4 GiB) balances them (15.7 s vs 17.6 s).
#     TP setup partitions each slice over DP as it is built, so its peak is one gathered weight
#     plus 1/(TP x DP) of the base, not the whole 40.7 GiB slice.
#
#SBATCH --job-name=lora-gpt3-wikisql
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gres=gpu:8
# CPUs per rank: data loading, tokenization and the NCCL proxy threads. 8 fits most 8-GPU nodes
# (96-128 cores); launch_common.sh hands it to srun and to OMP_NUM_THREADS.
#SBATCH --cpus-per-task=8
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

MODEL_DIR="${1:-${MODEL_DIR:-}}"  # empty: the trainer's default model
# The paper fine-tunes GPT-3 with r in 1..8 on q,v (4.7M params at r=1, 37.7M at r=8) and
# quotes its 35 MB checkpoint at r=4.
lc_wikisql_recipe gpt3 ds_configs/zero3_tp8.json 8

lc_trainer_args
lc_main "${LC_TRAIN_ARGS[@]}"
