"""Tensor parallelism with LoRA: DeepSpeed AutoTP shards the base, LoRA factors stay whole.

Order of setup: load the base under zero.Init with `zero_init_config(cfg)` (plain ZeRO-3; with
TP in the config both zero.Init's batch check and transformers' ZeRO-3 loader refuse), then
`mpu = shard_base_for_tp(model, cfg)`, then `inject_lora_tp(model, lora)`, then
`deepspeed.initialize(..., mpu=mpu)`.

1. AutoTP must see the bare base. Run inside `deepspeed.initialize` on a LoRA-wrapped model, it
   matches `...q_proj` by name, finds the LoraLinear's `weight` property and replaces the whole
   wrapper by a `LinearLayer`, dropping the factors. So we run the engine's own AutoTP pass
   (`DeepSpeedEngine._apply_autotp_partitioning`, the HF tp_plan / heuristic path) before
   injection. It gathers each ZeRO-3 partitioned weight once and keeps this rank's TP slice; we
   run it inside zero.Init over the data-parallel group, so each slice is partitioned over DP as
   its layer is built (the setup peak stays near one layer, not 1/TP of the base). It marks the
   model `ds_autotp_parsed`, so the engine later skips its own pass. GPT-2, which
   AutoTP refuses, is split by heads by our own pass instead (lora_dist.distributed.tp_fused,
   which also holds the slice LoRA for fused QKV shards).
2. DeepSpeed builds its batch-size check before it creates the TP groups, so without an `mpu`
   it takes world size for data-parallel size. Passing `deepspeed.utils.groups` (whose TP/DP
   mesh we created here; ranks r and r+1 share a TP group, so dp_rank = rank // tp) fixes that.

LoRA math on a TP base (x: b·s tokens, r: rank, TP peers hold identical A and B):

- Column-parallel base (`LinearLayer`: q, k, v, gate, up; rank owns output rows R):
  u = A·x on every rank, delta_R = s·B[R]·u. Backward: du is partial (only rows R), so it is
  all-reduced over TP (b·s·r values); dB is zero outside R, so B's grad is all-reduced over TP
  (out·r values). dA = du·xᵀ is then whole and identical on every rank.
- Row-parallel base (`LinearAllreduce`: o, down; rank owns input columns C):
  u = all-reduce_TP(A[:, C]·x_C) (b·s·r values in forward), delta = s·B·u added after the base's
  own all-reduce, so it is counted once. dB is whole and identical; dA is zero outside C, so A's
  grad is all-reduced over TP (r·in values).
- A column base that gathers its output (`gather_output`, e.g. lm_head) behaves like an
  ordinary linear: plain LoRA, no communication.

Per LoRA layer and micro-batch that is one b·s·r activation all-reduce plus one factor-gradient
all-reduce (out·r or r·in): tiny next to the base's b·s·hidden all-reduces.
"""

from __future__ import annotations

import contextlib
import copy
import os
import types
from typing import Any

import deepspeed
import deepspeed.comm as dist
import torch
import torch.nn.functional as F
from deepspeed.accelerator import get_accelerator
from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO
from deepspeed.module_inject.layers import (
    ColumnParallel,
    LinearAllreduce,
    LinearLayer,
    RowParallel,
    ScatterToTensorParallelRegion,
    collect_autotp_universal_checkpoint_info,
    configure_tensor_parallel_runtime,
    set_autotp_mode,
)
from deepspeed.runtime.engine import DeepSpeedEngine
from deepspeed.runtime.tensor_parallel import get_tensor_parallel_config
from deepspeed.utils import groups
from torch import nn

from lora_dist.distributed.ds_config import tp_size
from lora_dist.distributed.tp_fused import (
    Conv1DColumnParallel,
    Conv1DRowParallel,
    own_row_parallel_outputs,
    refuse_unsupported_autotp,
    shard_gpt2,
    tp_slice_factory,
)
from lora_dist.distributed.zero import gathered, zero_stage
from lora_dist.inject import LINEAR_TYPES, InjectionReport, inject_lora
from lora_dist.lora import LoraConfig, LoraLinear, lora_layers


def _tp_classes() -> tuple[type[nn.Module], type[nn.Module]]:
    return LinearLayer, LinearAllreduce


def register_tp_linear_types() -> None:
    """Let inject_lora find AutoTP's linears (LinearLayer, LinearAllreduce) as LoRA targets."""
    for cls in _tp_classes():
        if cls not in LINEAR_TYPES:
            LINEAR_TYPES.append(cls)


def tp_groups(tp: int):
    """Create (once) DeepSpeed's DP x TP mesh and return `deepspeed.utils.groups` as the mpu.

    The mesh is (dp, tp) with TP innermost: global rank = dp_rank * tp + tp_rank.
    """
    set_autotp_mode(training=True)
    groups._init_tp_mesh_device(tensor_model_parallel_size=tp)
    return groups


def zero_init_config(ds_config: dict[str, Any]) -> dict[str, Any]:
    """The config for loading the base under zero.Init: plain ZeRO-3, TP comes afterwards.

    With TP in it, loading fails twice over: zero.Init checks the batch layout against the
    world size (it knows no TP groups yet), and transformers refuses TP configs in its ZeRO-3
    loader. Loading needs neither, so we drop TP and the derived batch sizes (keeping the
    micro-batch); shard_base_for_tp applies TP to the loaded partitions.
    """
    if tp_size(ds_config) <= 1:
        return ds_config
    cfg = copy.deepcopy(ds_config)
    for key in ("tensor_parallel", "train_batch_size", "gradient_accumulation_steps"):
        cfg.pop(key, None)
    return cfg


def shard_base_for_tp(model: nn.Module, ds_config: dict[str, Any]) -> Any:
    """Apply DeepSpeed AutoTP to the bare base model; returns the mpu for deepspeed.initialize.

    Returns None (and does nothing) when the config asks for no tensor parallelism.
    """
    tp = tp_size(ds_config)
    if tp <= 1:
        return None
    groups = tp_groups(tp)
    register_tp_linear_types()
    if getattr(getattr(model, "config", None), "model_type", None) == "gpt2":
        shard_gpt2(model, groups.get_tensor_model_parallel_group())  # AutoTP refuses GPT-2
        return groups
    refuse_unsupported_autotp(getattr(model, "config", None))
    tp_config = get_tensor_parallel_config(ds_config)
    configure_tensor_parallel_runtime(tp_config)
    # The engine's pass reads only these four members of the engine; nothing else is faked.
    engine_view = types.SimpleNamespace(
        autotp_size=lambda: tp,
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        is_deepcompile_enabled=lambda: False,
        compile_autotp=lambda: False,
    )
    with partitioned_over_dp(ds_config, groups):
        DeepSpeedEngine._apply_autotp_partitioning(engine_view, model, tp_config)
    own_row_parallel_outputs(model)
    return groups


def partitioned_over_dp(ds_config: dict[str, Any], mpu: Any) -> contextlib.AbstractContextManager:
    """A zero.Init context: every module built inside has its parameters ZeRO-3 partitioned
    over the data-parallel group when its constructor returns (AutoTP's sliced linears). Below
    ZeRO-3 nothing is partitioned, so it does nothing."""
    if zero_stage(ds_config) < 3:
        return contextlib.nullcontext()
    return deepspeed.zero.Init(
        config_dict_or_path=zero_init_config(ds_config),
        data_parallel_group=mpu.get_data_parallel_group(),
    )


def inject_lora_tp(model: nn.Module, config: LoraConfig) -> InjectionReport:
    """inject_lora with TP-aware layers; keeps AutoTP's checkpoint metadata true afterwards."""
    report = inject_lora(model, config, tp_lora_factory, tp_slice_factory)
    if getattr(model, "ds_autotp_parsed", False):
        # AutoTP recorded parameter names before LoRA moved q_proj.weight to q_proj.base_layer.
        setattr(model, UNIVERSAL_CHECKPOINT_INFO, collect_autotp_universal_checkpoint_info(model))
    return report


class _LogicalShape(nn.Module):
    """Stands in for a TP-sharded base while LoraLinear sizes its factors to the full shape."""

    def __init__(self, weight: torch.Tensor, shape: tuple[int, int]) -> None:
        super().__init__()
        self.weight = torch.empty(0, dtype=weight.dtype, device=weight.device)
        self.weight.ds_shape = torch.Size(shape)  # what lora.weight_shape honours


class _TPLoraLinear(LoraLinear):
    """LoRA on an AutoTP linear: whole, replicated A and B; only the math is sharded."""

    def __init__(self, base: nn.Module, config: LoraConfig) -> None:
        # Same factor shapes and the same RNG draws as LoRA on the unsharded linear.
        super().__init__(_LogicalShape(base.weight, base._orig_weight_shape), config)
        self.base_layer = base
        self.fan_in_fan_out = getattr(base, "fan_in_fan_out", False)  # our Conv1D shards
        self.group = base.mp_group
        self.partition_sizes = tuple(base._partition_sizes)
        self.tp_index = base.tp_index
        self.offset = sum(self.partition_sizes[: self.tp_index])
        self._sync_factors()

    @torch.no_grad()
    def _sync_factors(self) -> None:
        """TP peers draw the same A from the same seed; broadcasting makes that a guarantee."""
        src = dist.get_global_rank(self.group, 0)
        for p in (self.lora_A, self.lora_B):
            dist.broadcast(p.data, src, group=self.group)

    def local_slice(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's part of a full-size tensor along the base's sharded dimension."""
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        """s·B·A restricted to this rank's shard of the base weight (for merge/unmerge)."""
        local = self.local_slice((self.lora_B.float() @ self.lora_A.float()) * self.scaling)
        return local.T if self.fan_in_fan_out else local


class ColumnParallelLoraLinear(_TPLoraLinear):
    """LoRA on a column-parallel base: delta = s·B[rows of this rank]·A·x."""

    def local_slice(self, full: torch.Tensor) -> torch.Tensor:
        return full.narrow(0, self.offset, self.partition_sizes[self.tp_index])

    def lora_delta(self, x: torch.Tensor) -> torch.Tensor:
        if self.base_layer.gather_output:  # whole, replicated output: ordinary LoRA is exact
            return super().lora_delta(x)
        a = self.lora_A
        u = F.linear(self.lora_dropout(x).to(a.dtype), a)
        u = ColumnParallel.apply(self.group, u)  # backward: du summed over TP (b·s·r)
        # Rows of B for this rank; backward zero-pads dB and all-reduces it over TP (out·r).
        b_rows = ScatterToTensorParallelRegion.apply(
            self.group, self.lora_B.t(), self.partition_sizes, self.tp_index
        ).t()
        return F.linear(u, b_rows) * self.scaling


class RowParallelLoraLinear(_TPLoraLinear):
    """LoRA on a row-parallel base: delta = s·B·all-reduce(A[:, columns of this rank]·x_local)."""

    def local_slice(self, full: torch.Tensor) -> torch.Tensor:
        return full.narrow(1, self.offset, self.partition_sizes[self.tp_index])

    def lora_delta(self, x: torch.Tensor) -> torch.Tensor:
        # Columns of A for this rank; backward zero-pads dA and all-reduces it over TP (r·in).
        a_cols = ScatterToTensorParallelRegion.apply(
            self.group, self.lora_A, self.partition_sizes, self.tp_index
        )
        u = F.linear(self.lora_dropout(x).to(a_cols.dtype), a_cols).contiguous()
        u = RowParallel.apply(self.group, u, False)  # forward: sum over TP (b·s·r)
        return F.linear(u, self.lora_B) * self.scaling


def tp_lora_factory(base: nn.Module, config: LoraConfig) -> LoraLinear:
    """The `layer_factory` for inject_lora: a TP-aware LoRA layer for AutoTP linears."""
    column, row = _tp_classes()
    if type(base) in (row, Conv1DRowParallel):
        return RowParallelLoraLinear(base, config)
    sizes = getattr(base, "_subparam_sizes", None)  # AutoTP's fused layers: bloomtype has one
    one_block = sizes is not None and len(sizes) == 1  # i.e. one contiguous block per rank
    if type(base) is column or (isinstance(base, column) and one_block):
        return ColumnParallelLoraLinear(base, config)
    if isinstance(base, Conv1DColumnParallel) and base._partition_sizes is not None:
        return ColumnParallelLoraLinear(base, config)
    if isinstance(base, Conv1DColumnParallel):
        raise NotImplementedError(
            "an ordinary LoRA on a head-split GPT-2 c_attn is not supported under TP; target "
            "its slices ('c_attn[q,k,v]', what 'attn-all' does) or c_fc, c_proj"
        )
    if isinstance(base, (column, row)):
        raise NotImplementedError(
            f"an ordinary LoRA on {type(base).__name__} (a sub-parameter/fused AutoTP layout) "
            "is not supported; for a fused QKV target its slices ('<module>[q,v]', as the attn "
            "presets do), else plain q/k/v/o or gate/up/down projections"
        )
    return LoraLinear(base, config)


def assert_tp_replicas_identical(model: nn.Module) -> str:
    """Raise unless every TP peer holds bit-identical LoRA factors; returns a line for the log.

    One all-gather of all factors over the TP group, so call it once, e.g. before saving. The
    digest lives on this rank's accelerator device: NCCL refuses host tensors.
    """
    group = groups.get_tensor_model_parallel_group()
    mine = lora_factor_digest(model)
    peers = [torch.empty_like(mine) for _ in range(dist.get_world_size(group=group))]
    dist.all_gather(peers, mine, group=group)
    drifted = [i for i, p in enumerate(peers) if not torch.equal(p, mine)]
    if drifted:
        raise RuntimeError(f"LoRA factors differ between TP ranks {drifted} and this rank")
    return f"LoRA factors ({mine.numel():,} values) are bit-identical on all {len(peers)} TP ranks"


def lora_factor_digest(model: nn.Module) -> torch.Tensor:
    """Every LoRA factor flattened into one float64 vector on this rank's accelerator device,
    for cross-rank identity checks (a collective may take it as it is)."""
    device = torch.device(get_accelerator().current_device_name())
    factors = [p for layer in lora_layers(model).values() for p in (layer.lora_A, layer.lora_B)]
    with gathered(factors):  # whole even if ZeRO-3 partitioned them over DP
        parts = [p.detach().to(device, torch.float64).flatten() for p in factors]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64, device=device)
