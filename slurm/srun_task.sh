#!/usr/bin/env bash
# Per-task wrapper for `srun`: maps this task's SLURM_* variables to the torch.distributed
# env:// names (RANK, WORLD_SIZE, LOCAL_RANK, ...) and then execs the rank's program, so the
# program needs no Slurm knowledge. MASTER_ADDR/MASTER_PORT come from the batch shell
# (launch_common.sh exports them and srun propagates the environment).
set -euo pipefail

if [[ -z "${SLURM_PROCID:-}" || -z "${SLURM_STEP_ID:-}" ]]; then
    echo "srun_task.sh: not inside an srun job step (SLURM_PROCID/SLURM_STEP_ID unset)" >&2
    exit 2
fi
export RANK="$SLURM_PROCID"
export WORLD_SIZE="${SLURM_STEP_NUM_TASKS:-$SLURM_NTASKS}"
export LOCAL_RANK="$SLURM_LOCALID"
export NODE_RANK="$SLURM_NODEID"
# "8(x2),4" -> this node's entry. Only uniform layouts matter for training, but parse fully.
per_node="${SLURM_STEP_TASKS_PER_NODE:-${SLURM_TASKS_PER_NODE:-}}"
if [[ -n "$per_node" ]]; then
    counts=()
    IFS=',' read -r -a items <<<"$per_node"
    for item in "${items[@]}"; do
        n="${item%%(*}"
        reps=1
        if [[ "$item" == *"(x"* ]]; then
            reps="${item#*(x}"
            reps="${reps%)}"
        fi
        for ((i = 0; i < reps; i++)); do counts+=("$n"); done
    done
    export LOCAL_WORLD_SIZE="${counts[$SLURM_NODEID]}"
fi
exec "$@"
