"""Shipping an adapter: fold it into a base model directory, shard by shard (`lora-dist merge`).

The merged directory is the base architecture with W = W0 + s·B·A written in place of each
adapted weight, so it serves with plain transformers (or vLLM, TGI) at zero added latency.
Only one base shard, one output shard and the adapter are ever in host memory, and nothing is
unpickled: bases must be safetensors.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from transformers import AutoConfig

from lora_dist.adapter import (
    check_base_identity,
    lora_config_from_peft,
    parse_peft_key,
    read_adapter_config,
    read_adapter_weights,
    resolve_adapter_dir,
)
from lora_dist.errors import ConfigError, UserError
from lora_dist.inspection import check_manifests
from lora_dist.lora import merge_weight
from lora_dist.manifest import MANIFEST_NAME

SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEFAULT_MAX_SHARD = "2GB"
# Weights in any format are never copied verbatim: the merged safetensors replace them.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})


class MergeError(UserError):
    """A merge refused before (or instead of) writing, with what to change."""


@dataclass
class WeightUpdate:
    """The LoRA update of one base tensor: its factors' adapter keys and the weight's layout."""

    lora_a: str
    lora_b: str
    fan_in_fan_out: bool


def parse_size(text: str | int) -> int:
    """Bytes in '2GB', '500MB', '20KB' (powers of 10, as Hugging Face reads them) or '1GiB'."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", text.upper())
    if not m or m.group(2) not in _UNITS:
        raise ConfigError(f"cannot read the size {text!r}; write e.g. 2GB, 500MB or 1GiB")
    size = int(float(m.group(1)) * _UNITS[m.group(2)])
    if size <= 0:
        raise ConfigError(f"a shard size must be positive, got {text!r}")
    return size


def base_shards(base_dir: Path) -> list[str]:
    """The safetensors files holding a base model's weights, by name."""
    if (base_dir / INDEX_NAME).is_file():
        weight_map = json.loads((base_dir / INDEX_NAME).read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (base_dir / s).is_file()]
        if missing:
            raise MergeError(f"{base_dir / INDEX_NAME} names shards that are missing: {missing}")
        return shards
    if (base_dir / SINGLE_NAME).is_file():
        return [SINGLE_NAME]
    if list(base_dir.glob("pytorch_model*.bin")) or list(base_dir.glob("*.bin.index.json")):
        raise MergeError(
            f"{base_dir} holds pytorch_model*.bin weights, which are pickles; lora-dist never "
            "unpickles. In a trusted environment, load the model and save it again with "
            "save_pretrained(dir) (safetensors is the default), then merge into that."
        )
    raise MergeError(f"{base_dir} has no {SINGLE_NAME} or {INDEX_NAME}: not a model directory")


Header = tuple[str, tuple[int, ...], str]  # (shard, shape, safetensors dtype such as "BF16")


def read_headers(base_dir: Path, shards: list[str]) -> dict[str, Header]:
    """tensor name -> (shard, shape, dtype), read from the safetensors headers alone."""
    shapes: dict[str, Header] = {}
    for shard in shards:
        try:
            with safe_open(str(base_dir / shard), framework="pt") as f:
                for key in f.keys():
                    if key in shapes:
                        raise MergeError(f"tensor {key} is in both {shapes[key][0]} and {shard}")
                    view = f.get_slice(key)
                    shapes[key] = (shard, tuple(view.get_shape()), view.get_dtype())
        except SafetensorError as exc:
            raise MergeError(f"{base_dir / shard} is corrupt or truncated: {exc}") from exc
    return shapes


def _factor_pairs(weights: dict[str, torch.Tensor]) -> dict[str, tuple[str, str]]:
    """module path -> (A key, B key); every other key, or a lone factor, is an error."""
    found: dict[str, dict[str, str]] = {}
    strange = []
    for key in weights:
        parsed = parse_peft_key(key)
        if parsed:
            found.setdefault(parsed[0], {})[parsed[1]] = key
        else:
            strange.append(key)
    lone = sorted(p for p, f in found.items() if len(f) != 2)
    if strange or lone:
        raise MergeError(
            f"adapter tensors that are not LoRA A/B pairs: {sorted(strange)[:8]}; "
            f"modules with only one factor: {lone[:8]}"
        )
    return {path: (f["lora_A"], f["lora_B"]) for path, f in found.items()}


def _base_key(path: str, shapes: dict[str, Any]) -> str | None:
    if f"{path}.weight" in shapes:
        return f"{path}.weight"
    # Checkpoints saved from the bare backbone (e.g. the hub's gpt2) lack the head's prefix.
    _, _, rest = path.partition(".")
    return f"{rest}.weight" if rest and f"{rest}.weight" in shapes else None


def plan_merge(
    weights: dict[str, torch.Tensor],
    shapes: dict[str, Header],
    fan_in_fan_out: bool,
) -> dict[str, WeightUpdate]:
    """Base tensor name -> its update, with every key matched and every shape checked.

    The layout comes from the shapes where they decide it (B·A fits W, or fits W transposed);
    only square weights fall back on the adapter config's fan_in_fan_out.
    """
    plan: dict[str, WeightUpdate] = {}
    unmatched, problems = [], []
    for path, (key_a, key_b) in sorted(_factor_pairs(weights).items()):
        base_key = _base_key(path, shapes)
        if base_key is None:
            unmatched.append(f"{key_a} (wants {path}.weight)")
            continue
        a_shape, b_shape = tuple(weights[key_a].shape), tuple(weights[key_b].shape)
        _, w_shape, w_dtype = shapes[base_key]
        if w_dtype not in ("F16", "BF16", "F32", "F64"):
            problems.append(f"{base_key} is {w_dtype}, not floating point (a quantized base?)")
            continue
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
            problems.append(f"{path}: A {a_shape} and B {b_shape} are not r x in and out x r")
            continue
        plain, transposed = (b_shape[0], a_shape[1]), (a_shape[1], b_shape[0])
        fits = [fan for fan, shape in ((False, plain), (True, transposed)) if shape == w_shape]
        if not fits:
            problems.append(f"{path}: B·A is {plain} but {base_key} is {w_shape}")
            continue
        fan = fan_in_fan_out if len(fits) == 2 else fits[0]
        plan[base_key] = WeightUpdate(key_a, key_b, fan)
    if unmatched:
        raise MergeError(
            f"{len(unmatched)} adapter modules match no base tensor (different base model?): "
            + "; ".join(unmatched[:10])
        )
    if problems:
        raise MergeError("adapter shapes do not fit the base: " + "; ".join(problems[:10]))
    return plan


def _check_destination(out_dir: Path, inputs: list[Path], overwrite: bool) -> None:
    for src in inputs:
        if out_dir.resolve() == src.resolve():
            raise MergeError(f"--output_dir {out_dir} is an input directory; choose another")
    if out_dir.exists() and not out_dir.is_dir():
        raise MergeError(f"--output_dir {out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise MergeError(f"{out_dir} is not empty; pass --overwrite to replace it")


def _base_config(base_dir: Path) -> Any:
    if not (base_dir / "config.json").is_file():
        raise MergeError(f"{base_dir} has no config.json: a merged model could not be served")
    return AutoConfig.from_pretrained(str(base_dir))


class ShardWriter:
    """Collects output tensors up to a byte budget, then writes them as one safetensors file."""

    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.directory, self.max_bytes = directory, max_bytes
        self.buffer: dict[str, torch.Tensor] = {}
        self.buffered = 0
        self.files: list[tuple[str, list[str]]] = []  # (temporary name, tensor names)
        self.total_size = 0
        self.total_params = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.buffer and self.buffered + nbytes > self.max_bytes:
            self.flush()
        self.buffer[name] = tensor.contiguous()
        self.buffered += nbytes
        self.total_size += nbytes
        self.total_params += tensor.numel()

    def flush(self) -> None:
        if not self.buffer:
            return
        name = f".part-{len(self.files):05d}.safetensors"
        save_file(self.buffer, str(self.directory / name), metadata={"format": "pt"})
        with open(self.directory / name, "rb") as f:
            os.fsync(f.fileno())
        self.files.append((name, list(self.buffer)))
        self.buffer, self.buffered = {}, 0

    def finish(self) -> list[str]:
        """Give the shards their final names and write the index when there is more than one."""
        self.flush()
        count = len(self.files)
        weight_map, names = {}, []
        for i, (tmp, keys) in enumerate(self.files):
            final = SINGLE_NAME if count == 1 else f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            os.replace(self.directory / tmp, self.directory / final)
            names.append(final)
            weight_map.update(dict.fromkeys(keys, final))
        if count > 1:
            metadata = {"total_size": self.total_size, "total_parameters": self.total_params}
            index = {"metadata": metadata, "weight_map": dict(sorted(weight_map.items()))}
            (self.directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return names


def _copy_side_files(base_dir: Path, out: Path, dtype: torch.dtype | None) -> list[str]:
    """config, generation config, tokenizer files and anything else that is not weights."""
    copied = []
    for src in sorted(base_dir.iterdir()):
        name = src.name
        if not src.is_file() or name.startswith(".") or name.endswith(_WEIGHT_SUFFIXES):
            continue
        if name in (INDEX_NAME, MANIFEST_NAME) or name.endswith(".bin.index.json"):
            continue
        if name == "config.json" and dtype is not None:
            config = json.loads(src.read_text())
            config["dtype"] = str(dtype).removeprefix("torch.")
            if "torch_dtype" in config:  # the name transformers 4 wrote
                config["torch_dtype"] = config["dtype"]
            (out / name).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        else:
            shutil.copy2(src, out / name)
        copied.append(name)
    return copied


def _install(tmp: Path, out_dir: Path) -> None:
    """Move the finished temp dir to `out_dir` by rename, so a reader never sees half a model."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp made it private; the model is not
    if out_dir.is_dir():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, old / "model")
        os.replace(tmp, out_dir)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out_dir)


def merge_checkpoint(
    base_dir: Path,
    adapter_dir: Path,
    out_dir: Path,
    dtype: torch.dtype | str | None = None,
    max_shard_bytes: int | str = DEFAULT_MAX_SHARD,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Write base + adapter as a plain Hugging Face model directory; returns a summary.

    Everything is validated from file headers before the first byte is written; the output is
    assembled in a temp dir beside `out_dir` and renamed into place at the end.
    """
    base_dir, out_dir, given = Path(base_dir), Path(out_dir), Path(adapter_dir)
    adapter_dir = resolve_adapter_dir(given)
    say = progress or (lambda _: None)
    out_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    max_bytes = parse_size(max_shard_bytes)
    _check_destination(out_dir, [base_dir, adapter_dir], overwrite)

    problems = check_manifests(given, adapter_dir)[1]
    if problems:
        raise MergeError(f"{given} fails its checksums: " + "; ".join(problems))
    cfg = read_adapter_config(adapter_dir)
    scaling = lora_config_from_peft(cfg).scaling
    shards = base_shards(base_dir)
    check_base_identity(adapter_dir, _base_config(base_dir))
    weights = read_adapter_weights(adapter_dir)
    plan = plan_merge(weights, read_headers(base_dir, shards), bool(cfg.get("fan_in_fan_out")))

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        writer = ShardWriter(tmp, max_bytes)
        for shard in shards:
            merged = copied = 0
            with safe_open(str(base_dir / shard), framework="pt", device="cpu") as f:
                for key in f.keys():
                    tensor = f.get_tensor(key)
                    update = plan.get(key)
                    if update is not None:
                        w0 = tensor if out_dtype is None else tensor.float()
                        a, b = weights[update.lora_a], weights[update.lora_b]
                        tensor = merge_weight(w0, a, b, scaling, update.fan_in_fan_out)
                        merged += 1
                    else:
                        copied += 1
                    if out_dtype is not None and tensor.is_floating_point():
                        tensor = tensor.to(out_dtype)
                    writer.add(key, tensor)
            say(f"{shard}: {merged} merged, {copied} copied")
        names = writer.finish()
        side_files = _copy_side_files(base_dir, tmp, out_dtype)
        _install(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    file_bytes = sum((out_dir / n).stat().st_size for n in names)
    say(
        f"merged {len(plan)} tensors (scaling {scaling:g}) into {out_dir}: {len(names)} "
        f"shard(s), {file_bytes / 1e6:.1f} MB, plus {', '.join(side_files) or 'no other files'}"
    )
    return {
        "out_dir": str(out_dir),
        "merged_tensors": len(plan),
        "total_tensors": sum(len(keys) for _, keys in writer.files),
        "shards": names,
        "total_size": writer.total_size,
        "file_bytes": file_bytes,
        "copied_files": side_files,
        "scaling": scaling,
    }
