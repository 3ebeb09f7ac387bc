"""Predict per-GPU memory and communication of LoRA (vs full fine-tuning) under ZeRO and TP.

The accounting is in lora_dist.planning.memory and lora_dist.planning.comm. Settings come from
the flags, which override --paper, which overrides --ds_config, which overrides the defaults.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Literal

from lora_dist.commands.options import Options, option
from lora_dist.errors import ConfigError
from lora_dist.planning.comm import CommPlan, Links, layer_numel, layout_for, plan_comm
from lora_dist.planning.memory import (
    GIB,
    ITEMS,
    PAPER_SETTINGS,
    MemoryPlan,
    RunSettings,
    ds_overrides,
    plan_memory,
)
from lora_dist.planning.presets import PRESETS, load_shape
from lora_dist.planning.shapes import ModelShape
from lora_dist.settings import existing_file

Dtype = Literal["fp32", "bf16", "fp16"]


@dataclass
class PlanOptions(Options):
    """`lora-dist plan`: a model, a cluster layout, LoRA settings, and a memory budget."""

    model: str | None = None
    """a preset (gpt3-175b, gpt3-13b, llama-2-7b, llama-2-13b, llama-2-70b, llama-3-8b,
    llama-3-70b, opt-66b), a config.json, or a model directory holding one"""
    nodes: int = option(1, minimum=1)
    """nodes in the job"""
    gpus_per_node: int = option(8, minimum=1)
    """ranks (GPUs) per node"""
    tp: int = option(1, minimum=1)
    """tensor-parallel degree"""
    zero: int | None = None
    """ZeRO stage 0-3 (default: the ds_config's, else 3)"""
    offload: Literal["none", "optimizer", "param+optimizer"] | None = None
    """ZeRO-Offload to host memory (default: the ds_config's, else none)"""
    dtype: Dtype | None = None
    """dtype of the base weights (default: the ds_config's, else bf16)"""
    lora_dtype: Dtype | None = None
    """dtype of the LoRA factors (default: the base dtype)"""
    optim_dtype: Dtype | None = None
    """dtype of Adam's m and v (default: fp32)"""
    master_weights: bool | None = None
    """keep an fp32 master copy of 16-bit trainable weights (default: yes; no with --paper)"""
    lora_r: int | None = option(None, minimum=1, aliases=("-r",))
    """LoRA rank r (default: 8; 4 with --paper)"""
    lora_targets: str | None = option(None, aliases=("--targets",))
    """attn (q,v), attn-all (q,k,v,o), all (+MLP), or a comma list of q, k, v, o, gate, up,
    down, fc_in, fc_out (default: attn; q,v with --paper)"""
    micro_batch: int | None = option(None, minimum=1)
    """sequences per GPU (default: the ds_config's, else 1)"""
    max_length: int | None = option(None, minimum=1, aliases=("--seq_len",))
    """tokens per sequence (default: the model's context length)"""
    activation_checkpointing: bool = option(True, aliases=("--checkpointing",))
    """recompute activations in the backward pass"""
    flash_attention: bool = False
    """attention that never stores the s*s score matrix"""
    gpu_gib: float = option(80.0, above=0)
    """memory per GPU, to check what fits"""
    device: Literal["gpu", "cpu"] = "gpu"
    """gpu, or cpu for CPU-only ranks (host memory is then the rank's memory)"""
    overhead_gib: float | None = option(None, minimum=0)
    """framework overhead per rank (default: 2 GiB on a GPU, 0.6 GiB on the CPU)"""
    global_batch: int | None = option(None, minimum=1)
    """sequences per optimizer step over all ranks (default: the ds_config's train_batch_size,
    else one micro-batch per data-parallel rank)"""
    hpz: int | None = option(None, minimum=1)
    """ZeRO++ zero_hpz_partition_size: a second copy of the base partitioned inside each node
    (default: the ds_config's, else 1 = off)"""
    nvlink_gbs: float = option(450.0, above=0)
    """GB/s per GPU between GPUs of a node (NVLink 4 of an H100 SXM: 450)"""
    ib_gbs: float = option(50.0, above=0)
    """GB/s per GPU between nodes (one 400 Gb/s InfiniBand NIC per GPU: 50)"""
    gpu_tflops: float = option(989.0, above=0)
    """dense bf16 TFLOP/s per GPU, for the compute floor (H100 SXM: 989)"""
    ds_config: str | None = None
    """a DeepSpeed JSON: ZeRO stage, offload, precision, batch sizes, hpZ and bucket sizes"""
    paper: bool = False
    """Hu et al.'s accounting of 1.2 TB vs 350 GB (GPT-3 175B unless --model is given)"""
    json: bool = False
    """print the plan as JSON"""

    def validate(self) -> None:
        existing_file("--ds_config", self.ds_config)
        if self.model is None and not self.paper:
            raise ConfigError(
                f"--model is required: a preset ({', '.join(PRESETS)}) or a config.json"
            )


OPTIONS = PlanOptions

# PlanOptions field -> RunSettings field, where the names differ.
_RUN_FIELDS = {
    "zero": "zero_stage",
    "dtype": "base_dtype",
    "lora_targets": "targets",
    "max_length": "seq_len",
    "activation_checkpointing": "checkpointing",
}
_NOT_RUN = ("nvlink_gbs", "ib_gbs", "gpu_tflops")


def run_settings(opts: PlanOptions) -> tuple[ModelShape, RunSettings]:
    """The model's shape and the run: flags over --paper over the ds_config over defaults."""
    settings, buffers = ds_overrides(opts.ds_config)
    if opts.paper:
        settings |= PAPER_SETTINGS
    names = {f.name for f in dataclasses.fields(RunSettings)}
    for name, value in dataclasses.asdict(opts).items():
        key = _RUN_FIELDS.get(name, name)
        if key in names and value is not None and name not in _NOT_RUN:
            settings[key] = value
    return load_shape(opts.model or "gpt3-175b"), RunSettings(buffers=buffers, **settings)


def format_plan(plan: MemoryPlan) -> str:
    """The human-readable table: items by mode, per GPU and over the cluster, in GiB."""
    s, r, w = plan.shape, plan.run, plan.run.world
    cols = (plan.full, plan.lora)
    out = [
        f"{s.name}: {s.param_count:,} params, {s.layers} layers, hidden {s.hidden}, "
        f"{s.heads} heads ({s.kv_heads} kv), vocab {s.vocab}",
        f"{w} ranks = {r.nodes} nodes x {r.gpus_per_node}; {r.base_dtype} base; seq "
        f"{r.seq_len or s.seq_len} x micro-batch {r.micro_batch}; checkpointing "
        f"{'on' if r.checkpointing else 'off'}; {r.device} overhead "
        f"{plan.full.items['framework overhead'] / GIB:.2f} GiB",
        "",
        f"{'GiB':<26}{'full/GPU':>11}{'LoRA/GPU':>11}{'full total':>13}{'LoRA total':>13}",
    ]
    rows = [(k, [m.items.get(k, 0.0) for m in cols]) for k in ITEMS]
    host = [k for k in ITEMS if any(k in m.offloaded for m in cols)]
    rows += [(f"{k} (host)", [m.offloaded.get(k, 0.0) for m in cols]) for k in host]
    rows.append((f"TOTAL per {'GPU' if r.device == 'gpu' else 'rank'}", [m.per_gpu for m in cols]))
    for name, (f, lo) in rows:
        gib = [f / GIB, lo / GIB, f * w / GIB, lo * w / GIB]
        out.append(
            f"{name:<26}"
            + "".join(f"{v:>{n}.2f}" for v, n in zip(gib, (11, 11, 13, 13), strict=True))
        )
    verdict = ["fits" if plan.fits(m) else "does NOT fit" for m in cols]
    out += [
        f"verdict ({r.gpu_gib:g} GiB per GPU): full FT {verdict[0]}, LoRA {verdict[1]}",
        f"trainable params: full {s.param_count:,}, LoRA {plan.lora_params:,}",
        f"adapter (r={r.lora_r}, {r.lora_dtype or r.base_dtype}): {plan.adapter_bytes:,} bytes "
        f"= {plan.adapter_bytes / 1e6:.3g} MB = {plan.adapter_bytes / 2**20:.3g} MiB",
        f"LoRA / full per GPU and in total: {plan.lora.per_gpu / plan.full.per_gpu:.3f}",
    ]
    return "\n".join(out + [f"note: {n}" for n in plan.notes])


def comm_plan(plan: MemoryPlan, links: Links, micro_batch: int | None = None) -> CommPlan:
    """The communication plan of `plan`'s LoRA run (at another micro-batch if given)."""
    run = (
        plan.run if micro_batch is None else dataclasses.replace(plan.run, micro_batch=micro_batch)
    )
    buffers = plan.run.buffers
    reuse = buffers.stage3_max_reuse_distance
    if "stage3_max_reuse_distance" in buffers.auto:  # sized from the model, as the trainer does
        reuse = layer_numel(plan.shape, run.tp) + plan.lora_params // plan.shape.layers
    return plan_comm(plan.shape, layout_for(plan.shape, run, run.global_batch, reuse), links)


def format_comm(plan: MemoryPlan, comm: CommPlan) -> str:
    """The communication section: traffic per GPU and step, the two floors, the balance."""
    lay, links = comm.layout, comm.links
    gb = lambda b: f"{b / 1e9:,.1f} GB"  # noqa: E731
    where = "across nodes" if lay.dp > lay.dp_per_node else "inside one node"
    hpz = f", hpZ {lay.hpz}" if lay.hpz > 1 and lay.tp == 1 else ""
    out = [
        "",
        f"communication per step, LoRA ({plan.run.base_dtype} base, ZeRO-{lay.zero_stage}{hpz}):"
        f" TP {lay.tp} x DP {lay.dp} ({lay.dp_per_node} DP rank(s) per node, DP group {where});"
        f" {lay.micro_batches} micro-batch(es) of {lay.micro_batch} x {lay.seq_len} tokens per"
        f" DP rank (global batch {lay.global_batch})",
        f"  base all-gather per micro-batch: forward {comm.forward_elements:,} + backward "
        f"{comm.backward_elements:,} elements of this rank's TP slice"
        + (" (DP 1: held whole, nothing moves)" if lay.dp == 1 else ""),
        f"  received per GPU per step: all-gather {gb(comm.gather_inside_bytes)} inside the node"
        f" + {gb(comm.gather_across_bytes)} across nodes, then {gb(comm.persistent_gather_bytes)}"
        f" of LoRA factors and small tensors after the step; LoRA gradients"
        f" {gb(comm.lora_reduce_bytes)}; TP all-reduce {gb(comm.tp_bytes)}",
        f"  time floor per step: communication {comm.comm_seconds:,.2f} s (NVLink "
        f"{links.nvlink_gbs:g} GB/s, InfiniBand {links.ib_gbs:g} GB/s per GPU) vs compute "
        f"{comm.compute_seconds:,.2f} s ({links.gpu_tflops:g} TFLOP/s): bound by {comm.bound}",
    ]
    balance = comm.balanced_micro_batch
    if comm.gather_seconds_per_micro == 0:
        out.append("  no base all-gathers: the micro-batch trades only memory against speed")
    elif math.isinf(balance):
        out.append("  TP all-reduces alone outlast the compute: no micro-batch balances them")
    else:
        need = max(1, math.ceil(balance))
        bigger = plan_memory(plan.shape, dataclasses.replace(plan.run, micro_batch=need))
        fits = "fits" if bigger.fits(bigger.lora) else "does NOT fit"
        out.append(
            f"  balanced micro-batch: {balance:.2f} (gathers {comm.gather_seconds_per_micro:.3f} s"
            f" per micro-batch vs {comm.compute_seconds_per_sequence:.3f} s of compute per "
            f"sequence); at {need} LoRA needs {bigger.lora.per_gpu / GIB:.1f} GiB per GPU "
            f"({fits} in {plan.run.gpu_gib:g})"
        )
    out += [f"  note: {n}" for n in comm.notes]
    return "\n".join(out)


def run(opts: PlanOptions) -> int:
    plan = plan_memory(*run_settings(opts))
    links = Links(opts.nvlink_gbs, opts.ib_gbs, opts.gpu_tflops)
    comm = comm_plan(plan, links)
    if opts.json:
        out = plan.to_dict()
        out["comm"] = dataclasses.asdict(comm) | {
            "bound": comm.bound,
            "balanced_micro_batch": comm.balanced_micro_batch,
        }
        print(json.dumps(out, indent=2))
    else:
        print(format_plan(plan) + "\n" + format_comm(plan, comm))
    return 0
