"""The trainer's settings: one dataclass, and the command-line flags generated from it.

Batch sizes, precision, ZeRO stage, optimizer and TP degree are not here: they come from the
DeepSpeed JSON named by --ds_config, so that one file describes the run's layout.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields
from typing import Any

from lora_dist.distributed.host_memory import MMAP_THRESHOLD


def _opt(default: Any, help: str) -> Any:  # noqa: A002 - argparse's own word
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Everything one training run needs besides the DeepSpeed JSON."""

    ds_config: str = _opt(
        "ds_configs/zero3.json", "DeepSpeed JSON: batch sizes, precision, ZeRO stage, optimizer, TP"
    )
    model: str | None = _opt(
        None, "local Hugging Face causal-LM directory (default: the embedded small LLaMA)"
    )
    task: str = _opt("wikisql", "task: wikisql, e2e, samsum or mnli")
    data: str | None = _opt(None, "directory of the task's files (default: the shipped sample)")
    output_dir: str = _opt(
        "runs/default", "where adapter/, tensorboard/, checkpoints/ and metrics.json go"
    )
    max_steps: int | None = _opt(None, "optimizer steps; overrides --epochs when set")
    epochs: float = _opt(8.0, "passes over the training split when --max_steps is not set")
    lora_r: int = _opt(8, "LoRA rank r")
    lora_alpha: float = _opt(16.0, "LoRA alpha; the update is scaled by alpha/r")
    lora_dropout: float = _opt(0.0, "dropout on the LoRA input")
    lora_targets: str = _opt(
        "attn",
        "preset (attn = q,v as in the paper; attn-all; all; all-linear), "
        "comma-separated module-name suffixes, or re:REGEX",
    )
    use_rslora: bool = _opt(False, "scale by alpha/sqrt(r) (rsLoRA) instead of alpha/r")
    lr: float | None = _opt(None, "peak learning rate (default: the optimizer lr in the JSON)")
    lr_schedule: str = _opt("linear", "decay after warmup: linear or cosine")
    warmup_steps: int = _opt(10, "linear warmup steps")
    seed: int = _opt(1234, "seed for LoRA initialisation, data order and dropout")
    max_length: int = _opt(256, "longest prompt+target in tokens; longer examples are truncated")
    eval_every: int | None = _opt(None, "dev-loss evaluation every N steps (default: 5 per run)")
    skip_task_eval: bool = _opt(False, "skip generating on the dev split and scoring it at the end")
    task_eval_every: int | None = _opt(None, "also run the task evaluation every N steps")
    eval_max_new_tokens: int = _opt(64, "longest generated answer in the task evaluation")
    eval_batch_size: int = _opt(32, "prompts decoded together per rank in the task evaluation")
    eval_limit: int | None = _opt(None, "score the task metric on the first N dev prompts only")
    full_finetune: bool = _opt(False, "train every weight (the paper's baseline) instead of LoRA")
    activation_checkpointing: bool = _opt(False, "recompute activations in the backward pass")
    save_every: int | None = _opt(None, "write a resumable checkpoint every N steps")
    keep_last: int = _opt(2, "resumable checkpoints to keep (older ones are deleted)")
    host_mmap_threshold: int = _opt(
        MMAP_THRESHOLD,
        "bytes from which host allocations are mmapped at a fixed glibc threshold, so freed "
        "ZeRO-3 gather buffers leave RSS (0: glibc's dynamic default; MALLOC_MMAP_THRESHOLD_ wins)",
    )
    resume: str | None = _opt(
        None, "'auto' for the latest valid checkpoint in --output_dir, or a checkpoint path"
    )


def configure_train(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, with its type, default and help."""
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        default = getattr(defaults, f.name)
        flag, text = f"--{f.name}", f.metadata["help"]
        if isinstance(default, bool):
            parser.add_argument(flag, action="store_true", default=default, help=text)
        else:
            kind = {"int": int, "float": float}.get(str(f.type).split(" |")[0], str)
            shown = "" if default is None else f" [{default}]"
            parser.add_argument(flag, type=kind, default=default, help=text + shown)
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
