"""Generate on a dev split and score it with the task metric; write eval.json and predictions.

Loads a base (+ an adapter, merged or not, under ZeRO-3 or not). With `--data` naming your own
chat or prompt/completion file, every row is answered (a conversation ending on an assistant
turn is asked what comes before it) and scored by exact match and ROUGE-L where the data holds
the answer; the answers go to generations.jsonl. Launch forms that work:

    lora-dist eval --adapter runs/x/adapter --limit 64
    deepspeed --num_gpus 2 --module lora_dist.cli eval --ds_config Z3.json ...
    deepspeed --num_gpus 2 --module lora_dist.commands.eval --ds_config Z3.json ...
    torchrun --nproc_per_node 2 -m lora_dist.cli eval --ds_config Z3.json ...
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import deepspeed
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lora_dist import cli
from lora_dist.adapter import load_adapter, read_adapter_config, resolve_adapter_dir
from lora_dist.atomic import write_json_atomic, write_jsonl_atomic
from lora_dist.commands.options import Options, option
from lora_dist.data.chat import ChatRenderer
from lora_dist.data.freeform import evaluate_generations, generation_items
from lora_dist.data.reading import is_user_data, read_rows
from lora_dist.distributed.collective import all_done_fn, gather_objects_to_main, node_main_first
from lora_dist.distributed.ds_config import inference_config, load_ds_config, tp_size
from lora_dist.distributed.launch import (
    discover_ranks,
    init_distributed,
    prepare_rank_process,
    shutdown_distributed,
)
from lora_dist.distributed.loading import load_base_model
from lora_dist.distributed.zero import lora_persistence_threshold, merge_sharded, zero_stage
from lora_dist.errors import ConfigError
from lora_dist.models import cache_root, resolve_model_dir
from lora_dist.settings import existing_dir, existing_file, output_dir
from lora_dist.tasks import TASK_MODULES, get_task
from lora_dist.training.evaluation import DataShard, Decoding, EvalSplit, evaluate_task


@dataclass
class EvalOptions(Options):
    """Everything `lora-dist eval` needs."""

    model: str | None = option(None, aliases=("--base",))
    """a built-in model (smollm2-135m-instruct, tiny) or a base model directory; default: the
    adapter's recorded base if it exists, else smollm2-135m-instruct"""
    adapter: str | None = None
    """an adapter directory, or a run/checkpoint directory holding one in adapter/; omit it to
    evaluate the bare base"""
    task: str = "wikisql"
    """task: wikisql, e2e, samsum or mnli"""
    data: str | None = None
    """directory of the task's files (default: the sample shipped with the task), or your own
    chat or prompt/completion file (.jsonl, .json, .parquet, .arrow, save_to_disk directory)"""
    data_format: Literal["messages", "sharegpt", "alpaca", "completion"] | None = None
    """the format of your own data (default: detected from its columns)"""
    chat_template: str | None = None
    """'plain' or a Jinja file, for a model whose tokenizer has no chat template"""
    skip_bad_rows: bool = False
    """skip unusable rows of your own data instead of stopping at the first"""
    split: str = "dev"
    """the split to generate on (the task's file names say which exist)"""
    merged: bool = False
    """fold the LoRA update into the base weights before generating"""
    max_new_tokens: int = option(64, minimum=1, aliases=("--eval_max_new_tokens",))
    """longest generated answer"""
    batch_size: int = option(8, minimum=1, aliases=("--eval_batch_size",))
    """prompts per generation batch on each rank"""
    limit: int | None = option(None, minimum=1, aliases=("--eval_limit",))
    """evaluate only the first N distinct prompts of the split"""
    ds_config: str | None = None
    """a DeepSpeed JSON (e.g. ZeRO-3) to load the model under; default: a plain model"""
    output_dir: str = "runs/eval"
    """where eval.json and predictions.jsonl go"""

    def validate(self) -> None:
        if self.task not in TASK_MODULES:
            raise ConfigError(f"--task {self.task!r} is not one of: {', '.join(TASK_MODULES)}")
        if not is_user_data(self.data):
            existing_dir("--data", self.data)
        if self.chat_template not in (None, "plain"):
            existing_file("--chat_template", self.chat_template)
        existing_dir("--adapter", self.adapter)
        existing_file("--ds_config", self.ds_config)
        output_dir("--output_dir", self.output_dir)
        if self.merged and self.adapter is None:
            raise ConfigError("--merged needs --adapter: there is nothing to merge")


OPTIONS = EvalOptions


@dataclass
class EvalModel:
    """A model ready to generate, and where it came from."""

    model: Any
    tokenizer: Any
    tp: int
    """Tensor-parallel degree: ranks of one TP group decode the same prompts."""
    base_dir: Path
    adapter_dir: Path | None


def base_dir_for(opts: EvalOptions, adapter_dir: Path | None) -> Path:
    """--model, else the base the adapter records when that directory exists, else the default."""
    if opts.model is None and adapter_dir is not None:
        recorded = read_adapter_config(adapter_dir).get("base_model_name_or_path")
        if recorded and (Path(recorded) / "config.json").is_file():
            return Path(recorded)
    return resolve_model_dir(opts.model)


def load_for_eval(opts: EvalOptions, world_size: int, local_rank: int) -> EvalModel:
    """Load the base (under ZeRO-3 when --ds_config says so), the adapter, and merge."""
    adapter_dir = resolve_adapter_dir(opts.adapter) if opts.adapter else None
    model_dir = base_dir_for(opts, adapter_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    raw = load_ds_config(opts.ds_config) if opts.ds_config else None
    if raw is not None:
        model = load_base_model(model_dir, raw, zero_stage(raw))
    else:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.requires_grad_(False)
    if adapter_dir is not None:
        load_adapter(model, adapter_dir)
        model.requires_grad_(False)
    if opts.merged:
        merge_sharded(model)
    if raw is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
        return EvalModel(model.to(device).eval(), tokenizer, 1, model_dir, adapter_dir)
    ds_cfg = inference_config(raw, world_size, lora_persistence_threshold(model))
    engine, *_ = deepspeed.initialize(model=model, config=ds_cfg)
    return EvalModel(engine.module.eval(), tokenizer, tp_size(raw), model_dir, adapter_dir)


def evaluate_user_data(opts: EvalOptions) -> dict[str, Any] | None:
    """`lora-dist eval --data FILE` on your own data; the eval.json payload on rank 0."""
    info = discover_ranks()
    if opts.ds_config or info.world_size > 1:
        info = init_distributed()
    with node_main_first(info.local_rank):
        rows = read_rows(
            str(opts.data),
            cache_root() / "data",
            opts.data_format,
            opts.skip_bad_rows,
            require_answer=False,
        )
    loaded = load_for_eval(opts, info.world_size, info.local_rank)
    tokenizer = loaded.tokenizer
    renderer = None if rows.fmt == "completion" else ChatRenderer(tokenizer, opts.chat_template)
    items = generation_items(rows.dataset, rows.fmt, tokenizer, renderer, opts.limit)
    metrics, records = evaluate_generations(
        loaded.model,
        tokenizer,
        items,
        info.rank // loaded.tp,
        info.world_size // loaded.tp,
        opts.max_new_tokens,
        opts.batch_size,
        all_done=all_done_fn(),
        gather=gather_objects_to_main,
    )
    if info.rank != 0:
        return None
    out = Path(opts.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "data": str(opts.data),
        "format": rows.fmt,
        "metrics": metrics,
        "n": len(records),
        "bad_rows_skipped": rows.skipped,
        "adapter": str(loaded.adapter_dir) if loaded.adapter_dir else None,
        "base": str(loaded.base_dir),
        "merged": opts.merged,
        "max_new_tokens": opts.max_new_tokens,
        "limit": opts.limit,
        "world_size": info.world_size,
    }
    write_json_atomic(out / "eval.json", payload)
    write_jsonl_atomic(out / "generations.jsonl", records)
    print(f"{opts.data}: {json.dumps(metrics)} -> {out}", file=sys.stderr)
    return payload


def evaluate(opts: EvalOptions) -> dict[str, Any] | None:
    """Run `lora-dist eval`; returns the eval.json payload on rank 0, None elsewhere."""
    if is_user_data(opts.data):
        return evaluate_user_data(opts)
    task = get_task(opts.task)
    data_dir = Path(opts.data) if opts.data else task.sample_dir()
    split = EvalSplit(task, data_dir, opts.split, opts.limit)
    split.rows()  # a missing file or a bad row fails here, before any model is loaded
    info = discover_ranks()
    if opts.ds_config or info.world_size > 1:
        info = init_distributed()
    loaded = load_for_eval(opts, info.world_size, info.local_rank)
    dp = info.world_size // loaded.tp  # batch_layout has checked that TP divides the world
    decoding = Decoding(opts.max_new_tokens, opts.batch_size)
    shard = DataShard(info.rank // loaded.tp, dp)
    metrics, records = evaluate_task(loaded.model, loaded.tokenizer, split, decoding, shard)
    if info.rank != 0:
        return None
    out = Path(opts.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "task": task.name,
        "split": opts.split,
        "metrics": metrics,
        "n": len(records),
        "adapter": str(loaded.adapter_dir) if loaded.adapter_dir else None,
        "base": str(loaded.base_dir),
        "merged": opts.merged,
        "max_new_tokens": opts.max_new_tokens,
        "limit": opts.limit,
        "world_size": info.world_size,
        "ds_config": opts.ds_config,
    }
    write_json_atomic(out / "eval.json", payload)
    write_jsonl_atomic(out / "predictions.jsonl", records)
    print(f"{task.name}/{opts.split}: {json.dumps(metrics)} -> {out}", file=sys.stderr)
    return payload


def run(opts: EvalOptions) -> int:
    prepare_rank_process()
    evaluate(opts)
    shutdown_distributed()
    return 0


if __name__ == "__main__":  # deepspeed --module lora_dist.commands.eval ...
    sys.exit(cli.main(["eval", *sys.argv[1:]]))
