"""Evaluating a live model, sharded or not: the dev loss, and generation scored by the task.

`evaluate_task` is the core of generation: rank k decodes its `shard_indices` slice of the
distinct prompts, every rank runs the same number of forward passes (ZeRO-3 gathers
collectively), and rank 0 restores dataset order and scores with the task's metric.
`evaluate_engine` adds the predictions file; the trainer calls it, and so does `lora-dist eval`
(lora_dist.commands.eval) after loading a base and an adapter. `dev_loss` is the token-weighted
loss over a tokenized split.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lora_dist.atomic import write_jsonl_atomic
from lora_dist.data import encode_prompt
from lora_dist.data.batches import ExampleBatches, PackedBatches
from lora_dist.distributed.collective import (
    all_done_fn,
    all_reduce_sum,
    gather_objects_to_main,
    is_main_process,
)
from lora_dist.distributed.ds_config import BatchLayout
from lora_dist.errors import ConfigError
from lora_dist.generate import greedy_generate, num_batches_for, shard_indices
from lora_dist.tasks.base import Task
from lora_dist.training.monitor import Progress


@dataclass(frozen=True)
class EvalSplit:
    """What to evaluate: one split of a task, optionally only its first `limit` distinct prompts."""

    task: Task
    data_dir: Path
    name: str = "dev"
    limit: int | None = None

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit must be at least 1, got {self.limit}")

    def rows(self) -> list[dict[str, Any]]:
        return self.task.load_split(Path(self.data_dir), self.name).to_list()


@dataclass(frozen=True)
class Decoding:
    """How to generate: greedy, at most `max_new_tokens`, `batch_size` prompts at a time."""

    max_new_tokens: int = 64
    batch_size: int = 8


@dataclass(frozen=True)
class DataShard:
    """Which prompts this rank decodes: shard `index` of `count`.

    Under tensor parallelism this is the data-parallel rank and degree, so the ranks of one
    TP group decode the same prompts.
    """

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"bad shard: index {self.index} of {self.count}")


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
    split: EvalSplit,
    decoding: Decoding,
    shard: DataShard = DataShard(),
    progress: Progress | None = None,
    stop: Callable[[], bool] | None = None,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Generate on `split` as `shard` of the prompts; score on the main rank.

    A collective over the default process group (local in one process): every rank calls it.
    Returns (metrics, prediction records) on rank 0 and ({}, []) elsewhere. `stop` (a
    collective, asked after every batch) ends it early with generate.GenerationStopped.
    """
    task = split.task
    rows = split.rows()
    prompts = [task.prompt(r) for r in rows]
    items, scored = distinct_prompts(prompts, split.limit)
    mine = shard_indices(len(items), shard.index, shard.count)
    texts = greedy_generate(
        model,
        _PromptTokenizer(tokenizer),
        [prompts[items[i]] for i in mine],
        decoding.max_new_tokens,
        decoding.batch_size,
        all_done=all_done_fn(),
        num_batches=num_batches_for(len(items), shard.count, decoding.batch_size),
        on_batch=progress,
        stop=stop,
    )
    parts = gather_objects_to_main({"items": mine, "texts": texts})
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
    metrics = dict(task.score(predictions, [rows[r] for r in scored], Path(split.data_dir)))
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
    split: EvalSplit,
    decoding: Decoding,
    shard: DataShard = DataShard(),
    predictions_path: Path | None = None,
    progress: Progress | None = None,
    stop: Callable[[], bool] | None = None,
) -> dict[str, float] | None:
    """Task metrics of a live (possibly ZeRO-3 / TP) model on rank 0; None on other ranks.

    Every rank must call it at the same point. Rank 0 also writes `predictions_path`.
    """
    metrics, records = evaluate_task(module, tokenizer, split, decoding, shard, progress, stop)
    if not is_main_process():
        return None
    if predictions_path is not None:
        Path(predictions_path).parent.mkdir(parents=True, exist_ok=True)
        write_jsonl_atomic(Path(predictions_path), records)
    return metrics


@torch.no_grad()
def dev_loss(
    engine: Any,
    batches: ExampleBatches | PackedBatches,
    layout: BatchLayout,
    dp_rank: int,
    progress: Progress | None = None,
) -> float:
    """Token-weighted mean loss over the whole split (examples or packed rows, the same loss),
    sharded over data-parallel ranks.

    Every rank runs the same number of forward passes (ZeRO-3 gathers collectively), so a
    rank whose shard runs out repeats a unit with weight zero.
    """
    engine.eval()
    n, dp, micro = len(batches), layout.dp, layout.micro_batch
    mine = list(range(dp_rank, n, dp))
    n_batches = math.ceil(math.ceil(n / dp) / micro)
    total = count = 0.0
    for b in range(n_batches):
        idx = mine[b * micro : (b + 1) * micro]
        weight = 1.0 if idx else 0.0
        batch = batches.batch(idx or [0], engine.device)
        loss = engine(**batch.inputs).loss.float().item()
        total += weight * loss * batch.loss_tokens
        count += weight * batch.loss_tokens
        if progress is not None:
            progress(b + 1, n_batches)
    engine.train()
    total, count = all_reduce_sum([total / layout.tp, count / layout.tp], engine.device)
    return total / max(count, 1.0)
