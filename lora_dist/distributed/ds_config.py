"""Reading a DeepSpeed JSON config, checking it against the world size, and the few edits we make.

The JSON is passed through to DeepSpeed; we read only what the trainer must know (batch layout,
precision, ZeRO stage, TP degree) and set only what depends on the run (output paths, the
persistence threshold that keeps LoRA factors whole, and the ZeRO-3 buffer sizes a config leaves
at "auto", which depend on the model).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lora_dist.errors import ConfigError


def load_ds_config(path: str | Path) -> dict[str, Any]:
    """Parse a DeepSpeed JSON file, naming the file and position of any syntax error."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"DeepSpeed config {path} does not exist")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"DeepSpeed config {path} is not valid JSON: {exc.msg} at line {exc.lineno}, "
            f"column {exc.colno}"
        ) from exc
    if not isinstance(cfg, dict):
        raise ConfigError(f"DeepSpeed config {path} must hold a JSON object")
    autos = [k for k, v in _walk(cfg) if v == "auto" and k not in AUTO_KEYS]
    if autos:
        raise ConfigError(
            f"{path}: 'auto' is resolved by lora-dist only for {', '.join(AUTO_KEYS)}; "
            f"give a value for {autos}"
        )
    return cfg


# ZeRO-3 buffer sizes the trainer fills from the model when the JSON says "auto" (see
# `zero3_budgets`); DeepSpeed's own defaults are sized for no model in particular.
AUTO_SIZED = (
    "stage3_prefetch_bucket_size",
    "stage3_max_live_parameters",
    "stage3_max_reuse_distance",
    "reduce_bucket_size",
)
AUTO_KEYS = tuple(f"zero_optimization.{k}" for k in AUTO_SIZED)
# DeepSpeed 0.19.8's reduce_bucket_size default: the cap for "auto".
MAX_REDUCE_BUCKET = 500_000_000


def zero3_budgets(block_numel: int, largest_numel: int, trainable_numel: int) -> dict[str, int]:
    """ZeRO-3 buffer sizes, in elements, for a model whose largest repeated block (decoder layer)
    holds `block_numel` parameters and whose largest tensor holds `largest_numel`, both as one
    rank gathers them (after TP).

    - prefetch: the next block is gathered while this one computes;
    - max live: the block in use, the prefetched one, and the largest tensor (an embedding or
      LM head can outgrow a block);
    - reuse distance: a parameter used again within a block (the last layers, from forward into
      backward) is kept instead of gathered twice;
    - reduce bucket: every trainable gradient in one bucket (LoRA's are few), capped at
      DeepSpeed's default.

    DeepSpeed's defaults (5e7, 1e9, 1e9, 5e8) prefetch less than one MLP weight of a 70B model
    and let a small model keep everything gathered. `lora-dist plan` sizes "auto" the same way.
    """
    return {
        "stage3_prefetch_bucket_size": block_numel,
        "stage3_max_live_parameters": 2 * block_numel + largest_numel,
        "stage3_max_reuse_distance": block_numel,
        "reduce_bucket_size": max(1, min(trainable_numel, MAX_REDUCE_BUCKET)),
    }


def resolve_auto(cfg: dict[str, Any], budgets: dict[str, int]) -> dict[str, Any]:
    """A copy of `cfg` whose "auto" ZeRO sizes take the values in `budgets`."""
    cfg = copy.deepcopy(cfg)
    zero = cfg.get("zero_optimization", {})
    for key in AUTO_SIZED:
        if zero.get(key) == "auto":
            zero[key] = budgets[key]
    return cfg


def has_auto(cfg: dict[str, Any]) -> bool:
    zero = cfg.get("zero_optimization", {})
    return any(zero.get(k) == "auto" for k in AUTO_SIZED)


def _walk(node: Any, prefix: str = ""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, f"{prefix}{k}.")
    else:
        yield prefix.rstrip("."), node


@dataclass(frozen=True)
class BatchLayout:
    """How the global batch splits over data-parallel ranks and accumulation steps."""

    global_batch: int
    micro_batch: int
    grad_accum: int
    dp: int
    tp: int

    @property
    def per_rank(self) -> int:
        """Samples each data-parallel rank consumes per optimizer step."""
        return self.micro_batch * self.grad_accum


def tp_size(cfg: dict[str, Any]) -> int:
    return int(cfg.get("tensor_parallel", {}).get("autotp_size", 1) or 1)


def batch_layout(cfg: dict[str, Any], world_size: int) -> BatchLayout:
    """Derive the batch layout (DP = world / TP) and check that the sizes agree.

    Any two of train_batch_size, train_micro_batch_size_per_gpu and
    gradient_accumulation_steps determine the third, as in DeepSpeed.
    """
    tp = tp_size(cfg)
    if world_size % tp:
        raise ConfigError(
            f"world size {world_size} is not divisible by tensor_parallel.autotp_size {tp}; "
            "launch a multiple of the TP degree or change autotp_size"
        )
    dp = world_size // tp
    hpz = int(cfg.get("zero_optimization", {}).get("zero_hpz_partition_size", 1) or 1)
    if hpz > 1 and tp > 1:
        raise ConfigError(
            f"zero_hpz_partition_size {hpz} with tensor_parallel.autotp_size {tp}: DeepSpeed "
            "builds hpZ groups from consecutive ranks, which are TP peers holding different "
            "slices; use one of the two"
        )
    total = cfg.get("train_batch_size")
    micro = cfg.get("train_micro_batch_size_per_gpu")
    accum = cfg.get("gradient_accumulation_steps")
    given = sum(v is not None for v in (total, micro, accum))
    if given < 2 and not (micro and given == 1):
        raise ConfigError("set train_batch_size and train_micro_batch_size_per_gpu in the config")
    micro = micro or 1
    if total is None:
        total = micro * (accum or 1) * dp
    if accum is None:
        if total % (micro * dp):
            raise ConfigError(
                f"train_batch_size {total} is not divisible by micro-batch {micro} x "
                f"data-parallel ranks {dp} (world {world_size} / TP {tp}); change "
                "train_batch_size or train_micro_batch_size_per_gpu, or launch another world size"
            )
        accum = total // (micro * dp)
    if total != micro * accum * dp:
        raise ConfigError(
            f"train_batch_size {total} != micro-batch {micro} x gradient_accumulation_steps "
            f"{accum} x data-parallel ranks {dp} (world {world_size} / TP {tp}). Remove "
            "gradient_accumulation_steps to let it be derived, or fix the numbers."
        )
    return BatchLayout(global_batch=total, micro_batch=micro, grad_accum=accum, dp=dp, tp=tp)


def model_dtype(cfg: dict[str, Any]) -> torch.dtype:
    if cfg.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    if cfg.get("fp16", {}).get("enabled"):
        return torch.float16
    return torch.float32


def prepare_for_run(
    cfg: dict[str, Any],
    layout: BatchLayout,
    output_dir: Path,
    lora_threshold: int | None,
    lr: float | None,
    zero_budgets: dict[str, int] | None = None,
) -> dict[str, Any]:
    """A copy of `cfg` with the run's batch layout, output paths and LoRA persistence set.

    "auto" ZeRO sizes take `zero_budgets` (`zero3_budgets()` of the model); without them (the
    config zero.Init loads the base with, before the model exists) they are left out, so
    DeepSpeed's defaults apply where nothing is gathered yet.
    """
    cfg = resolve_auto(cfg, zero_budgets) if zero_budgets else copy.deepcopy(cfg)
    zero_section = cfg.get("zero_optimization", {})
    for key in [k for k in AUTO_SIZED if zero_section.get(k) == "auto"]:
        del zero_section[key]
    cfg["train_batch_size"] = layout.global_batch
    cfg["train_micro_batch_size_per_gpu"] = layout.micro_batch
    cfg["gradient_accumulation_steps"] = layout.grad_accum
    for monitor in ("tensorboard", "csv_monitor", "wandb"):
        if cfg.get(monitor, {}).get("enabled") and monitor != "wandb":
            cfg[monitor]["output_path"] = str(output_dir / "tensorboard")
            cfg[monitor].setdefault("job_name", "deepspeed")
    zero = cfg.setdefault("zero_optimization", {})
    if lora_threshold is not None and zero.get("stage", 0) == 3:
        # LoRA factors stay whole on every rank; base weights larger than them are partitioned.
        zero["stage3_param_persistence_threshold"] = max(
            int(zero.get("stage3_param_persistence_threshold", 0)), lora_threshold
        )
    if lr is not None:
        cfg.setdefault("optimizer", {"type": "AdamW", "params": {}}).setdefault("params", {})
        cfg["optimizer"]["params"]["lr"] = lr
    cfg.pop("scheduler", None)  # the trainer owns the LR schedule (warmup + decay)
    return cfg


def inference_config(cfg: dict[str, Any], world_size: int, lora_threshold: int) -> dict[str, Any]:
    """The JSON for an inference-only engine: no optimizer (DeepSpeed then builds only the
    ZeRO-3 parameter hooks), no monitors, batch sizes consistent with this world size."""
    out = prepare_for_run(
        cfg, batch_layout(cfg, world_size), Path("."), lora_threshold or None, None
    )
    out.pop("optimizer", None)
    for monitor in ("tensorboard", "csv_monitor", "wandb", "comms_logger", "flops_profiler"):
        out.pop(monitor, None)
    return out
