# shellcheck shell=bash
# Shared launch logic for the sbatch scripts in slurm/: source it, then `lc_main TRAINER_ARGS...`.
#
# It resolves the allocation's nodes, exports MASTER_ADDR/MASTER_PORT, starts one trainer rank
# per task, forwards preemption signals to the ranks, and decides from the trainer's exit code
# whether to requeue the job. Knobs (environment, all optional):
#   LAUNCH_MODE=srun       one `srun` task per rank; slurm/srun_task.sh maps SLURM_* -> RANK etc.
#   LAUNCH_MODE=deepspeed  the `deepspeed` launcher on the first node with a generated hostfile
#                          (one node: local launch; several: DS_LAUNCHER, default slurm = srun)
#   PYTHON, DEEPSPEED      interpreter / launcher executables (default: python3 / deepspeed)
#   TRAIN_CMD              stand-in for "python launcher/train.py" (tests); trainer args appended
#   MAX_RESTARTS=3         crash retries, counted by SLURM_RESTART_COUNT (which also counts
#                          preemption requeues: a job preempted 3 times gets no crash retry)
#   MAX_REQUEUES=100       runaway guard for preemption requeues (exit 75)
#   SRUN_WAIT=120          seconds srun waits for the other ranks once one has exited
#   SITE_ENV               a file sourced first, for a site's settings (below)
#   EXT_DIR                where DeepSpeed JIT-builds its fused ops (default: node-local, below)
#
# CPUs. The scripts ask `--cpus-per-task`; since Slurm 22.05 srun does not inherit it from the
# batch job, so srun mode passes it on, and OMP_NUM_THREADS follows it (torch's CPU threads,
# tokenization) unless set.
#
# Fused ops. DeepSpeed compiles its CUDA ops (FusedAdam, ...) on first use into
# TORCH_EXTENSIONS_DIR, under a lock file. The default, ~/.cache/torch_extensions, is often an
# NFS home shared by every node: concurrent builds then wait on each other's locks, and a rank
# killed mid-build leaves a lock that hangs the next job. So each job builds on node-local disk,
# ${TMPDIR:-/tmp}/lora-dist-ext-<user>-<job> (about a minute per op; requeues build again).
# Better still, build them once when installing: DS_BUILD_OPS=1 pip install deepspeed.
#
# NCCL. Defaults set here, only when unset: NCCL_DEBUG=WARN (INFO shows the transport and
# topology chosen: check for "NET/IB" between nodes, not "NET/Socket"). Settings that depend on
# the site go in SITE_ENV; the usual ones:
#   NCCL_SOCKET_IFNAME=ib0|eth0     bootstrap interface on nodes with several (also
#                                   GLOO_SOCKET_IFNAME for gloo)
#   NCCL_IB_HCA=mlx5_0,mlx5_1,...   which InfiniBand adapters (one per GPU on an H100 node)
#   NCCL_IB_GID_INDEX=3             RoCE fabrics
#   NCCL_NET_GDR_LEVEL=PHB          GPUDirect RDMA reach; NCCL_TOPO_FILE on VMs that hide it
#   FI_PROVIDER=efa, FI_EFA_USE_DEVICE_RDMA=1   AWS EFA through aws-ofi-nccl
#   TORCH_NCCL_ASYNC_ERROR_HANDLING=1, NCCL_TIMEOUT via the trainer are PyTorch's: a failed
#                                   peer then aborts the job instead of hanging to the limit
# `lora-dist plan` prints the all-gather volume inside and across nodes for a layout, and which
# of communication and compute bounds the step.
#
# Signals. `#SBATCH --signal=B:USR1@N` signals only the batch shell (this script); without `B:`
# Slurm signals the job steps, which misses a deepspeed launcher running in the batch step. So the
# scripts ask for B:USR1 and this shell forwards it: to srun (which relays it to every task) or,
# for the deepspeed launcher, past the launcher processes straight to the ranks, because both
# deepspeed's runner and its launch.py die on an unhandled USR1. The launchers also start with
# USR1 ignored, so `scancel --signal=USR1 --full` (everything in the job at once) cannot kill them;
# the trainer installs its own USR1 handler, which replaces the inherited "ignore".
#
# Exit codes of the trainer: 0 finished -> never requeue; 75 preempted with a checkpoint written
# -> `scontrol requeue` (it resumes with --resume auto); anything else is a crash -> requeue while
# SLURM_RESTART_COUNT < MAX_RESTARTS, else fail with the trainer's code so the failure is seen.

EXIT_PREEMPTED=75
LC_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
LAUNCH_MODE="${LAUNCH_MODE:-srun}"
PYTHON="${PYTHON:-python3}"
DEEPSPEED="${DEEPSPEED:-deepspeed}"
DS_LAUNCHER="${DS_LAUNCHER:-slurm}"
MAX_RESTARTS="${MAX_RESTARTS:-3}"
MAX_REQUEUES="${MAX_REQUEUES:-100}"
SRUN_WAIT="${SRUN_WAIT:-120}"
LC_PAYLOAD_PID=""

# Settings every rank inherits: the site's file, node-local op builds, NCCL and CPU defaults.
lc_site_env() {
    if [[ -n "${SITE_ENV:-}" ]]; then
        [[ -f "$SITE_ENV" ]] || lc_die "SITE_ENV=$SITE_ENV does not exist"
        # shellcheck source=/dev/null
        source "$SITE_ENV"
    fi
    export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-${EXT_DIR:-${TMPDIR:-/tmp}/lora-dist-ext-${USER:-user}-${SLURM_JOB_ID:-0}}}"
    export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$TORCH_EXTENSIONS_DIR/triton}"
    export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
    if [[ -n "${SLURM_CPUS_PER_TASK:-}" ]]; then
        export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$SLURM_CPUS_PER_TASK}"
    fi
}

lc_log() {
    echo "[launch $(date +%H:%M:%S) job ${SLURM_JOB_ID:-?}] $*"
}

lc_die() {
    lc_log "ERROR: $*" >&2
    exit 2
}

lc_require_int() {  # NAME VALUE MIN MAX
    if ! [[ "$2" =~ ^[0-9]+$ ]] || (($2 < $3 || $2 > $4)); then
        lc_die "$1=$2 must be an integer in $3..$4"
    fi
}

# Sets LC_NODES, LC_NNODES, LC_TASKS_PER_NODE and exports MASTER_ADDR, MASTER_PORT.
lc_resolve_layout() {
    [[ -n "${SLURM_JOB_ID:-}" ]] || lc_die "not inside a Slurm job: submit this script with sbatch"
    mapfile -t LC_NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
    LC_NNODES=${#LC_NODES[@]}
    ((LC_NNODES > 0)) || lc_die "scontrol found no hosts in SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST"
    # SLURM_NTASKS_PER_NODE exists only with --ntasks-per-node; SLURM_TASKS_PER_NODE ("8(x2)")
    # always does. Ranks must be uniform across nodes, so the first entry is the count.
    local per_node="${SLURM_NTASKS_PER_NODE:-${SLURM_TASKS_PER_NODE:-1}}"
    LC_TASKS_PER_NODE="${per_node%%[(,]*}"
    export MASTER_ADDR="${MASTER_ADDR:-${LC_NODES[0]}}"
    # Derived from the job id so two jobs sharing a node do not fight over one port.
    export MASTER_PORT="${MASTER_PORT:-$((10000 + SLURM_JOB_ID % 20000))}"
    # launcher/train.py imports lora_dist from the checkout when it is not pip-installed.
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    lc_log "layout: ${LC_NNODES} node(s) [${LC_NODES[*]}] x ${LC_TASKS_PER_NODE} rank(s)" \
        "= world size $((LC_NNODES * LC_TASKS_PER_NODE)); master ${MASTER_ADDR}:${MASTER_PORT};" \
        "mode ${LAUNCH_MODE}; restart ${SLURM_RESTART_COUNT:-0}"
}

# Fills LC_CMD with the launcher command for the per-rank program given as arguments.
lc_build_command() {
    local world=$((LC_NNODES * LC_TASKS_PER_NODE))
    case "$LAUNCH_MODE" in
    srun)
        local -a extra=()
        read -r -a extra <<<"${SRUN_EXTRA_ARGS:-}"
        # No --kill-on-bad-exit: the first rank to exit 75 would get its peers killed while they
        # still write their share of the checkpoint. --wait bounds a hang after a crash instead.
        if [[ -n "${SLURM_CPUS_PER_TASK:-}" ]]; then
            extra=(--cpus-per-task="$SLURM_CPUS_PER_TASK" "${extra[@]}")
        fi
        LC_CMD=(srun --nodes="$LC_NNODES" --ntasks="$world" --ntasks-per-node="$LC_TASKS_PER_NODE"
            --kill-on-bad-exit=0 --wait="$SRUN_WAIT" "${extra[@]}" "$LC_DIR/srun_task.sh" "$@")
        ;;
    deepspeed)
        local hostfile="${LC_HOSTFILE:-${TMPDIR:-/tmp}/lora_dist_hostfile.$SLURM_JOB_ID}"
        local node slots="$LC_TASKS_PER_NODE" include=""
        # On one node deepspeed's launch.py sets CUDA_VISIBLE_DEVICES to the hostfile's slot ids
        # 0..n-1, which would throw away the GPUs Slurm assigned (say 4,5,6,7 on a shared node)
        # and run on another job's. Naming Slurm's ids as the slots keeps them. (Across nodes the
        # launcher hands the ranks to srun, which binds them itself.)
        if ((LC_NNODES == 1)) && [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
            lc_slurm_gpu_slots "$CUDA_VISIBLE_DEVICES"
            slots="$LC_MAX_SLOT"
            include="${LC_NODES[0]}:$CUDA_VISIBLE_DEVICES"
        fi
        for node in "${LC_NODES[@]}"; do
            echo "$node slots=$slots"
        done >"$hostfile"
        lc_log "deepspeed hostfile $hostfile: $(tr '\n' ';' <"$hostfile")${include:+ include $include}"
        # --no_ssh_check: a Slurm allocation needs no ssh; the slurm launcher uses srun.
        LC_CMD=("$DEEPSPEED" --hostfile "$hostfile" --master_addr "$MASTER_ADDR"
            --master_port "$MASTER_PORT" --no_ssh_check)
        if [[ -n "$include" ]]; then
            LC_CMD+=(--include "$include")
        fi
        if ((LC_NNODES > 1)); then
            LC_CMD+=(--launcher "$DS_LAUNCHER")
        fi
        if [[ -n "${TRAIN_CMD:-}" ]]; then
            LC_CMD+=(--no_python --no_local_rank)
        fi
        LC_CMD+=("$@")
        ;;
    *) lc_die "LAUNCH_MODE=$LAUNCH_MODE: use srun or deepspeed" ;;
    esac
}

# Checks Slurm's CUDA_VISIBLE_DEVICES for this node against the ranks; sets LC_MAX_SLOT to the
# hostfile slot count that makes every id a valid slot.
lc_slurm_gpu_slots() {  # CUDA_VISIBLE_DEVICES
    local -a ids
    local id max=-1
    IFS=',' read -r -a ids <<<"$1"
    for id in "${ids[@]}"; do
        [[ "$id" =~ ^[0-9]+$ ]] || lc_die "CUDA_VISIBLE_DEVICES=$1 holds '$id', not a GPU index:" \
            "the deepspeed launcher can only name GPUs by index; use LAUNCH_MODE=srun"
        ((id > max)) && max="$id"
    done
    ((${#ids[@]} == LC_TASKS_PER_NODE)) || lc_die "Slurm gave this node ${#ids[@]} GPU(s)" \
        "(CUDA_VISIBLE_DEVICES=$1) for $LC_TASKS_PER_NODE rank(s): request --gres=gpu:N with N" \
        "equal to --ntasks-per-node"
    LC_MAX_SLOT=$((max + 1))
}

lc_is_launcher() {  # ARGS-STRING: processes that relay work and must not receive USR1 themselves
    case "$1" in
    *deepspeed.launcher.launch* | *bin/deepspeed\ * | *deepspeed.launcher.runner*) return 0 ;;
    *torch.distributed.run* | *bin/torchrun\ *) return 0 ;;
    esac
    return 1
}

# Signal the first non-launcher process on every branch of the process tree below PID.
lc_signal_payload() {  # SIGNAL PID
    local sig="$1" pid="$2" args child
    args="$(ps -o args= -p "$pid" 2>/dev/null)" || return 0
    if lc_is_launcher "$args"; then
        for child in $(ps -o pid= --ppid "$pid" 2>/dev/null); do
            lc_signal_payload "$sig" "$child"
        done
    else
        kill -s "$sig" "$pid" 2>/dev/null || true
    fi
}

lc_on_signal() {  # SIGNAL
    lc_log "batch shell got SIG$1: forwarding it so every rank checkpoints and exits $EXIT_PREEMPTED"
    if [[ -n "$LC_PAYLOAD_PID" ]]; then
        lc_signal_payload "$1" "$LC_PAYLOAD_PID"
    fi
}

# Run the command in the background (bash runs traps only between commands, so a foreground
# child would delay forwarding until it exits) and return its exit code.
lc_run() {
    trap 'lc_on_signal USR1' USR1
    trap 'lc_on_signal TERM' TERM
    (
        trap '' USR1
        exec "$@"
    ) &
    LC_PAYLOAD_PID=$!
    # A trapped signal interrupts `wait`; keep waiting while the payload lives. bash keeps the
    # exit status of a reaped child, so the final `wait` returns it.
    while kill -0 "$LC_PAYLOAD_PID" 2>/dev/null; do
        wait "$LC_PAYLOAD_PID" || true
    done
    local rc=0
    wait "$LC_PAYLOAD_PID" || rc=$?
    trap - USR1 TERM
    LC_PAYLOAD_PID=""
    return "$rc"
}

lc_requeue() {
    if scontrol requeue "$SLURM_JOB_ID"; then
        return 0
    fi
    lc_log "scontrol requeue failed: was the job submitted with --requeue (or JobRequeue=1)?"
    return 1
}

# Decide what the trainer's exit code means for the job; returns the batch script's exit code.
lc_finish() {  # RC
    local rc="$1" restarts="${SLURM_RESTART_COUNT:-0}"
    if ((rc == 0)); then
        lc_log "trainer finished (exit 0): job done, not requeueing"
        return 0
    fi
    if ((rc == EXIT_PREEMPTED)); then
        if ((restarts >= MAX_REQUEUES)); then
            lc_log "trainer preempted (exit $rc) but the job was already requeued $restarts" \
                "times (MAX_REQUEUES=$MAX_REQUEUES): not requeueing; resubmit to continue"
            return "$rc"
        fi
        lc_log "trainer checkpointed after a signal (exit $rc): requeueing for restart $((restarts + 1))"
        lc_requeue || return "$rc"
        return 0
    fi
    if ((restarts < MAX_RESTARTS)); then
        lc_log "trainer crashed (exit $rc): requeueing, restart $((restarts + 1)) of" \
            "MAX_RESTARTS=$MAX_RESTARTS; it resumes from the latest valid checkpoint"
        lc_requeue || return "$rc"
        return 0
    fi
    lc_log "trainer crashed (exit $rc) and the job has been restarted $restarts time(s)" \
        "(MAX_RESTARTS=$MAX_RESTARTS): not requeueing again; see the log above for the error"
    return "$rc"
}

# Entry point: lc_main TRAINER_ARGS... (runs launcher/train.py, or TRAIN_CMD, on every rank).
lc_main() {
    lc_require_int MAX_RESTARTS "$MAX_RESTARTS" 0 1000
    lc_require_int MAX_REQUEUES "$MAX_REQUEUES" 0 100000
    lc_site_env
    lc_resolve_layout
    local -a program
    if [[ -n "${TRAIN_CMD:-}" ]]; then
        read -r -a program <<<"$TRAIN_CMD"
    elif [[ "$LAUNCH_MODE" == deepspeed ]]; then
        program=(launcher/train.py)  # the deepspeed launcher adds its own python
    else
        program=("$PYTHON" -u launcher/train.py)
    fi
    lc_build_command "${program[@]}" "$@"
    lc_log "command: ${LC_CMD[*]}"
    local rc=0
    lc_run "${LC_CMD[@]}" || rc=$?
    lc_finish "$rc"
}

lc_wikisql_recipe() {  # NAME DEFAULT_DS_CONFIG MAX_R
    # The paper's WikiSQL recipe (LoRA on the q,v slices, AdamW lr 2e-4, 2 epochs), shared by
    # every <model>_wikisql.sh; each setting stays overridable from the environment.
    DATA_DIR="${DATA_DIR:-}" # empty: the WikiSQL sample shipped with the task
    DS_CONFIG="${DS_CONFIG:-$2}"
    LORA_R="${LORA_R:-4}"
    lc_require_int LORA_R "$LORA_R" 1 "$3"
    LORA_ALPHA="${LORA_ALPHA:-$LORA_R}"   # alpha/r = 1 at the first r tried, as the paper fixes
    LORA_TARGETS="${LORA_TARGETS:-attn}" # W_q, W_v of any architecture (slices of a fused map)
    LR="${LR:-2e-4}"
    EPOCHS="${EPOCHS:-2}"
    MAX_STEPS="${MAX_STEPS:-}"
    SAVE_EVERY="${SAVE_EVERY:-50}"
    ACTIVATION_CHECKPOINTING="${ACTIVATION_CHECKPOINTING:-1}"
    OUTPUT_DIR="${OUTPUT_DIR:-runs/$1-wikisql-r${LORA_R}}"
}

# Fills LC_TRAIN_ARGS with the trainer flags the environment asks for. The batch scripts set
# the defaults; flags whose variable is empty are left to the trainer's own defaults.
lc_trainer_args() {
    LC_TRAIN_ARGS=(--ds_config "$DS_CONFIG" --task "${TASK:-wikisql}" --output_dir "$OUTPUT_DIR"
        --lora_r "$LORA_R" --lora_alpha "$LORA_ALPHA" --lora_targets "$LORA_TARGETS"
        --resume "${RESUME:-auto}")
    local pair flag var value
    for pair in model:MODEL_DIR data:DATA_DIR lr:LR epochs:EPOCHS max_steps:MAX_STEPS seed:SEED \
        save_every:SAVE_EVERY keep_last:KEEP_LAST eval_every:EVAL_EVERY; do
        flag="${pair%%:*}"
        var="${pair#*:}"
        value="${!var:-}"
        if [[ -n "$value" ]]; then
            LC_TRAIN_ARGS+=("--$flag" "$value")
        fi
    done
    if [[ "${ACTIVATION_CHECKPOINTING:-0}" == 1 ]]; then
        LC_TRAIN_ARGS+=(--activation_checkpointing)
    fi
    local -a extra=()
    read -r -a extra <<<"${EXTRA_ARGS:-}"
    LC_TRAIN_ARGS+=("${extra[@]}")
    [[ -f "$DS_CONFIG" ]] || lc_die "DS_CONFIG=$DS_CONFIG does not exist (relative to $PWD)"
}
