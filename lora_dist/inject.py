"""Putting LoRA into a model: resolving targets, injection, freezing, counts."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn
from transformers.pytorch_utils import Conv1D

from lora_dist.errors import ConfigError
from lora_dist.lora import LoraConfig, LoraLinear
from lora_dist.lora_fused import (
    FUSED_QKV_MODULE,
    FusedLayout,
    FusedSliceLora,
    fused_layout,
    parse_target,
)
from lora_dist.targets import PRESET_NAMES as PRESET_NAMES  # re-exported
from lora_dist.targets import PROJECTION_NAMES, TARGET_PRESETS, preset_modules

_MLP_ROLES = ("gate", "up", "gate_up", "down", "fc_in", "fc_out")
# The target presets live in lora_dist.targets (one table for the trainer and the planner); this
# is the same table by model_type and role group, for code that wants module names directly.
PRESETS: dict[str, dict[str, list[str]]] = {
    model_type: {
        "attn": preset_modules("attn", model_type),
        "attn-all": preset_modules("attn-all", model_type),
        "mlp": [n for r, n in names.items() if r in _MLP_ROLES],
    }
    for model_type, names in PROJECTION_NAMES.items()
}

# Modules that LoRA can wrap. The distributed package registers tensor-parallel linears here.
LINEAR_TYPES: list[type[nn.Module]] = [nn.Linear, Conv1D]


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, tuple(LINEAR_TYPES)) and not isinstance(module, LoraLinear)


@dataclass
class InjectionReport:
    """What injection did, for logs and metrics."""

    layers: dict[str, LoraLinear]
    """The LoRA layers, keyed by the path of the module each one wraps."""
    target_modules: list[str] | str
    """The targets: suffixes ('<fused module>[q,v]' for slices, which the adapter file states
    as PEFT's target_modules plus rank/alpha patterns), or a regex."""
    trainable_params: int
    total_params: int

    def summary(self) -> str:
        pct = 100.0 * self.trainable_params / max(self.total_params, 1)
        return (
            f"LoRA on {len(self.layers)} modules; trainable params {self.trainable_params:,} "
            f"of {self.total_params:,} ({pct:.4f}%)"
        )


def resolve_targets(targets: str | list[str], model_type: str | None) -> list[str] | str:
    """Turn a preset, a comma list of suffixes, or 're:<regex>' into PEFT-style targets.

    Returns a list of module-name suffixes, a regex string (matched in full against module
    paths, as PEFT does), or "all-linear".
    """
    if isinstance(targets, list):
        return targets
    spec = targets.strip()
    if spec.startswith("re:"):
        return spec[3:]
    if spec == "all-linear":
        return spec
    if spec in TARGET_PRESETS:
        return preset_modules(spec, model_type)
    names = [t.strip() for t in re.split(r",(?![^\[]*\])", spec) if t.strip()]  # not in [...]
    if not names:
        raise ConfigError("lora targets are empty; use e.g. 'attn' or 'q_proj,v_proj'")
    return names


def _matching_target(name: str, targets: list[str]) -> str | None:
    """The first target whose module suffix (slices aside) ends `name`."""
    for target in targets:
        suffix, _ = parse_target(target)
        if name == suffix or name.endswith("." + suffix):
            return target
    return None


def _matches(name: str, targets: list[str] | str, output_layer: nn.Module | None, module) -> bool:
    if targets == "all-linear":
        return module is not output_layer
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return _matching_target(name, targets) is not None


def _output_layer(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None


def find_targets(model: nn.Module, targets: list[str] | str) -> list[str]:
    """Paths of the linear modules that `targets` selects; an error lists what exists."""
    output_layer = _output_layer(model)
    linear = {name: m for name, m in model.named_modules() if is_linear(m)}
    chosen = [n for n, m in linear.items() if _matches(n, targets, output_layer, m)]
    if not chosen:
        leaf_names = sorted({n.rsplit(".", 1)[-1] for n in linear})
        raise ConfigError(
            f"lora targets {targets!r} match no linear module. Linear module names in this "
            f"model: {', '.join(leaf_names)}"
        )
    return chosen


SliceFactory = Callable[[nn.Module, LoraConfig, FusedLayout, tuple[str, ...]], LoraLinear]


def _slices_of(path: str, targets: list[str] | str, model_type: str | None) -> tuple | None:
    """The slices a target asks of the module at `path`, or None for an ordinary LoRA."""
    if not isinstance(targets, list):
        return None
    target = _matching_target(path, targets)
    slices = parse_target(target)[1] if target else None
    fused = FUSED_QKV_MODULE.get(model_type or "")
    if slices is not None and path.rsplit(".", 1)[-1] != fused:
        raise ConfigError(
            f"lora target {target!r} asks for q/k/v slices of {path}, which is not the fused "
            f"QKV projection of a {model_type} model ({fused or 'it has none'})"
        )
    return slices


def inject_lora(
    model: nn.Module,
    config: LoraConfig,
    layer_factory: Callable[[nn.Module, LoraConfig], LoraLinear] = LoraLinear,
    slice_factory: SliceFactory = FusedSliceLora,
) -> InjectionReport:
    """Wrap the targeted linear modules in LoRA layers, freeze everything else.

    Only the new A and B factors are trainable afterwards; they are chosen by module identity,
    not by matching parameter names. A target '<fused module>[q,v]' gets a slice layer
    (lora_fused.FusedSliceLora). `layer_factory` and `slice_factory` let the distributed
    package build LoRA layers that understand tensor-parallel bases.
    """
    model_config = getattr(model, "config", None)
    model_type = getattr(model_config, "model_type", None)
    targets = resolve_targets(config.targets, model_type)
    paths = find_targets(model, targets)
    model.requires_grad_(False)
    layers: dict[str, LoraLinear] = {}
    layout = None  # the same for every layer; built on first use
    for path in paths:
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        slices = _slices_of(path, targets, model_type)
        base = getattr(parent, child)
        if slices is None:
            layer = layer_factory(base, config)
        else:
            layout = layout or fused_layout(model_config)
            layer = slice_factory(base, config, layout, slices)
        setattr(parent, child, layer)
        layers[path] = layer
    for layer in layers.values():
        layer.lora_A.requires_grad_(True)
        layer.lora_B.requires_grad_(True)
    if targets == "all-linear":  # PEFT expands it the same way; a list is portable
        targets = sorted({p.rsplit(".", 1)[-1] for p in paths})
    return InjectionReport(
        layers=layers,
        target_modules=targets,
        trainable_params=sum(numel(p) for p in model.parameters() if p.requires_grad),
        total_params=sum(numel(p) for p in model.parameters()),
    )


def numel(param: nn.Parameter) -> int:
    """A parameter's element count, also when ZeRO-3 has partitioned it away."""
    return int(getattr(param, "ds_numel", param.numel()))


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that carry gradients: the LoRA factors after inject_lora."""
    return [p for p in model.parameters() if p.requires_grad]
