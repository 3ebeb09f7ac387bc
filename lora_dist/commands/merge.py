"""Fold an adapter into a base model directory, shard by shard (see lora_dist.merge)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lora_dist.commands.options import Options, option
from lora_dist.errors import ConfigError
from lora_dist.merge import DEFAULT_MAX_SHARD, merge_checkpoint, parse_size
from lora_dist.settings import existing_dir, output_dir


@dataclass
class MergeOptions(Options):
    """`lora-dist merge --model BASE --adapter DIR --output_dir OUT`."""

    model: Path = option(aliases=("--base",))
    """base model directory (safetensors)"""
    adapter: Path = option()
    """adapter directory, or a training run or checkpoint directory holding adapter/"""
    output_dir: Path = option(aliases=("--out",))
    """merged model directory to write"""
    dtype: Literal["bf16", "fp16", "fp32"] | None = None
    """cast the merged weights; default: keep the base's dtype"""
    max_shard_size: str = DEFAULT_MAX_SHARD
    """largest output shard, e.g. 2GB, 500MB or 1GiB"""
    overwrite: bool = False
    """replace a non-empty --output_dir"""

    def validate(self) -> None:
        existing_dir("--model", self.model)
        existing_dir("--adapter", self.adapter)
        output_dir("--output_dir", self.output_dir)
        try:
            parse_size(self.max_shard_size)
        except ConfigError as exc:
            raise ConfigError(f"--max_shard_size: {exc}") from None


OPTIONS = MergeOptions


def run(opts: MergeOptions) -> int:
    merge_checkpoint(
        opts.model, opts.adapter, opts.output_dir, opts.dtype, opts.max_shard_size, opts.overwrite
    )
    return 0
