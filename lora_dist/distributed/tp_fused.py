"""Tensor parallelism for fused-QKV models: GPT-2's Conv1D split by heads, slice LoRA on shards.

DeepSpeed 0.19.8's AutoTP cannot shard GPT-2. `AutoTP.tp_parser` lists 'gpt2' as unsupported
and asserts; its Conv1D route (`conv_LinearLayer`, used only by the inference injection policy
for GPT2Block) never returns the layer it builds (`_replace` falls through to a `LinearLayer`
that splits the already split weight again), splits the (in, out) weight by the in-width, and
`LinearLayer.forward` multiplies by weightᵀ, which is wrong for Conv1D's layout; and
`fused_LinearLayer` would cut c_attn as BLOOM's interleaved layout, not GPT-2's [Q | K | V].
So GPT-2 gets our own split here, keeping Conv1D's (in, out) layout:

- attn.c_attn: column-parallel by heads, each of Q, K and V cut into its heads' columns, so
  rank t holds [Q_t | K_t | V_t]; attn.split_size becomes the local width;
- attn.c_proj and mlp.c_proj: row-parallel (input rows split, output all-reduced, bias once);
- mlp.c_fc: column-parallel; embeddings, norms and the tied lm_head stay whole.

Slice LoRA on a column-parallel fused base (`TPFusedSliceLora`) keeps A = [A_q; A_v] and
B = [B_q; B_v] whole and identical on every TP rank. `local_rows` (the fused row of each output
column of this rank) decides which rows of B_q and B_v this rank applies, so the slice mask
follows the shard, whatever layout AutoTP cut. Backward: du = dL/d(A·x) is partial (only this
rank's rows), so it is all-reduced over TP (b·s·n·r values); B's gradient is zero outside this
rank's rows, so it is all-reduced too (|q|+|v| by r values). dA is then whole and identical.
"""

from __future__ import annotations

from typing import Any

import deepspeed
import deepspeed.comm as dist
import torch
from deepspeed.module_inject.layers import LinearAllreduce, LinearLayer, RowParallel
from torch import nn
from transformers.pytorch_utils import Conv1D

from lora_dist.lora import LoraConfig, LoraLinear
from lora_dist.lora_fused import FusedLayout, FusedSliceLora


class _AllReduceGrad(torch.autograd.Function):
    """Identity forward; backward sums the gradient over the TP group."""

    @staticmethod
    def forward(ctx, group, x: torch.Tensor) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return None, grad


class _SelectRows(torch.autograd.Function):
    """x[index] forward; backward scatters into zeros and sums over the TP group."""

    @staticmethod
    def forward(ctx, group, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.group, ctx.shape = group, x.shape
        ctx.save_for_backward(index)
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        full = grad.new_zeros(ctx.shape).index_add_(0, index, grad)
        dist.all_reduce(full, group=ctx.group)
        return None, full, None


# -- GPT-2's Conv1D under tensor parallelism ------------------------------------------------------
class _Conv1DShard(Conv1D):
    """A Conv1D holding one TP shard; attributes named as DeepSpeed's TP linears name them."""

    fan_in_fan_out = True  # weight stays (in, out), as Conv1D stores it

    def __init__(self, full: Conv1D, group: Any, dim: int, rows: torch.Tensor) -> None:
        nn.Module.__init__(self)
        self.mp_group = group
        self.tp_world_size = dist.get_world_size(group=group)
        self.tp_index = dist.get_rank(group=group)
        params = [p for p in (full.weight, full.bias) if hasattr(p, "ds_id")]
        with deepspeed.zero.GatheredParameters(params):  # a no-op unless ZeRO-3 partitioned
            weight, bias = full.weight.detach(), full.bias.detach()
            self._orig_weight_shape = (weight.shape[1], weight.shape[0])  # (out, in), as Linear
            self.weight = nn.Parameter(weight.index_select(dim, rows).clone(), False)
            keep_bias = bias.index_select(0, rows) if dim == 1 else bias
            self.bias = nn.Parameter(keep_bias.clone(), requires_grad=False)
        self.nx, self.nf = self.weight.shape
        self.gather_output = False


class Conv1DColumnParallel(_Conv1DShard):
    """Output columns `local_rows` of a Conv1D: y_local = x·W[:, local_rows] + b[local_rows].

    `_partition_sizes` (every rank's width) is set when each rank holds one contiguous block.
    """

    def __init__(
        self,
        full: Conv1D,
        group: Any,
        local_rows: torch.Tensor,
        partition_sizes: list[int] | None = None,
    ) -> None:
        super().__init__(full, group, 1, local_rows)
        self.local_rows = local_rows
        self._partition_sizes = tuple(partition_sizes) if partition_sizes else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _AllReduceGrad.apply(self.mp_group, x)  # each rank's dx is partial
        return super().forward(x)


class Conv1DRowParallel(_Conv1DShard):
    """Input rows of a Conv1D split over TP: y = all-reduce(x_local·W_local) + b."""

    def __init__(self, full: Conv1D, group: Any, sizes: list[int]) -> None:
        rank = dist.get_rank(group=group)
        start = sum(sizes[:rank])
        super().__init__(full, group, 0, torch.arange(start, start + sizes[rank]))
        self._partition_sizes = tuple(sizes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (*x.shape[:-1], self.nf)
        y = torch.mm(x.reshape(-1, x.shape[-1]), self.weight).view(shape)
        return RowParallel.apply(self.mp_group, y, False) + self.bias


def _even(total: int, parts: int, what: str) -> list[int]:
    if total % parts:
        raise ValueError(f"{what} ({total}) must divide by the tensor-parallel size {parts}")
    return [total // parts] * parts


def shard_gpt2(model: nn.Module, group: Any) -> None:
    """Split every GPT-2 block of `model` by heads over the TP `group` (see module docstring)."""
    tp, rank = dist.get_world_size(group=group), dist.get_rank(group=group)
    cfg = model.config
    h, heads = cfg.n_embd, cfg.n_head
    per_rank = _even(heads, tp, "n_head")[rank] * (h // heads)
    inner = cfg.n_inner or 4 * h
    mine = torch.arange(rank * per_rank, (rank + 1) * per_rank)
    qkv_rows = torch.cat([mine, h + mine, 2 * h + mine])  # this rank's heads of Q, K and V
    fc_sizes = _even(inner, tp, "the MLP width")
    fc_rows = torch.arange(rank * fc_sizes[0], (rank + 1) * fc_sizes[0])
    for block in model.transformer.h:
        attn, mlp = block.attn, block.mlp
        attn.c_attn = Conv1DColumnParallel(attn.c_attn, group, qkv_rows)
        attn.c_proj = Conv1DRowParallel(attn.c_proj, group, _even(h, tp, "n_embd"))
        attn.split_size = attn.embed_dim = per_rank
        attn.num_heads = per_rank // (h // heads)
        mlp.c_fc = Conv1DColumnParallel(mlp.c_fc, group, fc_rows, fc_sizes)
        mlp.c_proj = Conv1DRowParallel(mlp.c_proj, group, fc_sizes)
    model.ds_autotp_parsed = True  # the engine must not run AutoTP (which refuses GPT-2)


# -- slice LoRA on a column-parallel fused base ---------------------------------------------------
def column_local_rows(base: nn.Module) -> torch.Tensor | None:
    """The full-weight output row of each local output of a column-parallel base, or None.

    None means the base's output is whole on every rank (gather_output), so plain math applies.
    """
    if getattr(base, "gather_output", False):
        return None
    if isinstance(base, Conv1DColumnParallel):
        return base.local_rows
    t = base.tp_index
    sizes = getattr(base, "_subparam_sizes", None)
    if sizes is None and hasattr(base, "_subparam_layout_spec"):
        raise NotImplementedError(
            f"LoRA on {type(base).__name__}: this fused layout interleaves or replicates blocks "
            "across TP ranks and DeepSpeed records no per-sub-parameter split"
        )
    if sizes is None:  # a plain column split: one contiguous block per rank
        widths, sizes = [list(base._partition_sizes)], [sum(base._partition_sizes)]
    else:
        widths = base._subparam_shard_widths
    parts, start = [], 0
    for size, per_rank in zip(sizes, widths, strict=True):
        first = start + sum(per_rank[:t])
        parts.append(torch.arange(first, first + per_rank[t]))
        start += size
    return torch.cat(parts)


class TPFusedSliceLora(FusedSliceLora):
    """Slice LoRA on a TP shard of a fused QKV: this rank applies the slice rows it holds."""

    def __init__(
        self,
        base: nn.Module,
        config: LoraConfig,
        layout: FusedLayout,
        slices: tuple[str, ...],
        local_rows: torch.Tensor,
    ) -> None:
        # Same factor shapes and RNG draws as on the unsharded module; whole on every rank.
        super().__init__(base, config, layout, slices, local_rows)
        self.group = base.mp_group
        src = dist.get_global_rank(self.group, 0)
        with torch.no_grad():  # TP peers drew the same A from the same seed; make it certain
            for p in (self.lora_A, self.lora_B):
                dist.broadcast(p.data, src, group=self.group)

    def enter_lora_branch(self, u: torch.Tensor) -> torch.Tensor:
        return _AllReduceGrad.apply(self.group, u)

    def rows_of_b(self) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return super().rows_of_b()
        return _SelectRows.apply(self.group, self.lora_B, self.b_index)

    def slice_delta_rows(self) -> torch.Tensor:
        with torch.no_grad():  # merge arithmetic: local, no collective
            return super().slice_delta_rows()


def tp_slice_factory(
    base: nn.Module, config: LoraConfig, layout: FusedLayout, slices: tuple[str, ...]
) -> LoraLinear:
    """The `slice_factory` for inject_lora under TP: shard-aware when the base is sharded."""
    if isinstance(base, LinearAllreduce | Conv1DRowParallel):
        raise NotImplementedError(f"slices of a row-parallel {type(base).__name__}")
    if isinstance(base, LinearLayer | Conv1DColumnParallel):
        rows = column_local_rows(base)
        if rows is not None:
            return TPFusedSliceLora(base, config, layout, slices, rows)
        whole = torch.arange(layout.out_features)  # gathered output: ordinary slice math
        return FusedSliceLora(base, config, layout, slices, whole)
    return FusedSliceLora(base, config, layout, slices)


def _own_output(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
    return output.clone() if torch.is_grad_enabled() else None


def own_row_parallel_outputs(model: nn.Module) -> None:
    """Let models add in place to a bias-free row-parallel output (Falcon: `mlp_output +=`).

    DeepSpeed's `RowParallel` autograd function returns its all-reduced input as-is, which
    autograd treats as a view made inside a custom Function: an in-place add on it with grad
    enabled raises. A forward hook hands the model its own copy (one b·s·hidden copy per layer).
    """
    for module in model.modules():
        if isinstance(module, LinearAllreduce) and module.bias is None:
            module.register_forward_hook(_own_output)


def refuse_unsupported_autotp(config: Any) -> None:
    """Raise for fused-QKV models that DeepSpeed 0.19.8's AutoTP shards wrongly for training."""
    kind = getattr(config, "model_type", None)
    if kind == "bloom":
        raise ValueError(
            "tensor parallelism for BLOOM is not supported: AutoTP splits its heads but, in "
            "training, not the ALiBi biases (DeepSpeed slices them per head only in its inference "
            "engine), so attention fails on the sharded heads; use TP 1 with ZeRO-3"
        )
    if kind == "falcon" and config.multi_query and not config.new_decoder_architecture:
        raise ValueError(
            "tensor parallelism for multi-query Falcon is not supported: AutoTP cuts its fused "
            "[Q | K | V] as BLOOM's interleaved layout, and the one k and v head cannot be split; "
            "use TP 1 with ZeRO-3 (Falcon's grouped layout, as in Falcon-180B, shards by KV head)"
        )
