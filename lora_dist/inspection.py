"""An adapter's settings, size and checksum verdict, without loading a model (`lora-dist inspect`).

Also the manifest check that `lora-dist merge` runs before it touches a base.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from lora_dist.adapter import (
    META_NAME,
    WEIGHTS_NAME,
    AdapterError,
    lora_config_from_peft,
    read_adapter_config,
    read_adapter_weights,
    resolve_adapter_dir,
)
from lora_dist.manifest import MANIFEST_NAME, verify_manifest


def check_manifests(given: Path, adapter_dir: Path) -> tuple[list[str], list[str]]:
    """(manifests found, problems) for `given` and the adapter inside it, paths from `given`."""
    found, problems = [], []
    for directory in dict.fromkeys([given, adapter_dir]):
        if not (directory / MANIFEST_NAME).is_file():
            continue
        rel = directory.relative_to(given).as_posix() if directory != given else ""
        found.append(f"{rel}/{MANIFEST_NAME}" if rel else MANIFEST_NAME)
        problems += [f"{rel}/{p}" if rel else p for p in verify_manifest(directory)]
    return found, problems


def inspect_adapter(path: str | Path) -> dict[str, Any]:
    """An adapter's config, size and checksum verdict; `path` may be a training checkpoint."""
    given = Path(path)
    adapter_dir = resolve_adapter_dir(given)
    cfg = read_adapter_config(adapter_dir)
    lora = lora_config_from_peft(cfg)
    manifests, problems = check_manifests(given, adapter_dir)
    tensors: dict[str, torch.Tensor] = {}
    try:
        tensors = read_adapter_weights(adapter_dir)
    except AdapterError as exc:
        problems.append(str(exc))
    meta_path = adapter_dir / META_NAME
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    weights_path = adapter_dir / WEIGHTS_NAME
    return {
        "adapter_dir": str(adapter_dir),
        "peft_type": cfg["peft_type"],
        "r": lora.r,
        "lora_alpha": lora.alpha,
        "scaling": lora.scaling,
        "lora_dropout": lora.dropout,
        "target_modules": cfg["target_modules"],
        "use_rslora": lora.use_rslora,
        "fan_in_fan_out": bool(cfg.get("fan_in_fan_out", False)),
        "base_model_name_or_path": cfg.get("base_model_name_or_path"),
        "base_identity": meta.get("base_identity"),
        "adapted_modules": sum(k.endswith(".lora_A.weight") for k in tensors),
        "parameters": sum(t.numel() for t in tensors.values()),
        "file_bytes": weights_path.stat().st_size if weights_path.is_file() else None,
        "dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()}),
        "manifests": manifests,
        "problems": problems,
    }


def format_inspection(info: dict[str, Any]) -> str:
    """The human-readable report of `lora-dist inspect`."""
    targets = info["target_modules"]
    base = info["base_model_name_or_path"] or "unrecorded"
    if info["base_identity"]:
        base += f" (config hash {info['base_identity'][:12]})"
    size = info["file_bytes"]
    lines = [
        f"adapter: {info['adapter_dir']}",
        f"peft_type: {info['peft_type']}",
        f"r: {info['r']}  alpha: {info['lora_alpha']:g}  scaling: {info['scaling']:g}  "
        f"dropout: {info['lora_dropout']:g}  use_rslora: {info['use_rslora']}  "
        f"fan_in_fan_out: {info['fan_in_fan_out']}",
        f"targets: {', '.join(targets) if isinstance(targets, list) else targets}",
        f"base model: {base}",
        f"adapted modules: {info['adapted_modules']}",
        f"parameters: {info['parameters']:,}",
        f"file size: {'missing' if size is None else f'{size:,} bytes'} ({WEIGHTS_NAME})",
        f"dtypes: {', '.join(info['dtypes']) or 'none'}",
    ]
    if info["problems"]:
        lines.append(f"checksums: {len(info['problems'])} problem(s):")
        lines += [f"  {p}" for p in info["problems"]]
    elif info["manifests"]:
        lines.append(f"checksums: OK ({', '.join(info['manifests'])})")
    else:
        lines.append("no manifest: checksums not verified")
    return "\n".join(lines)
