"""`lora-dist plan`'s communication model: per-step traffic of a LoRA run, and its time floor.

Under ZeRO-3 each data-parallel (DP) rank holds 1/DP of its tensor-parallel (TP) slice of the
base, so every micro-batch all-gathers the base again: before each module's forward, and before
its backward (a frozen base still needs W for the input gradient). What is not gathered twice:

- tensors at or under the persistence threshold (the trainer raises it to the largest LoRA
  factor: norms, biases and the LoRA factors stay whole on every rank);
- in backward, the first layer's projections up to the first adapted one (q, k, v for LoRA on
  q, v): no gradient flows into their inputs, and LoRA's gradients need no base weight. (The
  input embedding is gathered in backward all the same: counted on 2 CPU ranks under DeepSpeed
  0.19.8, see tests/planning/test_comm_count.py.)
- in backward, the last modules of the forward pass that ZeRO-3 keeps because they are used
  again within `stage3_max_reuse_distance` elements of traversal (about twice the elements
  after them in forward order: the rest of the forward, then the backward back to them).

After each optimizer step ZeRO-3 re-gathers its persistent parameters: the LoRA factors it
updated and the small base tensors.

A rank receives (DP-1)/DP of every gathered tensor: (k-1)/DP from the k DP peers on its node
and the rest across nodes. With TP innermost (global rank = dp_rank * TP + tp_rank), a node of
G GPUs holds k = G/TP ranks of each DP group. NCCL runs an all-gather that spans nodes at the
NIC's bus bandwidth and one inside a node at NVLink's (the `busbw` of nccl-tests), so the floor
is bytes x (DP-1)/DP / bandwidth.

ZeRO++ hierarchical partitioning (`zero_hpz_partition_size` h) keeps a second partition of
every gathered weight over h consecutive ranks (one node). DeepSpeed drops it after each
optimizer step only for the parameters it optimizes, so a frozen base keeps its copy: after the
first gather every gather, forward and backward, stays inside the node, at the cost of 1/h of
the slice per GPU. DeepSpeed builds these groups from consecutive global ranks, which are TP
peers when TP > 1, so it applies with TP = 1 only.

TP adds activation all-reduces inside the node: per layer two in forward, two in backward and two
more when checkpointing recomputes the forward, each of micro x seq x hidden values, moving
2(TP-1)/TP of them per GPU; and the LM head's output gather. LoRA adds, per step, the
reduce-scatter of its gradients over DP.

Compute: a frozen base needs no weight gradients, so each token costs 2N FLOPs forward, 2N for
the input gradients and 2N more when checkpointing recomputes the forward (N: matmul
parameters per TP rank), plus attention's 4 x seq x hidden / TP per token per layer (forward)
at the same multiples. The floor is FLOPs / the GPU's dense peak.

Gathers do not grow with the micro-batch while compute does, so the micro-batch at which the
two floors meet is the smallest one at which ZeRO-3's prefetch can hide the gathers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from lora_dist.planning.shapes import (
    COLUMN_PARALLEL,
    DTYPE_BYTES,
    ModelShape,
    lora_param_count,
    resolve_targets,
)

GB = 1e9
# Where a projection sits in a layer's dataflow: a group's inputs are the previous group's output.
GROUPS = (("qkv", "q", "k", "v"), ("o",), ("gate_up", "gate", "up", "fc_in"), ("down", "fc_out"))


@dataclass
class Links:
    """The hardware figures the time floors are taken from (defaults: an H100 SXM cluster)."""

    nvlink_gbs: float = 450.0
    """GB/s per GPU inside a node (NVLink 4: 450 GB/s each way)"""
    ib_gbs: float = 50.0
    """GB/s per GPU across nodes (one 400 Gb/s InfiniBand NIC per GPU)"""
    gpu_tflops: float = 989.0
    """dense bf16 TFLOP/s per GPU"""


@dataclass
class Layout:
    """What the communication depends on, from the run's settings."""

    nodes: int
    gpus_per_node: int
    tp: int
    micro_batch: int
    seq_len: int
    global_batch: int
    dtype_bytes: int
    lora_r: int
    targets: tuple[str, ...]
    checkpointing: bool
    persistence_threshold: int
    """Tensors of at most this many elements are never partitioned (before the LoRA raise)."""
    reuse_distance: int
    """stage3_max_reuse_distance, in elements."""
    hpz: int = 1
    zero_stage: int = 3

    @property
    def dp(self) -> int:
        return self.nodes * self.gpus_per_node // self.tp

    @property
    def dp_per_node(self) -> int:
        return max(1, self.gpus_per_node // self.tp) if self.tp <= self.gpus_per_node else 1

    @property
    def micro_batches(self) -> int:
        """Micro-batches per optimizer step on each DP rank."""
        return max(1, math.ceil(self.global_batch / (self.micro_batch * self.dp)))


@dataclass
class CommPlan:
    """Per-GPU traffic and time floors of one optimizer step; bytes and seconds."""

    layout: Layout
    links: Links
    forward_elements: int
    """Base elements one rank gathers before the forwards of one micro-batch."""
    backward_elements: int
    """... and before the backwards (fewer: see the module docstring)."""
    gather_inside_bytes: float
    """All-gather bytes received per GPU per step from peers on the same node."""
    gather_across_bytes: float
    """... and from other nodes."""
    tp_bytes: float
    """TP all-reduce and gather bytes per GPU per step (inside the node)."""
    lora_reduce_bytes: float
    """LoRA gradient reduce-scatter bytes per GPU per step."""
    persistent_gather_bytes: float
    """Bytes per GPU per step of the persistent parameters (LoRA factors, small base tensors)
    that ZeRO-3 re-gathers after the optimizer step."""
    gather_seconds_per_micro: float
    tp_seconds_per_sequence: float
    compute_seconds_per_sequence: float
    comm_seconds: float
    compute_seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def allgather_bytes(self) -> float:
        """Everything this GPU receives through all-gathers in one step: the base, then the
        updated LoRA factors."""
        return self.gather_inside_bytes + self.gather_across_bytes + self.persistent_gather_bytes

    @property
    def bound(self) -> str:
        return "communication" if self.comm_seconds > self.compute_seconds else "compute"

    @property
    def balanced_micro_batch(self) -> float:
        """The micro-batch at which gathers and compute take equal time (inf: never)."""
        spare = self.compute_seconds_per_sequence - self.tp_seconds_per_sequence
        if spare <= 0:
            return math.inf
        return self.gather_seconds_per_micro / spare


def _layer_trace(shape: ModelShape, tp: int) -> list[tuple[str, int]]:
    """(role, elements on one TP rank) of one layer's tensors, in forward order."""
    out: list[tuple[str, int]] = [("norm", shape.hidden * (1 + shape.norm_bias))]
    for group in GROUPS:
        for role in group:
            if role not in shape.projections:
                continue
            i, o = shape.projections[role]
            out.append((role, i * o // tp))
            if role in shape.biased:
                out.append((f"{role}.bias", o // tp if role in COLUMN_PARALLEL else o))
        if group[0] == "o":  # the second norm sits before the MLP
            out.append(("norm", shape.hidden * (1 + shape.norm_bias)))
    return out


def layer_numel(shape: ModelShape, tp: int) -> int:
    """Elements of one decoder layer on one TP rank (its largest repeated block)."""
    return sum(n for _, n in _layer_trace(shape, tp))


def model_trace(shape: ModelShape, tp: int) -> list[tuple[str, int, int]]:
    """(role, layer, elements on one TP rank) of every tensor as a forward pass meets it.

    The layer of the embedding is -1 and of the final norm and LM head `shape.layers`.
    """
    embed = shape.vocab * (shape.embed_dim or shape.hidden) // tp
    trace = [("embed", -1, embed)]
    for layer in range(shape.layers):
        trace += [(role, layer, n) for role, n in _layer_trace(shape, tp)]
    trace.append(("norm", shape.layers, shape.hidden * (1 + shape.norm_bias)))
    trace.append(("lm_head", shape.layers, embed))  # a tied head gathers the embedding again
    return trace


def largest_lora_factor(shape: ModelShape, r: int, targets: tuple[str, ...]) -> int:
    """Elements of the largest A (r x in) or B (out x r): the trainer's persistence threshold."""
    return max((r * max(shape.lora_dims(k)) for k in targets), default=0)


def _no_backward(role: str, layer: int, targets: tuple[str, ...]) -> bool:
    """Whether the backward pass skips this tensor's module: nothing before it is trainable."""
    if layer != 0:
        return False
    first = next(g for g, group in enumerate(GROUPS) if set(group) & set(targets))
    base = role.split(".")[0]
    mine = next((g for g, group in enumerate(GROUPS) if base in group), None)
    return mine is not None and mine <= first


def persistence_threshold(shape: ModelShape, layout: Layout) -> int:
    """Tensors of at most this many elements stay whole: the JSON's, raised to the largest
    LoRA factor as the trainer raises it."""
    return max(
        layout.persistence_threshold, largest_lora_factor(shape, layout.lora_r, layout.targets)
    )


def persistent_elements(shape: ModelShape, layout: Layout) -> int:
    """Base elements one rank keeps whole (norms, biases): re-gathered after every step."""
    threshold = persistence_threshold(shape, layout)
    return sum(n for _, _, n in model_trace(shape, layout.tp) if n <= threshold)


def gathered_per_micro(shape: ModelShape, layout: Layout) -> tuple[int, int]:
    """(forward, backward) base elements one rank gathers per micro-batch under ZeRO-3."""
    threshold = persistence_threshold(shape, layout)
    trace = model_trace(shape, layout.tp)
    gathered = [n > threshold for _, _, n in trace]
    forward = sum(n for (_, _, n), g in zip(trace, gathered, strict=True) if g)
    backward, after = 0, 0  # `after`: elements the forward meets after this tensor
    for (role, layer, n), g in zip(reversed(trace), reversed(gathered), strict=True):
        kept = 2 * after < layout.reuse_distance  # still gathered when backward comes back
        if g and not kept and not _no_backward(role, layer, layout.targets):
            backward += n
        after += n
    return forward, backward


def matmul_params(shape: ModelShape, tp: int) -> int:
    """Parameters one TP rank multiplies with per token: every projection and the LM head."""
    per_layer = sum(i * o for i, o in shape.projections.values())
    return (shape.layers * per_layer + shape.vocab * shape.hidden) // tp


def plan_comm(shape: ModelShape, layout: Layout, links: Links) -> CommPlan:
    """Per-GPU traffic of one optimizer step of LoRA under ZeRO-3 (+TP, +hpZ), and the floors."""
    t, dp, k, m = layout.tp, layout.dp, layout.dp_per_node, layout.micro_batches
    b, s, wb = layout.micro_batch, layout.seq_len, layout.dtype_bytes
    notes: list[str] = []
    fwd, bwd = gathered_per_micro(shape, layout) if layout.zero_stage == 3 else (0, 0)
    per_micro = (fwd + bwd) * wb
    hpz = layout.hpz if layout.hpz > 1 and t == 1 else 1
    if layout.hpz > 1 and t > 1:
        notes.append(
            "hpZ ignored: DeepSpeed builds its groups from consecutive ranks, which are TP peers"
        )
    if dp == 1 or per_micro == 0:
        inside = across = 0.0
        gather_s = 0.0
    elif hpz > 1:  # the frozen base's secondary partition serves every gather after the first
        inside, across = per_micro * (hpz - 1) / hpz * m, 0.0
        gather_s = per_micro * (hpz - 1) / hpz / (links.nvlink_gbs * GB)
    else:
        inside = per_micro * (k - 1) / dp * m
        across = per_micro * (dp - k) / dp * m
        bus = links.ib_gbs if dp > k else links.nvlink_gbs
        gather_s = per_micro * (dp - 1) / dp / (bus * GB)
    # TP: per layer 2 all-reduces forward, 2 backward, 2 more when checkpointing recomputes.
    tp_seq = 0.0
    if t > 1:
        n_ar = 4 + 2 * layout.checkpointing
        ring = 2 * (t - 1) / t
        tp_seq = shape.layers * n_ar * s * shape.hidden * wb * ring
        tp_seq += s * shape.vocab * wb * (t - 1) / t  # the LM head gathers its output
    tp_bus = links.nvlink_gbs if t <= layout.gpus_per_node else links.ib_gbs
    n_lora = lora_param_count(shape, layout.lora_r, layout.targets)
    share = (dp - 1) / dp if layout.zero_stage == 3 else 0.0
    lora_reduce = n_lora * wb * (dp - 1) / dp
    persistent = (n_lora + persistent_elements(shape, layout)) * wb * share
    lora_bus = links.ib_gbs if dp > k else links.nvlink_gbs
    passes = 3 if layout.checkpointing else 2  # forward, input gradients, recomputed forward
    attention = 4 * s * shape.hidden * shape.layers / t
    flops_seq = s * passes * (2 * matmul_params(shape, t) + attention)
    compute_seq = flops_seq / (links.gpu_tflops * 1e12)
    tp_seq_s = tp_seq / (tp_bus * GB)
    comm = m * (gather_s + b * tp_seq_s) + (lora_reduce + persistent) / (lora_bus * GB)
    compute = m * b * compute_seq
    if layout.zero_stage != 3:
        notes.append(f"ZeRO-{layout.zero_stage}: the base is not partitioned, nothing to gather")
    return CommPlan(
        layout=layout,
        links=links,
        forward_elements=fwd,
        backward_elements=bwd,
        gather_inside_bytes=inside,
        gather_across_bytes=across,
        tp_bytes=m * b * tp_seq,
        lora_reduce_bytes=lora_reduce,
        persistent_gather_bytes=persistent,
        gather_seconds_per_micro=gather_s,
        tp_seconds_per_sequence=tp_seq_s,
        compute_seconds_per_sequence=compute_seq,
        comm_seconds=comm,
        compute_seconds=compute,
        notes=notes,
    )


def layout_for(shape: ModelShape, run, global_batch: int | None, reuse_distance: int) -> Layout:
    """The Layout of a planner RunSettings (lora_dist.planning.memory)."""
    dp = run.world // run.tp
    return Layout(
        nodes=run.nodes,
        gpus_per_node=run.gpus_per_node,
        tp=run.tp,
        micro_batch=run.micro_batch,
        seq_len=run.seq_len or shape.seq_len,
        global_batch=global_batch or run.micro_batch * dp,
        dtype_bytes=DTYPE_BYTES[run.base_dtype],
        lora_r=run.lora_r,
        targets=resolve_targets(shape, run.targets),
        checkpointing=run.checkpointing,
        persistence_threshold=run.buffers.stage3_param_persistence_threshold,
        reuse_distance=reuse_distance,
        hpz=run.hpz,
        zero_stage=run.zero_stage,
    )
