"""Putting a service together: the base from safetensors, its adapters, the engine and worker.

`build` loads a base directory (safetensors only, so nothing is unpickled) and the startup
adapters, and wires registry, engine and worker; `lora_dist.serving.http` puts an HTTP server in
front of it, `lora-dist generate` runs its engine directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lora_dist.errors import ConfigError, ModelError
from lora_dist.models import BUILTIN, DEFAULT_MODEL, check_model, resolve_model_dir
from lora_dist.multi_lora import MultiLoraModel
from lora_dist.serving.adapters import AdapterRegistry
from lora_dist.serving.engine import Engine
from lora_dist.serving.worker import EngineWorker

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
Dtype = Literal["fp32", "bf16", "fp16"]


def load_base(base_dir: str | Path, dtype: Dtype = "fp32", device: str = "cpu") -> tuple:
    """(model in eval mode, tokenizer) of a Hugging Face directory with safetensors weights."""
    path = Path(base_dir)
    if not (path / "config.json").is_file():
        raise ModelError(f"{path} has no config.json: pass a Hugging Face model directory")
    if not any(path.glob("*.safetensors")):
        raise ModelError(
            f"{path} holds no .safetensors weights; lora-dist never unpickles. Convert the "
            "checkpoint to safetensors in a trusted environment."
        )
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model.to(device).eval().requires_grad_(False), tokenizer


@dataclass
class Service:
    """A base, its adapters and the engine that serves them."""

    registry: AdapterRegistry
    engine: Engine
    worker: EngineWorker
    tokenizer: Any


def build(
    base_dir: str | Path,
    adapters: dict[str, str | Path] | None = None,
    *,
    base_name: str | None = None,
    lora_roots: list[str | Path] | None = None,
    max_adapters: int = 32,
    max_batch_size: int = 16,
    max_model_len: int | None = 2048,
    max_waiting: int = 1024,
    dtype: Dtype = "fp32",
    device: str = "cpu",
) -> Service:
    """Load the base and `adapters` ({name: directory}) and wire the service; not started."""
    model, tokenizer = load_base(base_dir, dtype, device)
    mixed = MultiLoraModel(model, max_adapters=max_adapters)
    registry = AdapterRegistry(mixed, base_name or Path(base_dir).resolve().name, lora_roots)
    for name, path in (adapters or {}).items():
        registry.install(name, registry.read(name, path, runtime=False))
    engine = Engine(
        mixed,
        tokenizer,
        max_batch_size=max_batch_size,
        max_model_len=max_model_len,
        max_waiting=max_waiting,
        on_finish=lambda request, _: registry.release(request.slot),
    )
    worker = EngineWorker(engine, registry)
    return Service(registry, engine, worker, tokenizer)


def adapter_specs(specs: list[str]) -> dict[str, str]:
    """`--adapter NAME=DIR` flags as {name: directory}; a malformed or repeated one is refused."""
    adapters: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--adapter {spec!r}: write NAME=DIR, e.g. --adapter sql=runs/sql")
        if name in adapters:
            raise ConfigError(f"--adapter {name} is given twice; each name serves one adapter")
        adapters[name] = path
    return adapters


def check_startup(model: str | None, specs: list[str]) -> dict[str, str]:
    """Refuse, before anything loads, a `--model` that is neither built in nor a directory and an
    `--adapter NAME=DIR` whose DIR is not a directory; returns {name: directory}."""
    if model is not None and model not in BUILTIN:
        check_model(model)
    adapters = adapter_specs(specs)
    for name, path in adapters.items():
        if not Path(path).is_dir():
            what = "is a file" if Path(path).exists() else "does not exist"
            raise ConfigError(f"--adapter {name}={path}: {path} {what}; pass an adapter directory")
    return adapters


def resolve_base(spec: str | None) -> tuple[Path, str]:
    """(directory, name in the API) of `--model`: a built-in model's name, or a directory's."""
    name = spec or DEFAULT_MODEL
    directory = resolve_model_dir(name)
    return directory, name if name in BUILTIN else directory.resolve().name
