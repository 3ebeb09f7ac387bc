"""`lora-dist plan`: per-GPU memory of full fine-tuning vs LoRA under ZeRO and TP, before you queue.

Accounting, per rank (DP = world / TP):
- Weights: base in the base dtype, split by TP; ZeRO-3 also partitions them over DP, except the
  tensors under `stage3_param_persistence_threshold` (norms, biases), which stay whole.
- Full FT: gradients in the model dtype (DeepSpeed's default grad_accum_dtype), partitioned over
  DP from stage 2; Adam m and v plus an fp32 master copy, partitioned from stage 1.
- LoRA: the base has no gradients and no optimizer state. The factors A, B are replicated on every
  rank (over TP too). Their gradients and Adam states follow the ZeRO stage like any trainable
  parameter, i.e. they ARE partitioned over DP, because that is what DeepSpeed does.
- Fused attention (GPT-2 c_attn, NeoX/BLOOM/Falcon query_key_value, Phi-3 qkv_proj): each of
  q, k, v targeted is a slice with its own rank-r update (as loralib's MergedLinear and the
  trainer's 'attn' preset do), counted like the separate projection; "qkv" adapts the whole
  fused Linear as PEFT's target_modules=["c_attn"] does.
- Activations: Korthikanti et al. 2022 (arXiv:2205.05198), eq. 1-2: per layer
  s*b*h*(10 + 24/t + 5*a*s/(h*t)) bytes without recomputation, generalised to this model's q/k/v
  widths and gated MLPs; with full checkpointing 2*s*b*h per layer plus one layer recomputed.
  Logits add s*b*V/t * (2 + 4 + 4) bytes (16-bit logits, fp32 upcast, fp32 log-softmax).
- Offloaded items live in host memory: not counted on a GPU, but counted for --device cpu,
  where the planner is compared with a process's peak RSS.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from lora_dist.errors import ConfigError
from lora_dist.planning.comm import layer_numel
from lora_dist.planning.shapes import (
    DTYPE_BYTES,
    ModelShape,
    adapter_bytes,
    lora_param_count,
    resolve_targets,
)

# What a rank holds before any model tensor: the CUDA context, NCCL and allocator slack on a GPU,
# or the interpreter with torch/deepspeed/transformers imported (~0.37 GiB measured) plus
# DeepSpeed/gloo state on CPU. Tune these against measured runs; --overhead-gib overrides them.
FRAMEWORK_OVERHEAD_GIB: dict[str, float] = {"gpu": 2.0, "cpu": 0.6}

GIB = 1024**3
OFFLOADS = ("none", "optimizer", "param+optimizer")
# --paper: Hu et al. 2021 (Sec. 4.2) count fp16 weights plus Adam's m and v for full fine-tuning
# ("up to 2/3" saved = the optimizer state), against fp16 weights alone for LoRA.
PAPER_SETTINGS: dict[str, Any] = {"zero_stage": 3, "master_weights": False, "states_only": True}
PAPER_SETTINGS |= {"base_dtype": "fp16", "lora_dtype": "fp16", "optim_dtype": "fp16"}
PAPER_SETTINGS |= {"lora_r": 4, "targets": "q,v"}
# The rows of the plan, per rank.
ZERO3_SUB_GROUP_SIZE = 1e9  # DeepSpeed's default zero_optimization.sub_group_size
ITEMS = ("base weights", "LoRA weights", "gradients", "optimizer states", "activations")
ITEMS += ("comm buffers", "framework overhead")


# The sizes lora-dist's trainer gives ZeRO's "auto" buffers; the same rule as
# lora_dist.distributed.ds_config.zero3_budgets (tests/planning/test_comm.py holds them equal).
AUTO_SIZED = (
    "stage3_prefetch_bucket_size",
    "stage3_max_live_parameters",
    "stage3_max_reuse_distance",
    "reduce_bucket_size",
)
MAX_REDUCE_BUCKET = 500_000_000


def auto_sizes(block: int, largest: int, trainable: int) -> dict[str, int]:
    """Prefetch a block, keep two blocks and the largest tensor live, reuse within a block."""
    return {
        "stage3_prefetch_bucket_size": block,
        "stage3_max_live_parameters": 2 * block + largest,
        "stage3_max_reuse_distance": block,
        "reduce_bucket_size": max(1, min(trainable, MAX_REDUCE_BUCKET)),
    }


@dataclass
class ZeroBuffers:
    """ZeRO bucket sizes in elements; defaults are DeepSpeed 0.19.8's runtime/zero/config.py."""

    stage3_prefetch_bucket_size: int = 50_000_000
    stage3_max_live_parameters: int = 1_000_000_000
    stage3_param_persistence_threshold: int = 100_000
    reduce_bucket_size: int = 500_000_000
    allgather_bucket_size: int = 500_000_000
    stage3_max_reuse_distance: int = 1_000_000_000
    auto: list[str] = field(default_factory=list)
    """Sizes the config leaves at "auto": the trainer sizes them from the model (auto_sizes)."""

    @classmethod
    def from_ds_config(cls, zero: dict[str, Any]) -> ZeroBuffers:
        """Read the `zero_optimization` section, noting which sizes say "auto"."""
        names = [f.name for f in fields(cls) if f.name != "auto"]
        picked = {k: zero[k] for k in names if k in zero}
        auto = [k for k, v in picked.items() if v == "auto" and k in AUTO_SIZED]
        sizes = {k: int(float(v)) for k, v in picked.items() if v != "auto"}
        return cls(**sizes, auto=auto)

    def resolved(self, block: int, largest: int, trainable: int) -> ZeroBuffers:
        """These sizes with every "auto" one sized from the model, as the trainer does."""
        sizes = auto_sizes(block, largest, trainable)
        values = {k: sizes[k] for k in self.auto}
        return dataclasses.replace(self, **values, auto=[])


@dataclass
class RunSettings:
    """How a run is laid out and in what precision it trains."""

    nodes: int = 1
    gpus_per_node: int = 8
    tp: int = 1
    zero_stage: int = 3
    offload: str = "none"
    """none, optimizer, or param+optimizer (ZeRO-3 only)."""
    base_dtype: str = "bf16"
    lora_dtype: str | None = None
    """dtype of the LoRA factors on the GPU; None: the base dtype, as DeepSpeed casts the module."""
    optim_dtype: str = "fp32"
    """dtype of Adam's m and v."""
    master_weights: bool = True
    """Keep an fp32 master copy of trainable weights when training in 16-bit."""
    lora_r: int = 8
    targets: str = "attn"
    micro_batch: int = 1
    seq_len: int | None = None
    """Tokens per sequence; None: the model's context length."""
    checkpointing: bool = True
    flash_attention: bool = False
    """Attention that never stores the s*s score matrix (drops Korthikanti's 5as/h term)."""
    gpu_gib: float = 80.0
    device: str = "gpu"
    overhead_gib: float | None = None
    """None: FRAMEWORK_OVERHEAD_GIB[device]."""
    buffers: ZeroBuffers = field(default_factory=ZeroBuffers)
    hpz: int = 1
    """ZeRO++ zero_hpz_partition_size: a second partition of the base over this many ranks."""
    global_batch: int | None = None
    """Sequences per optimizer step over all ranks; None: one micro-batch per DP rank."""
    states_only: bool = False
    """Count only weights and optimizer states, as the LoRA paper's 1.2 TB vs 350 GB does."""

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    def check(self, shape: ModelShape) -> None:
        """Raise ConfigError saying which flag to change."""
        if min(self.nodes, self.gpus_per_node, self.tp, self.lora_r, self.micro_batch) < 1:
            raise ConfigError(
                "--nodes, --gpus_per_node, --tp, --lora_r and --micro_batch must be >= 1"
            )
        if self.world % self.tp:
            ok = [t for t in range(1, self.world + 1) if self.world % t == 0]
            raise ConfigError(
                f"world size {self.world} ({self.nodes} nodes x {self.gpus_per_node}"
                f" GPUs) is not divisible by --tp {self.tp}; use --tp in {ok}"
            )
        widths = {"attention heads": shape.heads, "kv heads": shape.kv_heads}
        for what, n in (widths | {"MLP width": shape.intermediate}).items():
            if n % self.tp:
                ok = [t for t in range(1, n + 1) if n % t == 0 and self.world % t == 0]
                raise ConfigError(
                    f"--tp {self.tp} does not divide the {n} {what} of {shape.name}; "
                    f"use --tp in {ok}"
                )
        if self.hpz < 1 or (self.hpz > 1 and self.gpus_per_node % self.hpz):
            raise ConfigError(
                f"--hpz {self.hpz} must divide --gpus_per_node {self.gpus_per_node}: its groups "
                "live inside a node"
            )
        if self.hpz > 1 and (self.zero_stage != 3 or self.tp != 1):
            raise ConfigError(
                "--hpz needs --zero 3 and --tp 1 (DeepSpeed groups consecutive ranks, which are "
                "TP peers when TP > 1)"
            )
        if self.global_batch is not None and self.global_batch < 1:
            raise ConfigError("--global_batch must be at least 1")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"--zero must be 0, 1, 2 or 3, not {self.zero_stage}")
        if self.offload not in OFFLOADS:
            raise ConfigError(f"--offload must be one of {OFFLOADS}, not {self.offload!r}")
        if self.offload == "param+optimizer" and self.zero_stage != 3:
            raise ConfigError("--offload param+optimizer needs --zero 3")
        if self.offload == "optimizer" and self.zero_stage == 0:
            raise ConfigError("--offload optimizer needs --zero 1, 2 or 3")
        for name in (self.base_dtype, self.lora_dtype or "fp32", self.optim_dtype):
            if name not in DTYPE_BYTES:
                raise ConfigError(f"unknown dtype {name!r}; use one of {list(DTYPE_BYTES)}")
        if self.device not in FRAMEWORK_OVERHEAD_GIB:
            raise ConfigError(f"--device must be one of {list(FRAMEWORK_OVERHEAD_GIB)}")
        if self.gpu_gib <= 0 or (self.seq_len is not None and self.seq_len < 1):
            raise ConfigError("--gpu_gib and --max_length must be positive")
        resolve_targets(shape, self.targets)


def activation_bytes(shape: ModelShape, run: RunSettings, lora_keys: Sequence[str] = ()) -> float:
    """Activations one rank keeps for backward (Korthikanti et al. 2022, generalised)."""
    s, b, h, t = run.seq_len or shape.seq_len, run.micro_batch, shape.hidden, run.tp
    scale = DTYPE_BYTES[run.base_dtype] / 2  # the paper's constants assume 16-bit activations
    proj = shape.projections
    qkv_out = sum(proj[k][1] for k in ("qkv", "q", "k", "v") if k in proj)
    mlp = (8 if shape.gated_mlp else 4) * shape.intermediate  # saved MLP inner tensors, 2 B each
    # 10sbh: norm inputs, attention and MLP inputs, dropout masks (replicated over TP); the rest
    # splits over TP. With q,k,v,o all h wide and a 4h MLP this is the paper's 34 + 5as/h.
    split = s * b * (2 * qkv_out + 2 * proj["o"][0] + mlp)
    scores = 0 if run.flash_attention else 5 * shape.heads * s * s * b
    lora = s * b * run.lora_r * 2 * len(lora_keys)  # A x, saved for B's gradient
    layer = (10 * s * b * h + (split + scores) / t + lora) * scale
    logits = s * b * shape.vocab / t * (2 * scale + 8)
    if run.checkpointing:
        return shape.layers * 2 * s * b * h * scale + layer + logits
    return shape.layers * layer + logits


@dataclass
class ModeMemory:
    """Bytes per rank by item; `offloaded` sits in host memory and is not on the GPU."""

    items: dict[str, float]
    offloaded: dict[str, float] = field(default_factory=dict)

    @property
    def per_gpu(self) -> float:
        return sum(self.items.values())


@dataclass
class MemoryPlan:
    """The plan for one model and run: full fine-tuning and LoRA side by side."""

    shape: ModelShape
    run: RunSettings
    full: ModeMemory
    lora: ModeMemory
    lora_params: int
    adapter_bytes: int
    notes: list[str] = field(default_factory=list)

    @property
    def dp(self) -> int:
        return self.run.world // self.run.tp

    def fits(self, mode: ModeMemory) -> bool:
        return mode.per_gpu <= self.run.gpu_gib * GIB

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; the derived totals are extra keys that `from_dict` ignores."""
        out = asdict(self)
        out["shape"]["biased"] = sorted(self.shape.biased)
        out["shape"]["param_count"] = self.shape.param_count
        for name in ("full", "lora"):
            mode = getattr(self, name)
            per_gpu, total = mode.per_gpu / GIB, mode.per_gpu * self.run.world / GIB
            out[name] |= {"per_gpu_gib": per_gpu, "cluster_gib": total, "fits": self.fits(mode)}
        out["ratio_lora_over_full"] = self.lora.per_gpu / self.full.per_gpu
        out["adapter_mb"], out["adapter_mib"] = self.adapter_bytes / 1e6, self.adapter_bytes / 2**20
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MemoryPlan:
        sd = {k: v for k, v in d["shape"].items() if k != "param_count"}
        sd["projections"] = {k: tuple(v) for k, v in sd["projections"].items()}
        shape = ModelShape(**(sd | {"biased": frozenset(sd["biased"])}))
        run = RunSettings(**(d["run"] | {"buffers": ZeroBuffers(**d["run"]["buffers"])}))
        modes = [ModeMemory(d[m]["items"], d[m]["offloaded"]) for m in ("full", "lora")]
        return cls(shape, run, *modes, d["lora_params"], d["adapter_bytes"], d["notes"])


def plan_memory(shape: ModelShape, run: RunSettings) -> MemoryPlan:
    """Itemise per-rank memory for full fine-tuning and for LoRA; ConfigError on bad input."""
    run.check(shape)
    t, dp, stage, buf = run.tp, run.world // run.tp, run.zero_stage, run.buffers
    wb, ob = DTYPE_BYTES[run.base_dtype], DTYPE_BYTES[run.optim_dtype]
    lora_dtype = run.lora_dtype or run.base_dtype
    lb = DTYPE_BYTES[lora_dtype]
    rank_tensors = [(n / t if split else n, count) for n, count, split in shape.tensors()]
    n_rank = sum(n * c for n, c in rank_tensors)  # base params on one TP rank
    largest = max(n for n, _ in rank_tensors)
    small = sum(n * c for n, c in rank_tensors if n < buf.stage3_param_persistence_threshold)
    persistent = small if stage == 3 else 0
    sharded = (n_rank - persistent) / (dp if stage == 3 else 1)
    keys = resolve_targets(shape, run.targets)
    n_lora = lora_param_count(shape, run.lora_r, keys)
    # "auto" sizes as the trainer resolves them: its block holds the layer's LoRA factors too.
    block = layer_numel(shape, t)
    buffers = {
        "full": buf.resolved(block, int(largest), int(n_rank)),
        "lora": buf.resolved(block + n_lora // shape.layers, int(largest), n_lora),
    }
    on_host = run.device == "cpu"  # host memory is the same RSS the CPU run is measured by

    def place(mode: ModeMemory, item: str, nbytes: float, offloaded: bool) -> None:
        to = mode.offloaded if offloaded and not on_host else mode.items
        to[item] = to.get(item, 0.0) + nbytes

    def trainable(mode: ModeMemory, n: float, dtype_bytes: int) -> None:
        """Gradients and Adam states for `n` trainable params held in `dtype_bytes`."""
        off = run.offload != "none"
        grads = n / (dp if stage >= 2 else 1)
        if not run.states_only:  # ZeRO-Offload keeps the gradient partition in fp32 on the host
            place(mode, "gradients", grads * (4 if off and stage >= 2 else dtype_bytes), off)
        master = 4 if run.master_weights and dtype_bytes < 4 else 0
        place(mode, "optimizer states", n / (dp if stage >= 1 else 1) * (2 * ob + master), off)
        if stage == 3 and dtype_bytes < 4 and not run.states_only and not off:
            # At the step ZeRO-3 upcasts each sub-group's gradient partition to fp32
            # (stage3.py _prepare_fp32_grad_for_sub_group); sub_group_size defaults to 1e9.
            place(mode, "gradients", min(grads, ZERO3_SUB_GROUP_SIZE) * 4, False)

    full, lora = ModeMemory({}), ModeMemory({})
    overhead = FRAMEWORK_OVERHEAD_GIB[run.device] if run.overhead_gib is None else run.overhead_gib
    for mode, keys_used in ((full, ()), (lora, keys)):
        for item in ITEMS:
            mode.items[item] = 0.0
        param_off = run.offload == "param+optimizer"
        place(mode, "base weights", persistent * wb, False)
        place(mode, "base weights", sharded * wb, param_off)
        if run.hpz > 1:  # ZeRO++'s second partition of the base, over the hpZ group
            place(mode, "base weights", (n_rank - persistent) / run.hpz * wb, False)
        if run.states_only:
            continue
        mode.items["activations"] = activation_bytes(shape, run, keys_used)
        mode.items["framework overhead"] = overhead * GIB
        if stage == 3:  # gathered layers: the module in use plus the prefetch bucket, capped
            b = buffers["lora" if keys_used else "full"]
            cap = max(b.stage3_max_live_parameters, largest)
            live = min(b.stage3_prefetch_bucket_size + largest, cap, n_rank)
            mode.items["comm buffers"] = live * wb
    place(lora, "LoRA weights", n_lora * lb, False)
    trainable(full, n_rank, wb)
    trainable(lora, n_lora, lb)
    if not run.states_only:
        for mode, n, nb, b in (
            (full, n_rank, wb, buffers["full"]),
            (lora, n_lora, lb, buffers["lora"]),
        ):
            # DeepSpeed allocates the reduce bucket whole on a GPU; on CPU only touched pages count.
            bucket = b.reduce_bucket_size if not on_host else min(b.reduce_bucket_size, n)
            gather = min(buf.allgather_bucket_size, n) if stage in (1, 2) else 0
            mode.items["comm buffers"] += (bucket + gather) * nb
        if stage == 3:  # a gathered layer's full gradient exists until it is reduce-scattered
            full.items["comm buffers"] += largest * wb

    size = adapter_bytes(shape, run.lora_r, keys, lora_dtype)
    plan = MemoryPlan(shape, run, full, lora, n_lora, size)
    plan.notes.append(
        f"world {run.world} = TP {t} x DP {dp}; ZeRO-{stage}, offload {run.offload}; LoRA on "
        f"{','.join(keys)} (r={run.lora_r}), replicated, its grads and Adam states split per ZeRO"
    )
    if run.states_only:
        plan.notes.append(_paper_note(plan))
    return plan


def _paper_note(plan: MemoryPlan) -> str:
    """Why --paper's numbers are what they are, next to Hu et al.'s 1.2 TB and 350 GB."""
    full, lora = (m.per_gpu * plan.run.world for m in (plan.full, plan.lora))
    grad = plan.shape.param_count * DTYPE_BYTES[plan.run.base_dtype]
    return (
        f"states only (Hu et al. 2021, Sec. 4.2 accounting): {plan.run.base_dtype} weights + Adam "
        f"m,v in {plan.run.optim_dtype}, no master copy; gradients, activations, buffers and "
        f"overhead left out. Cluster: full {full / 1e12:.2f} TB vs LoRA {lora / 1e9:.0f} GB "
        f"(paper: 1.2 TB vs 350 GB; a whole {plan.run.base_dtype} gradient would add "
        f"{grad / 1e12:.2f} TB, so the paper's measured 1.2 TB lies between)"
    )


def ds_overrides(path: str | None) -> tuple[dict[str, Any], ZeroBuffers]:
    """Run fields a DeepSpeed JSON pins down (flags still win), and its ZeRO bucket sizes."""
    if path is None:
        return {}, ZeroBuffers()
    try:
        ds = json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"DeepSpeed config {path} is not valid JSON: {exc.msg} at line {exc.lineno}"
        ) from None
    zero, out = ds.get("zero_optimization", {}), {}
    if isinstance(zero.get("stage"), int):
        out["zero_stage"] = zero["stage"]
    on = [
        zero.get(k, {}).get("device") in ("cpu", "nvme")
        for k in ("offload_optimizer", "offload_param")
    ]
    out["offload"] = "param+optimizer" if on[1] else ("optimizer" if on[0] else "none")
    for name in ("bf16", "fp16"):
        if ds.get(name, {}).get("enabled") is True:
            out["base_dtype"] = name
    if isinstance(ds.get("train_micro_batch_size_per_gpu"), int):
        out["micro_batch"] = ds["train_micro_batch_size_per_gpu"]
    if isinstance(ds.get("train_batch_size"), int):
        out["global_batch"] = ds["train_batch_size"]
    if isinstance(zero.get("zero_hpz_partition_size"), int):
        out["hpz"] = zero["zero_hpz_partition_size"]
    return out, ZeroBuffers.from_ds_config(zero)
