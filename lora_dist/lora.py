"""The LoRA layer and its merge math: h = W0·x + s·B·A·x, nothing distributed.

A frozen linear map W0 (out x in) gets a trainable low-rank update B·A with A (r x in) and
B (out x r). The scale s is alpha/r, or alpha/sqrt(r) with rsLoRA (Kalajdzievski 2023).
A starts Kaiming-uniform or Gaussian and B starts at zero, so a fresh adapter changes no
output bit. Merging folds s·B·A into W0 so inference costs nothing extra; unmerging takes it
out again. Nothing here merges as a side effect of train() or eval().

This module never imports torch.distributed or deepspeed: sharded weights are gathered by the
caller (see lora_dist.distributed.zero) before merge() or unmerge() touch them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from lora_dist.errors import ConfigError

InitKind = Literal["kaiming", "gaussian"]


@dataclass
class LoraConfig:
    """Hyperparameters of a LoRA adapter, validated on construction."""

    r: int = 8
    """Rank of the update B·A."""
    alpha: float = 16.0
    """Numerator of the scale: s = alpha / r (or alpha / sqrt(r) with rsLoRA)."""
    dropout: float = 0.0
    """Dropout probability applied to the LoRA branch's input only."""
    targets: str | list[str] = "attn"
    """A preset (attn, attn-all, all, all-linear), module-name suffixes, or 're:<regex>'."""
    use_rslora: bool = False
    """Scale by alpha/sqrt(r) instead of alpha/r."""
    init: InitKind = "kaiming"
    """Initialisation of A: 'kaiming' (uniform, as nn.Linear) or 'gaussian' (std 1/r)."""
    lora_dtype: torch.dtype | None = None
    """dtype of A and B; None keeps the base weight's dtype (e.g. fp32 factors on a bf16 base)."""

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r < 1:
            raise ConfigError(f"LoRA rank r must be a positive integer, got {self.r!r}")
        if self.alpha <= 0:
            raise ConfigError(f"lora alpha must be positive, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora dropout must be in [0, 1), got {self.dropout!r}")
        if self.init not in ("kaiming", "gaussian"):
            raise ConfigError(f"lora init must be 'kaiming' or 'gaussian', got {self.init!r}")

    @property
    def scaling(self) -> float:
        """The factor s in h = W0·x + s·B·A·x."""
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


def weight_shape(weight: torch.Tensor) -> torch.Size:
    """A weight's logical shape, also when ZeRO-3 has partitioned it to an empty placeholder."""
    return getattr(weight, "ds_shape", weight.shape)


def linear_dims(base: nn.Module) -> tuple[int, int, bool]:
    """(in_features, out_features, fan_in_fan_out) of a linear-like module.

    GPT-2's Conv1D stores its weight transposed (in x out), which is what fan_in_fan_out means.
    """
    out_dim, in_dim = weight_shape(base.weight)
    if isinstance(base, Conv1D):
        return out_dim, in_dim, True  # weight is (in, out)
    return in_dim, out_dim, False


class LoraLinear(nn.Module):
    """Wraps a frozen linear map: h = W0·x + s·B·A·dropout(x), with A random and B zero at init.

    `base_layer` is the original module (nn.Linear, GPT-2 Conv1D, or a tensor-parallel linear),
    kept as it is so its weight stays sharded by whoever sharded it. `lora_A` is r x in and
    `lora_B` is out x r, the orientation PEFT saves, whatever the base weight's layout.
    """

    def __init__(self, base: nn.Module, config: LoraConfig) -> None:
        super().__init__()
        in_dim, out_dim, self.fan_in_fan_out = linear_dims(base)
        self.base_layer = base
        self.r = config.r
        self.scaling = config.scaling
        self.merged = False
        device = base.weight.device
        dtype = config.lora_dtype or base.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(config.r, in_dim, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_dim, config.r, device=device, dtype=dtype))
        self.lora_dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        with torch.no_grad():
            if config.init == "kaiming":  # the same bound nn.Linear uses for its own weight
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            else:
                nn.init.normal_(self.lora_A, std=1.0 / config.r)

    @property
    def weight(self) -> torch.Tensor:
        """The base weight, so code that inspects `module.weight` keeps working."""
        return self.base_layer.weight

    def lora_delta(self, x: torch.Tensor) -> torch.Tensor:
        """s·B·A·dropout(x), computed in the factors' dtype (fp32 factors on a bf16 base)."""
        a = self.lora_A
        return F.linear(F.linear(self.lora_dropout(x).to(a.dtype), a), self.lora_B) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.merged:
            if self.training and torch.is_grad_enabled():
                raise RuntimeError(
                    "this LoRA layer is merged into its base weight; training it would update "
                    "nothing. Call unmerge_lora(model) before training."
                )
            return out
        return self.add_delta(out, x)

    def add_delta(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The base output plus this layer's update, placed where the update belongs."""
        return out + self.lora_delta(x).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """s·B·A laid out like the base weight (transposed for fan_in_fan_out bases)."""
        delta = (self.lora_B.float() @ self.lora_A.float()) * self.scaling
        return delta.T if self.fan_in_fan_out else delta

    def merge(self) -> None:
        """W0 <- W0 + s·B·A in place. Idempotent; refuses to write non-finite values."""
        if self.merged:
            return
        weight = self.base_layer.weight
        merged = weight.float() + self.delta_weight().to(weight.device)
        if not torch.isfinite(merged).all():
            raise ValueError("merging would write NaN or Inf into the base weight; not merged")
        with torch.no_grad():
            weight.copy_(merged.to(weight.dtype))
        self.merged = True

    def unmerge(self) -> None:
        """W0 <- W0 - s·B·A in place, restoring the base weight to float tolerance."""
        if not self.merged:
            return
        weight = self.base_layer.weight
        with torch.no_grad():
            weight.copy_((weight.float() - self.delta_weight().to(weight.device)).to(weight.dtype))
        self.merged = False

    def export_factors(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Whole (gathered) factors -> the lora_A, lora_B that PEFT's file holds: the same here.

        Layers whose factors are stored in another form (lora_fused.FusedSliceLora) convert.
        """
        return a, b

    def import_factors(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The inverse of export_factors."""
        return a, b

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}, merged={self.merged}"


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    """Every LoRA layer in `model`, keyed by the module path of the layer it wraps."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def merge_lora(model: nn.Module) -> None:
    """Fold every LoRA update into its base weight (weights must be whole, not sharded)."""
    for layer in lora_layers(model).values():
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Take every merged LoRA update back out of its base weight."""
    for layer in lora_layers(model).values():
        layer.unmerge()


def merge_weight(
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    fan_in_fan_out: bool = False,
) -> torch.Tensor:
    """Pure merge of one weight: returns W0 + s·B·A in W0's dtype, for state-dict export."""
    delta = (lora_b.float() @ lora_a.float()) * scaling
    if fan_in_fan_out:
        delta = delta.T
    if delta.shape != weight.shape:
        raise ValueError(
            f"LoRA update has shape {tuple(delta.shape)}, weight {tuple(weight.shape)}"
        )
    merged = weight.float() + delta
    if not torch.isfinite(merged).all():
        raise ValueError("merging would write NaN or Inf into the weight")
    return merged.to(weight.dtype)


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every LoRA layer and put its base module back: the result is the bare base model."""
    for path, layer in lora_layers(model).items():
        layer.merge()
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, child, layer.base_layer)
    return model
