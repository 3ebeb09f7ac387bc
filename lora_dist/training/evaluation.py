"""Evaluation by generation: greedy-decode a split on every rank, gather to rank 0, score there.

`evaluate_task` is the core: rank k decodes its `shard_indices` slice of the distinct prompts,
every rank runs the same number of forward passes (ZeRO-3 gathers collectively), and rank 0
restores dataset order and scores with the task's metric. `evaluate_engine` is what the trainer
calls; `lora-dist eval` loads a base (+ adapter, merged or not, under ZeRO-3 or not) and writes
eval.json and predictions.jsonl.

Launch forms that work (the deepspeed launcher puts `--local_rank=N` before the script's own
arguments, which the `lora-dist` subcommand parser cannot take, hence `--no_local_rank`):

    lora-dist eval --adapter runs/x/adapter --limit 64
    deepspeed --num_gpus 2 --no_local_rank --module lora_dist.cli eval --ds_config Z3.json ...
    deepspeed --num_gpus 2 --module lora_dist.training.evaluation --ds_config Z3.json ...
    torchrun --nproc_per_node 2 -m lora_dist.cli eval --ds_config Z3.json ...
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from lora_dist.adapter import resolve_adapter_dir
from lora_dist.atomic import write_json_atomic, write_jsonl_atomic
from lora_dist.data import encode_prompt
from lora_dist.generate import greedy_generate, num_batches_for, shard_indices
from lora_dist.tasks.base import Task

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

Gather = Callable[[Any], "list[Any] | None"]


@dataclass
class EvalConfig:
    """Everything `lora-dist eval` needs."""

    base: str | None = None
    """Base model directory; default: the adapter's recorded base if it exists, else the
    embedded small LLaMA."""
    adapter: str | None = None
    """An adapter directory, or a run/checkpoint directory holding one in `adapter/`;
    omit it to evaluate the bare base."""
    task: str = "wikisql"
    """Task name (see lora_dist.tasks)."""
    data: str | None = None
    """Directory of the task's files; default: the sample shipped with the task."""
    split: str = "dev"
    merged: bool = False
    """Fold the LoRA update into the base weights before generating."""
    max_new_tokens: int = 64
    batch_size: int = 8
    """Prompts per generation batch on each rank."""
    limit: int | None = None
    """Evaluate only the first N distinct prompts of the split."""
    ds_config: str | None = None
    """A DeepSpeed JSON (e.g. ZeRO-3) to load the model under; default: a plain model."""
    output_dir: str = "runs/eval"
    """Where eval.json and predictions.jsonl go."""


class _PromptTokenizer:
    """The tokenizer as greedy_generate sees it: prompts encode exactly as in training.

    greedy_generate tokenizes with the tokenizer's defaults, which need not add BOS (GPT-2's
    does not) while training always conditions on BOS + prompt (`encode_prompt`).
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer

    def __call__(self, text: str) -> dict[str, list[int]]:
        return {"input_ids": encode_prompt(self._tokenizer, text)}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)


def distinct_prompts(prompts: list[str], limit: int | None) -> tuple[list[int], list[int]]:
    """(first row of each distinct prompt, the rows scored), both in dataset order.

    Greedy decoding gives one answer per prompt, so a prompt shared by several rows (E2E's
    one MR with many references) is generated once; `task.score` then sees that prediction on
    each of its rows, and E2E's `group_by_mr` keeps one per MR. `limit` counts distinct prompts.
    """
    first: dict[str, int] = {}
    for i, p in enumerate(prompts):
        if p not in first and (limit is None or len(first) < limit):
            first[p] = i
    rows = [i for i, p in enumerate(prompts) if p in first]
    return list(first.values()), rows


def evaluate_task(
    model: Any,
    tokenizer: Any,
    task: Task,
    data_dir: Path,
    split: str,
    rank: int,
    world_size: int,
    max_new_tokens: int,
    batch_size: int,
    limit: int | None = None,
    all_done: Callable[[bool], bool] | None = None,
    gather: Gather | None = None,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Generate on `split`, sharded as shard `rank` of `world_size`; score on the main rank.

    `rank`/`world_size` choose the data shard: under tensor parallelism pass the data-parallel
    rank and degree so a TP group decodes the same prompts. `all_done` and `gather` default to
    the collectives over the default process group (local no-ops in one process); the main rank
    is the one `gather` returns a list on. Returns (metrics, prediction records) there and
    ({}, []) elsewhere.
    """
    from lora_dist.distributed.collective import all_done_fn, gather_objects_to_main

    all_done = all_done if all_done is not None else all_done_fn()
    gather = gather if gather is not None else gather_objects_to_main
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    rows = task.load_split(Path(data_dir), split).to_list()
    prompts = [task.prompt(r) for r in rows]
    items, scored = distinct_prompts(prompts, limit)
    mine = shard_indices(len(items), rank, world_size)
    texts = greedy_generate(
        model,
        _PromptTokenizer(tokenizer),
        [prompts[items[i]] for i in mine],
        max_new_tokens,
        batch_size,
        all_done=all_done,
        num_batches=num_batches_for(len(items), world_size, batch_size),
    )
    parts = gather({"items": mine, "texts": texts})
    if parts is None:
        return {}, []
    by_item: dict[int, str] = {}
    for part in parts:  # tensor-parallel peers send the same shard: the first copy is kept
        for i, text in zip(part["items"], part["texts"], strict=True):
            by_item.setdefault(i, text)
    missing = sorted(set(range(len(items))) - by_item.keys())
    if missing:
        raise RuntimeError(f"no prediction gathered for items {missing[:5]}: shards disagree")
    prediction_of = {prompts[items[i]]: text for i, text in by_item.items()}
    predictions = [prediction_of[prompts[r]] for r in scored]
    metrics = dict(task.score(predictions, [rows[r] for r in scored], Path(data_dir)))
    records = []
    for i in range(len(items)):
        row = rows[items[i]]
        record = {
            "index": items[i],
            "prompt": prompts[items[i]],
            "prediction": by_item[i],
            "target": task.target(row),
        }
        if row.get("references"):
            record["references"] = list(row["references"])
        records.append(record)
    return metrics, records


def evaluate_engine(
    module: Any,
    tokenizer: Any,
    task: Task,
    data_dir: Path,
    split: str,
    rank: int,
    world_size: int,
    dp_rank: int,
    dp: int,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    limit: int | None = None,
    predictions_path: Path | None = None,
) -> dict[str, float] | None:
    """Task metrics of a live (possibly ZeRO-3 / TP) model on rank 0; None on other ranks.

    Every rank must call it at the same point. Shards by (dp_rank, dp), so ranks of one
    tensor-parallel group decode the same prompts. Rank 0 also writes `predictions_path`.
    """
    if dp < 1 or world_size % dp or not 0 <= dp_rank < dp:
        raise ValueError(f"bad layout: dp_rank={dp_rank} dp={dp} world_size={world_size}")
    metrics, records = evaluate_task(
        module, tokenizer, task, data_dir, split, dp_rank, dp, max_new_tokens, batch_size, limit
    )
    if rank != 0:
        return None
    if predictions_path is not None:
        Path(predictions_path).parent.mkdir(parents=True, exist_ok=True)
        write_jsonl_atomic(Path(predictions_path), records)
    return metrics


# --- `lora-dist eval`: load a base (+ adapter), generate, write eval.json -------------------


def _base_dir(cfg: EvalConfig, adapter_dir: Path | None) -> Path:
    from lora_dist.adapter import read_adapter_config
    from lora_dist.loading import resolve_model_dir

    if cfg.base is None and adapter_dir is not None:
        recorded = read_adapter_config(adapter_dir).get("base_model_name_or_path")
        if recorded and (Path(recorded) / "config.json").is_file():
            return Path(recorded)
    return resolve_model_dir(cfg.base)


def merge_sharded(model: torch.nn.Module) -> int:
    """Merge every LoRA layer, gathering each ZeRO-3 base weight whole while it is written.

    Every rank merges the same whole tensors; rank 0's result is what gets re-partitioned.
    Returns the number of merged layers.
    """
    from lora_dist.distributed.zero import gathered
    from lora_dist.lora import lora_layers

    layers = lora_layers(model)
    for layer in layers.values():
        params = [layer.base_layer.weight, layer.lora_A, layer.lora_B]
        with gathered(params, modifier_rank=0):
            layer.merge()
    return len(layers)


def _eval_ds_config(raw: dict[str, Any], world_size: int, threshold: int) -> dict[str, Any]:
    """The JSON for an inference-only engine: no optimizer (DeepSpeed then builds only the
    ZeRO-3 parameter hooks), no monitors, batch sizes consistent with this world size."""
    from lora_dist.distributed.ds_config import batch_layout, prepare_for_run

    cfg = prepare_for_run(raw, batch_layout(raw, world_size), Path("."), threshold or None, None)
    cfg.pop("optimizer", None)
    for monitor in ("tensorboard", "csv_monitor", "wandb", "comms_logger", "flops_profiler"):
        cfg.pop(monitor, None)
    return cfg


@dataclass
class EvalModel:
    """A model ready to generate, and where it came from."""

    model: Any
    tokenizer: Any
    tp: int
    """Tensor-parallel degree: ranks of one TP group decode the same prompts."""
    base_dir: Path
    adapter_dir: Path | None


def load_for_eval(cfg: EvalConfig, world_size: int, local_rank: int) -> EvalModel:
    """Load the base (under ZeRO-3 when cfg.ds_config says so), the adapter, and merge."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_dist.adapter import load_adapter
    from lora_dist.distributed.ds_config import ConfigError, load_ds_config, tp_size
    from lora_dist.distributed.loading import load_base_model
    from lora_dist.distributed.zero import lora_persistence_threshold, zero_stage

    adapter_dir = resolve_adapter_dir(cfg.adapter) if cfg.adapter else None
    model_dir = _base_dir(cfg, adapter_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    raw = load_ds_config(cfg.ds_config) if cfg.ds_config else None
    if raw is not None:
        model = load_base_model(model_dir, raw, zero_stage(raw))
    else:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.requires_grad_(False)
    if adapter_dir is not None:
        load_adapter(model, adapter_dir)
        model.requires_grad_(False)
    if cfg.merged:
        if adapter_dir is None:
            raise ConfigError("--merged needs --adapter: there is nothing to merge")
        merge_sharded(model)
    if raw is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
        return EvalModel(model.to(device).eval(), tokenizer, 1, model_dir, adapter_dir)
    import deepspeed

    ds_cfg = _eval_ds_config(raw, world_size, lora_persistence_threshold(model))
    engine, *_ = deepspeed.initialize(model=model, config=ds_cfg)
    return EvalModel(engine.module.eval(), tokenizer, tp_size(raw), model_dir, adapter_dir)


def evaluate(cfg: EvalConfig) -> dict[str, Any] | None:
    """Run `lora-dist eval`; returns the eval.json payload on rank 0, None elsewhere."""
    from lora_dist.distributed.ds_config import ConfigError
    from lora_dist.distributed.launch import discover_ranks, init_distributed
    from lora_dist.tasks import get_task

    if cfg.max_new_tokens < 1 or cfg.batch_size < 1 or (cfg.limit is not None and cfg.limit < 1):
        raise ConfigError("--max_new_tokens, --batch_size and --limit must be at least 1")
    task = get_task(cfg.task)
    data_dir = Path(cfg.data) if cfg.data else task.sample_dir()
    info = discover_ranks()
    if cfg.ds_config or info.world_size > 1:
        info = init_distributed()
    loaded = load_for_eval(cfg, info.world_size, info.local_rank)
    tp = loaded.tp  # batch_layout has checked that it divides the world size
    dp = info.world_size // tp
    metrics, records = evaluate_task(
        loaded.model,
        loaded.tokenizer,
        task,
        data_dir,
        cfg.split,
        info.rank // tp,
        dp,
        cfg.max_new_tokens,
        cfg.batch_size,
        cfg.limit,
    )
    if info.rank != 0:
        return None
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "task": task.name,
        "split": cfg.split,
        "metrics": metrics,
        "n": len(records),
        "adapter": str(loaded.adapter_dir) if loaded.adapter_dir else None,
        "base": str(loaded.base_dir),
        "merged": cfg.merged,
        "max_new_tokens": cfg.max_new_tokens,
        "limit": cfg.limit,
        "world_size": info.world_size,
        "ds_config": cfg.ds_config,
    }
    write_json_atomic(out / "eval.json", payload)
    write_jsonl_atomic(out / "predictions.jsonl", records)
    print(f"{task.name}/{cfg.split}: {json.dumps(metrics)} -> {out}", file=sys.stderr)
    return payload


def configure_eval(parser: argparse.ArgumentParser) -> None:
    defaults = EvalConfig()
    for f in fields(EvalConfig):
        default = getattr(defaults, f.name)
        flag = f"--{f.name}"
        if isinstance(default, bool):
            parser.add_argument(flag, action="store_true", default=default)
        else:
            kind = {"int": int}.get(str(f.type).split(" |")[0], str)
            parser.add_argument(flag, type=kind, default=default)
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)


def run_eval(args: argparse.Namespace) -> int:
    from lora_dist.adapter import AdapterError
    from lora_dist.distributed.ds_config import ConfigError

    cfg = EvalConfig(**{f.name: getattr(args, f.name) for f in fields(EvalConfig)})
    try:
        evaluate(cfg)
    except (ConfigError, AdapterError, FileNotFoundError) as exc:
        print(f"lora-dist eval: error: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m lora_dist.training.evaluation`: the eval flags without a subcommand."""
    parser = argparse.ArgumentParser(prog="lora_dist.training.evaluation", description=__doc__)
    configure_eval(parser)
    return run_eval(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
