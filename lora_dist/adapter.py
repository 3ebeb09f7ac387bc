"""Adapter files in Hugging Face PEFT's format: adapter_config.json + adapter_model.safetensors.

Keys are `base_model.model.<module path>.lora_A.weight` (r x in) and `.lora_B.weight`
(out x r), exactly what `peft.PeftModel.from_pretrained` reads, so an adapter written here
serves anywhere PEFT does and PEFT's adapters load here. Nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lora_dist.atomic import write_atomic, write_json_atomic
from lora_dist.errors import AdapterError
from lora_dist.inject import InjectionReport, inject_lora
from lora_dist.lora import LoraConfig, lora_layers
from lora_dist.lora_fused import join_slice_targets, peft_patterns, split_slice_targets

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
META_NAME = "lora_dist.json"  # our extras, kept out of adapter_config.json so PEFT stays quiet
PREFIX = "base_model.model."
FACTORS = ("lora_A", "lora_B")
_PEFT_KEY = re.compile(re.escape(PREFIX) + r"(.+)\.(lora_A|lora_B)\.weight")

# Config fields that do not change what the weights compute.
_VOLATILE_CONFIG_KEYS = {
    "_name_or_path",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "use_cache",
    "_attn_implementation",
    "_attn_implementation_autoset",
    "output_attentions",
    "output_hidden_states",
}


def peft_key(module_path: str, factor: str) -> str:
    """PEFT's name for factor "lora_A" or "lora_B" of the LoRA layer wrapping `module_path`."""
    return f"{PREFIX}{module_path}.{factor}.weight"


def parse_peft_key(key: str) -> tuple[str, str] | None:
    """(module path, factor) of a PEFT LoRA tensor name; None for any other name."""
    m = _PEFT_KEY.fullmatch(key)
    return (m.group(1), m.group(2)) if m else None


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every LoRA factor of `model` under its PEFT key (possibly ZeRO-3 partitioned)."""
    return {
        peft_key(path, factor): getattr(layer, factor)
        for path, layer in lora_layers(model).items()
        for factor in FACTORS
    }


def base_identity(base_config: Any) -> str:
    """SHA-256 of the architecture-defining fields of a model config (a config object or dict).

    The one identity of a base model: adapters record it, checkpoints record it (with
    `base_weights_digest`), and both refuse a base whose identity differs.
    """
    fields = base_config.to_dict() if hasattr(base_config, "to_dict") else dict(base_config)
    kept = {k: v for k, v in fields.items() if k not in _VOLATILE_CONFIG_KEYS}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()


def base_weights_digest(model_dir: Path) -> str:
    """Hash of a model directory's weight-file names and sizes (and its shard index).

    Cheap for a 350 GB checkpoint, and still changes when the weights are replaced.
    """
    digest = hashlib.sha256()
    for path in sorted(Path(model_dir).glob("*.safetensors*")):
        digest.update(f"{path.name}:{path.stat().st_size}\n".encode())
        if path.name.endswith(".index.json"):
            digest.update(path.read_bytes())
    return digest.hexdigest()


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA factors of an unsharded model under PEFT's key names, in PEFT's form.

    (`lora_parameters` gives the factors as the layers hold them; slice layers differ.)
    """
    state = {}
    for path, layer in lora_layers(model).items():
        a, b = layer.export_factors(layer.lora_A.detach(), layer.lora_B.detach())
        state[peft_key(path, "lora_A")], state[peft_key(path, "lora_B")] = a, b
    return state


def peft_config_dict(
    config: LoraConfig,
    target_modules: list[str] | str,
    base_name_or_path: str,
    fan_in_fan_out: bool,
) -> dict[str, Any]:
    """The adapter_config.json that PEFT's LoraConfig reads.

    Slice targets ('c_attn[q,v]') become the fused module with PEFT's rank n·r and the alpha
    that keeps our scale (lora_fused.peft_patterns).
    """
    peft_targets, fused_slices = split_slice_targets(target_modules)
    rank_pattern, alpha_pattern = peft_patterns(fused_slices, config)
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": peft_targets,
        "use_rslora": config.use_rslora,
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "init_lora_weights": True if config.init == "kaiming" else "gaussian",
        "base_model_name_or_path": base_name_or_path,
        "inference_mode": True,
        "modules_to_save": None,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
    }


def save_adapter(
    out_dir: str | Path,
    state: dict[str, torch.Tensor],
    config: LoraConfig,
    target_modules: list[str] | str,
    base_config: Any,
    base_name_or_path: str,
    fan_in_fan_out: bool = False,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write `state` (PEFT keys, whole tensors) and its config to `out_dir`; returns out_dir.

    `dtype` casts the saved factors (e.g. fp16 for the smallest shippable file).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {
        k: (v.to(dtype) if dtype else v).detach().cpu().contiguous() for k, v in state.items()
    }
    for key, value in tensors.items():
        if value.numel() == 0:
            raise AdapterError(f"refusing to save an empty tensor for {key}: was it gathered?")
    peft_cfg = peft_config_dict(config, target_modules, base_name_or_path, fan_in_fan_out)
    meta = {"base_identity": base_identity(base_config), "format": 1}
    fused_slices = split_slice_targets(target_modules)[1]
    if fused_slices:  # how to read the fused modules' factors back as slices
        meta["fused_slices"] = {name: list(s) for name, s in fused_slices.items()}
    write_atomic(out / WEIGHTS_NAME, lambda p: save_file(tensors, str(p), {"format": "pt"}))
    write_json_atomic(out / CONFIG_NAME, peft_cfg, sort_keys=False)
    write_json_atomic(out / META_NAME, meta, sort_keys=False)
    return out


@dataclass(frozen=True)
class AdapterSpec:
    """What an adapter's files record besides its tensors: settings, targets and base model."""

    config: LoraConfig
    target_modules: list[str] | str
    """As PEFT's adapter_config.json states them (InjectionReport.target_modules)."""
    base_config: Any
    """The base model's config, whose identity the adapter records."""
    base_name_or_path: str
    fan_in_fan_out: bool = False

    def save(
        self, out_dir: str | Path, state: dict[str, torch.Tensor], dtype: torch.dtype | None = None
    ) -> Path:
        """Write `state` (PEFT keys, whole tensors) as an adapter directory; see save_adapter."""
        return save_adapter(
            out_dir,
            state,
            self.config,
            self.target_modules,
            self.base_config,
            self.base_name_or_path,
            self.fan_in_fan_out,
            dtype,
        )


def read_meta(adapter_dir: str | Path) -> dict[str, Any]:
    """lora_dist.json, or {} for an adapter written by PEFT or another tool."""
    path = Path(adapter_dir) / META_NAME
    return json.loads(path.read_text()) if path.is_file() else {}


def read_adapter_config(adapter_dir: str | Path) -> dict[str, Any]:
    """Read and validate adapter_config.json, with errors that say what is wrong.

    `targets` is added: target_modules with the slices lora_dist.json records ('c_attn[q,v]').
    """
    path = Path(adapter_dir) / CONFIG_NAME
    if not path.is_file():
        raise AdapterError(f"{path} does not exist: {adapter_dir} is not an adapter directory")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise AdapterError(f"{path} is not valid JSON: {exc}") from exc
    if cfg.get("peft_type") != "LORA":
        raise AdapterError(f"{path}: peft_type is {cfg.get('peft_type')!r}, only 'LORA' loads")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in cfg:
            raise AdapterError(f"{path} lacks the field {key!r}")
    fused_slices = read_meta(adapter_dir).get("fused_slices", {})
    try:
        cfg["targets"] = join_slice_targets(cfg["target_modules"], fused_slices)
        lora = lora_config_from_peft(cfg)
    except ValueError as exc:
        raise AdapterError(f"{path}: {exc}") from exc
    patterns = (dict(cfg.get("rank_pattern") or {}), dict(cfg.get("alpha_pattern") or {}))
    expected = peft_patterns(split_slice_targets(cfg["targets"])[1], lora)
    if fused_slices and patterns != expected:
        raise AdapterError(
            f"{path}: rank_pattern/alpha_pattern {patterns} are not the {expected} that slices "
            f"{fused_slices} need"
        )
    if not _same_scale_everywhere(lora, *patterns):
        unsupported_patterns = {"rank_pattern": patterns[0], "alpha_pattern": patterns[1]}
        raise AdapterError(f"{path}: per-module scales {unsupported_patterns} are unsupported")
    unsupported = {
        k: cfg.get(k)
        for k in (
            "modules_to_save",
            "use_dora",
            "layers_to_transform",
        )
        if cfg.get(k)
    }
    if cfg.get("bias", "none") != "none":
        unsupported["bias"] = cfg["bias"]
    if unsupported:
        raise AdapterError(f"{path}: unsupported PEFT options {unsupported}")
    return cfg


def _same_scale_everywhere(lora: LoraConfig, ranks: dict, alphas: dict) -> bool:
    """Whether every rank/alpha pattern entry scales as the top level does (ranks then differ
    only in the tensors' shapes, as in an exported slice adapter)."""
    for key in set(ranks) | set(alphas):
        r, alpha = int(ranks.get(key, lora.r)), float(alphas.get(key, lora.alpha))
        scale = alpha / (r**0.5 if lora.use_rslora else r)
        if abs(scale - lora.scaling) > 1e-12 * abs(lora.scaling):
            return False
    return True


def lora_config_from_peft(cfg: dict[str, Any]) -> LoraConfig:
    """Our LoraConfig for a PEFT adapter_config dict (slices restored when `targets` has them)."""
    targets = cfg.get("targets", cfg["target_modules"])
    return LoraConfig(
        r=int(cfg["r"]),
        alpha=float(cfg["lora_alpha"]),
        dropout=float(cfg.get("lora_dropout", 0.0) or 0.0),
        targets=list(targets) if isinstance(targets, list) else f"re:{targets}",
        use_rslora=bool(cfg.get("use_rslora", False)),
        init="gaussian" if cfg.get("init_lora_weights") == "gaussian" else "kaiming",
    )


def read_adapter_weights(adapter_dir: str | Path) -> dict[str, torch.Tensor]:
    """Load adapter_model.safetensors, refusing pickle formats and reporting corruption."""
    adapter_dir = Path(adapter_dir)
    path = adapter_dir / WEIGHTS_NAME
    if not path.is_file():
        if (adapter_dir / "adapter_model.bin").exists():
            raise AdapterError(
                f"{adapter_dir} holds only adapter_model.bin, a pickle; lora-dist never "
                "unpickles. Convert it to safetensors in a trusted environment."
            )
        raise AdapterError(f"{path} does not exist")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterError(f"{path} is corrupt or truncated: {exc}") from exc


def check_base_identity(adapter_dir: str | Path, base_config: Any) -> None:
    """Refuse an adapter trained on a different base (when the adapter records its base)."""
    recorded = read_meta(adapter_dir).get("base_identity")  # PEFT's files: shapes still checked
    actual = base_identity(base_config)
    if recorded and recorded != actual:
        raise AdapterError(
            f"{adapter_dir} was trained on a different base model (config hash "
            f"{recorded[:12]}, this base {actual[:12]}); load it on the base it was trained on"
        )


def load_adapter_into(
    model: nn.Module,
    weights: dict[str, torch.Tensor],
    strict: bool = True,
) -> None:
    """Copy PEFT-keyed factors into a model's existing LoRA layers, checking every shape.

    Each layer converts PEFT's form back to its own (`import_factors`; slice layers differ).
    """
    expected = set()
    for path, layer in lora_layers(model).items():
        keys = [peft_key(path, factor) for factor in FACTORS]
        expected.update(keys)
        missing = [k for k in keys if k not in weights]
        if missing:
            if strict:
                raise AdapterError(f"adapter has no tensor {missing[0]}")
            continue
        try:
            values = layer.import_factors(weights[keys[0]], weights[keys[1]])
        except ValueError as exc:
            raise AdapterError(f"{keys[1]}: {exc}") from exc
        for key, value, param in zip(keys, values, (layer.lora_A, layer.lora_B), strict=True):
            if tuple(value.shape) != tuple(param.shape):
                raise AdapterError(
                    f"{key} has shape {tuple(value.shape)} but this model needs "
                    f"{tuple(param.shape)}: different rank or base model"
                )
            with torch.no_grad():
                param.copy_(value.to(param.dtype))
    unexpected = sorted(set(weights) - expected)
    if unexpected and strict:
        raise AdapterError(f"adapter tensors match no LoRA layer of this model: {unexpected[:5]}")


def load_adapter(
    model: nn.Module, adapter_dir: str | Path, lora_dtype: torch.dtype | None = None
) -> InjectionReport:
    """Inject LoRA as the adapter's config says and load its weights into `model`."""
    cfg = read_adapter_config(adapter_dir)
    check_base_identity(adapter_dir, model.config)
    weights = read_adapter_weights(adapter_dir)
    lora_cfg = lora_config_from_peft(cfg)
    lora_cfg.lora_dtype = lora_dtype
    # Factors are stored in PEFT's orientation whatever the base layout, so fan_in_fan_out only
    # matters for merging, and each layer knows its own base's layout.
    report = inject_lora(model, lora_cfg)
    load_adapter_into(model, weights)
    return report


def resolve_adapter_dir(path: str | Path) -> Path:
    """An adapter directory itself, or the `adapter/` inside a run or checkpoint directory."""
    path = Path(path)
    for candidate in (path, path / "adapter"):
        if (candidate / CONFIG_NAME).is_file():
            return candidate
    raise AdapterError(
        f"{path} holds no {CONFIG_NAME}, nor does {path / 'adapter'}: pass an adapter directory "
        "or a training run/checkpoint directory that contains adapter/"
    )
