"""The trainer's settings: one dataclass, validated when built; `lora-dist train`'s flags.

Batch sizes, precision, ZeRO stage, optimizer and TP degree are not here: they come from the
DeepSpeed JSON named by --ds_config, so that one file describes the run's layout.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lora_dist.data.reading import is_user_data
from lora_dist.distributed.host_memory import MMAP_THRESHOLD
from lora_dist.errors import ConfigError
from lora_dist.models import BUILTIN, check_model
from lora_dist.settings import Options, existing_dir, existing_file, option, output_dir
from lora_dist.targets import PRESET_NAMES
from lora_dist.tasks import TASK_MODULES


@dataclass
class TrainConfig(Options):
    """Everything one training run needs besides the DeepSpeed JSON."""

    ds_config: str = "ds_configs/zero3.json"
    """DeepSpeed JSON: batch sizes, precision, ZeRO stage, optimizer, TP"""
    model: str | None = None
    """a built-in model (smollm2-135m-instruct, tiny) or a local Hugging Face causal-LM
    directory (default: smollm2-135m-instruct)"""
    task: str = "wikisql"
    """task: wikisql, e2e, samsum or mnli"""
    data: str | None = None
    """directory of the task's files (default: the shipped sample), or your own data: a
    .jsonl/.json/.parquet/.arrow file or a save_to_disk directory (docs/user-data.md)"""
    dev_data: str | None = None
    """your own dev file, in the format of --data (default: --dev_fraction of --data)"""
    dev_fraction: float = option(0.05, above=0, below=1)
    """without --dev_data: the share of --data's rows held out for dev, chosen by --seed"""
    data_format: Literal["messages", "sharegpt", "alpaca", "completion"] | None = None
    """the format of your own data (default: detected from its columns)"""
    skip_bad_rows: bool = False
    """skip unusable rows of your own data and count them by kind, instead of stopping at the
    first with its file and line"""
    overlong: Literal["truncate", "drop"] = "truncate"
    """your own data: truncate an example longer than --max_length, or drop it (both counted)"""
    chat_template: str | None = None
    """'plain' or a Jinja file, for a model whose tokenizer has no chat template (default: the
    tokenizer's own)"""
    packing: bool = False
    """pack several examples into each --max_length row; train_batch_size then counts rows"""
    data_cache: str | None = None
    """where your own data is tokenized to, once per node (default: $LORA_DIST_CACHE/data)"""
    output_dir: str = "runs/default"
    """where adapter/, tensorboard/, checkpoints/ and metrics.json go"""
    max_steps: int | None = option(None, minimum=1)
    """optimizer steps; overrides --epochs when set"""
    epochs: float = option(2.0, above=0)
    """passes over the training split when --max_steps is not set (the paper's 2)"""
    lora_r: int = option(8, minimum=1)
    """LoRA rank r"""
    lora_alpha: float = option(16.0, above=0)
    """LoRA alpha; the update is scaled by alpha/r"""
    lora_dropout: float = option(0.0, minimum=0, below=1)
    """dropout on the LoRA input"""
    lora_targets: str = "attn"
    """preset (attn = q,v as in the paper; attn-all; all; all-linear), comma-separated
    module-name suffixes, or re:REGEX"""
    use_rslora: bool = False
    """scale by alpha/sqrt(r) (rsLoRA) instead of alpha/r"""
    lr: float | None = option(None, above=0)
    """peak learning rate (default: the optimizer lr in the JSON)"""
    lr_schedule: Literal["linear", "cosine", "constant"] = "linear"
    """decay after warmup: linear, cosine or constant"""
    warmup_steps: int = option(10, minimum=0)
    """linear warmup steps"""
    seed: int = option(1234, minimum=0)
    """seed for LoRA initialisation, data order and dropout"""
    max_length: int = option(256, minimum=2)
    """longest prompt+target in tokens; longer examples are truncated"""
    eval_every: int | None = option(None, minimum=1)
    """dev-loss evaluation every N steps (default: 5 per run)"""
    skip_task_eval: bool = False
    """skip generating on the dev split and scoring it at the end"""
    task_eval_every: int | None = option(None, minimum=1)
    """also run the task evaluation every N steps"""
    eval_max_new_tokens: int = option(64, minimum=1)
    """longest generated answer in the task evaluation"""
    eval_batch_size: int = option(32, minimum=1)
    """prompts decoded together per rank in the task evaluation"""
    eval_limit: int | None = option(None, minimum=1)
    """score the task metric on the first N dev prompts only"""
    full_finetune: bool = False
    """train every weight (the paper's baseline) instead of LoRA"""
    activation_checkpointing: bool = False
    """recompute activations in the backward pass"""
    save_every: int | None = option(None, minimum=1)
    """write a resumable checkpoint every N steps"""
    keep_last: int = option(2, minimum=1)
    """resumable checkpoints to keep (older ones are deleted)"""
    host_mmap_threshold: int = option(MMAP_THRESHOLD, minimum=0)
    """bytes from which host allocations are mmapped at a fixed glibc threshold, so freed
    ZeRO-3 gather buffers leave RSS (0: glibc's dynamic default; MALLOC_MMAP_THRESHOLD_ wins)"""
    resume: str | None = None
    """'auto' for the latest valid checkpoint in --output_dir, or a checkpoint path"""

    def validate(self) -> None:
        """Everything that can be checked without loading anything, so a typo fails at once."""
        existing_file("--ds_config", self.ds_config)
        if self.model is not None and self.model not in BUILTIN:
            check_model(self.model)
        if not is_user_data(self.data):
            existing_dir("--data", self.data)
        if self.dev_data is not None and not (
            is_user_data(self.data) and is_user_data(self.dev_data)
        ):
            raise ConfigError(
                f"--dev_data {self.dev_data} needs --data and --dev_data to be your own data "
                "files (.jsonl, .json, .parquet, .arrow or a save_to_disk directory)"
            )
        if self.chat_template not in (None, "plain"):
            existing_file("--chat_template", self.chat_template)
        output_dir("--output_dir", self.output_dir)
        if self.task not in TASK_MODULES:
            raise ConfigError(f"--task {self.task!r} is not one of: {', '.join(TASK_MODULES)}")
        check_targets(self.lora_targets)
        if self.resume not in (None, "auto") and not Path(self.resume).is_dir():
            raise ConfigError(
                f"--resume {self.resume} is not a checkpoint directory; pass 'auto' or a "
                "checkpoints/step-N directory"
            )
        if self.full_finetune and (self.save_every or self.resume):
            raise ConfigError(
                "--save_every/--resume checkpoint LoRA state only; --full_finetune is the "
                "memory and accuracy baseline and keeps no checkpoints"
            )


def check_targets(spec: str) -> None:
    """Refuse a --lora_targets value that no model could resolve (empty, or a broken regex)."""
    text = spec.strip()
    if text.startswith("re:"):
        try:
            re.compile(text[3:])
        except re.error as exc:
            raise ConfigError(f"--lora_targets {spec!r} is not a valid regex: {exc}") from None
        return
    if text in PRESET_NAMES:
        return
    if not [t for t in text.split(",") if t.strip()]:
        raise ConfigError(
            f"--lora_targets {spec!r} names no module; use a preset "
            f"({', '.join(PRESET_NAMES)}), module-name suffixes such as q_proj,v_proj, or re:REGEX"
        )
