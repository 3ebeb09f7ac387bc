"""ZeRO-3 concerns: gathering sharded parameters, keeping LoRA factors whole, counting shards."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import deepspeed
import torch
from torch import nn

from lora_dist.adapter import peft_key
from lora_dist.lora import lora_layers


def is_zero3_param(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id")


@contextlib.contextmanager
def gathered(params: Iterable[torch.Tensor], modifier_rank: int | None = None) -> Iterator[None]:
    """Make ZeRO-3 partitioned `params` whole inside the block; a no-op for ordinary tensors.

    With `modifier_rank`, that rank's edits are broadcast to every rank on exit.
    """
    params = [p for p in params if is_zero3_param(p)]
    if not params:
        yield
        return
    with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
        yield


def gather_lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA factors under PEFT key names and in PEFT's form, whole, on the CPU, on every rank.

    Only the LoRA factors are gathered, never the base: under ZeRO-3 they are persistent
    (never partitioned away after the first forward), so this costs at most one small
    all-gather per factor.
    """
    state: dict[str, torch.Tensor] = {}
    for path, layer in lora_layers(model).items():
        whole = []
        for param in (layer.lora_A, layer.lora_B):
            with gathered([param]):
                whole.append(param.detach().float().cpu().clone())
        a, b = layer.export_factors(*whole)  # PEFT's form (slice layers convert)
        state[peft_key(path, "lora_A")], state[peft_key(path, "lora_B")] = a, b
    return state


def lora_persistence_threshold(model: nn.Module) -> int:
    """The largest LoRA factor's element count: ZeRO-3 keeps parameters up to it whole.

    Setting `stage3_param_persistence_threshold` to this keeps every LoRA factor replicated
    and unpartitioned while partitioning every base weight that is larger.
    """
    sizes = [p.numel() for layer in lora_layers(model).values() for p in layer.parameters()]
    sizes = [s for s in sizes if s > 0]
    return max(sizes, default=0)


def local_param_numel(model: nn.Module) -> tuple[int, int]:
    """(elements this rank stores, elements of the whole model) over all parameters.

    Under ZeRO-3 a rank stores its partition `ds_tensor`; otherwise it stores everything.
    """
    local = total = 0
    for p in model.parameters():
        if is_zero3_param(p):
            local += p.ds_tensor.numel()
            total += p.ds_numel
        else:
            local += p.numel()
            total += p.numel()
    return local, total


def frozen_local_numel(model: nn.Module) -> int:
    """Elements of frozen (base) parameters that this rank stores."""
    n = 0
    for p in model.parameters():
        if not p.requires_grad:
            n += p.ds_tensor.numel() if is_zero3_param(p) else p.numel()
    return n


def _bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if torch.is_tensor(t) and t.numel() and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def model_state_bytes(engine) -> dict[str, int]:
    """Bytes of model states this rank holds, counted from the engine's own tensors.

    params: the rank's (partitioned) working weights; master: fp32 master partitions;
    optimizer: optimizer state tensors (Adam moments); gradients: gradient partitions.
    """
    module = engine.module
    params = _bytes(p.ds_tensor if is_zero3_param(p) else p for p in module.parameters())
    zero = engine.optimizer
    inner = getattr(zero, "optimizer", zero)
    master_lists = [
        getattr(zero, a, None) or []
        for a in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups")
    ]
    masters = [t for lst in master_lists for t in lst]
    optim = _bytes(v for state in inner.state.values() for v in state.values())
    flat_grads = getattr(zero, "grad_partitions_flat_buffer", None)
    if torch.is_tensor(flat_grads):  # ZeRO-3 keeps this rank's gradient partitions in one buffer
        grads = _bytes([flat_grads])
    else:
        grads = _bytes(p.grad for p in module.parameters() if p.grad is not None)
    out = {"params": params, "master": _bytes(masters), "optimizer": optim, "gradients": grads}
    out["total"] = sum(out.values())
    return out


def gathered_sizes(model: nn.Module) -> tuple[int, int]:
    """(elements of the largest repeated block, elements of the largest tensor) as one rank
    gathers them under ZeRO-3, i.e. after tensor parallelism sliced the weights.

    The repeated blocks are the children of the model's largest `nn.ModuleList` (a decoder's
    layers); a model without one counts as a single block.
    """

    def numel(p: torch.Tensor) -> int:
        return int(getattr(p, "ds_numel", p.numel()))

    largest = max((numel(p) for p in model.parameters()), default=0)
    blocks = [
        sum(numel(p) for p in child.parameters())
        for lst in model.modules()
        if isinstance(lst, nn.ModuleList)
        for child in lst
    ]
    total = sum(numel(p) for p in model.parameters())
    return (max(blocks) if blocks else total), largest


def zero_stage(ds_config: dict[str, Any]) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def merge_sharded(model: nn.Module) -> int:
    """Merge every LoRA layer, gathering each ZeRO-3 base weight whole while it is written.

    Every rank merges the same whole tensors; rank 0's result is what gets re-partitioned.
    Returns the number of merged layers.
    """
    layers = lora_layers(model)
    for layer in layers.values():
        with gathered([layer.base_layer.weight, layer.lora_A, layer.lora_B], modifier_rank=0):
            layer.merge()
    return len(layers)
