#!/usr/bin/env bash
# LoRA on a 7B-70B LLaMA for WikiSQL on 1-2 nodes, with the paper's recipe (q,v adapted, AdamW
# lr 2e-4, 2 epochs; weight decay and batch size in the DeepSpeed JSON).
#
#   sbatch slurm/llama_wikisql.sh /models/Llama-2-7b-hf                     # 1 node, ZeRO-3
#   sbatch --nodes=2 slurm/llama_wikisql.sh /models/Llama-2-70b-hf            # 2 nodes, hpZ
#
# Overrides as in gpt3_wikisql.sh: #SBATCH lines on the sbatch command line; MODEL_DIR (or $1),
# DATA_DIR, DS_CONFIG, OUTPUT_DIR, LORA_R, LORA_ALPHA, LORA_TARGETS, LR, EPOCHS, MAX_STEPS, SEED,
# SAVE_EVERY, KEEP_LAST, EVAL_EVERY, ACTIVATION_CHECKPOINTING, EXTRA_ARGS, LAUNCH_MODE, SITE_ENV,
# ... The default JSON, ds_configs/zero3_hpz8.json: bf16, ZeRO-3 with ZeRO++ hpZ 8, batch 128
# (the paper's), micro-batch 1, TP 1.
#
# Size and speed, from `lora-dist plan --model llama-2-{7b,13b,70b} --ds_config
#   ds_configs/zero3_hpz8.json --gpus_per_node 8 --lora_r 8 --lora_targets q,v --max_length 2048
#   --nodes N [--hpz 1]` on 80 GiB H100s (NVLink 450 GB/s, a 50 GB/s NIC per GPU, 989 TFLOP/s):
#   LoRA per GPU, 7B / 13B / 70B: 1 node 7.8 / 11.6 / 41.3 GiB (6.3 / 8.5 / 25.3 without hpZ,
#   whose second partition is pure cost on one node); 2 nodes 7.0 / 10.0 / 33.3 GiB.
#   ZeRO-3 all-gathers the base in each micro-batch's forward and backward. On one node that
#   runs on NVLink and the step is compute bound (70B: 8.5 s of gathers vs 14.2 s of compute).
#   On 2 nodes without hpZ the DP group spans InfiniBand and the gathers dominate (70B: 41.1 s vs
#   7.1 s; balanced only at micro-batch 6): a second node would make the run slower. With hpZ 8
#   the frozen base keeps a second partition per node and every gather after the first stays on
#   NVLink: 4.3 s vs 7.1 s, compute bound, for +16 GiB per GPU at 70B.
#
#SBATCH --job-name=lora-llama-wikisql
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gres=gpu:8
# CPUs per rank (see gpt3_wikisql.sh); launch_common.sh hands it to srun and OMP_NUM_THREADS.
#SBATCH --cpus-per-task=8
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
# The paper's recipe, with r=8, alpha=2r and a checkpoint every 100 steps for these sizes.
LORA_R="${LORA_R:-8}"
LORA_ALPHA="${LORA_ALPHA:-$((2 * LORA_R))}"
SAVE_EVERY="${SAVE_EVERY:-100}"
lc_wikisql_recipe llama ds_configs/zero3_hpz8.json 256

lc_trainer_args
lc_main "${LC_TRAIN_ARGS[@]}"
