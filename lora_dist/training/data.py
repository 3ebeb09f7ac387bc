"""The trainer's data: a task's files or the user's own, one example per row or packed.

`load_training_data` tokenizes the train and dev splits once per node (user data through
lora_dist.data.userdata under node_main_first; a task's files through tokenize_split) and, with
--packing, plans the packs from the lengths alone. The schedule permutes `units` (examples,
or packed rows), so a resumed run draws the same rows at every step; `identity` goes into the
checkpoint identity, so a resume onto other data, another max_length or other packs is
refused. `generation_eval` is the free-form evaluation of user data during training.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch

from lora_dist.atomic import write_jsonl_atomic
from lora_dist.data import tokenize_split
from lora_dist.data.batches import ExampleBatches, PackedBatches, token_lengths
from lora_dist.data.freeform import evaluate_generations, generation_items
from lora_dist.data.packing import PackPlan, plan_packs
from lora_dist.data.reading import is_user_data
from lora_dist.data.userdata import DataSpec, UserData, prepare_user_data
from lora_dist.distributed.collective import all_done_fn, gather_objects_to_main, node_main_first
from lora_dist.models import cache_root
from lora_dist.tasks.base import Task
from lora_dist.training.config import TrainConfig


@dataclass
class TrainingData:
    """Tokenized train and dev splits, the user data's report, and the pack plan."""

    train: datasets.Dataset
    dev: datasets.Dataset
    user: UserData | None
    """None for a task's files"""
    plan: PackPlan | None
    """None without --packing"""
    source: str

    @property
    def units(self) -> int:
        """What the schedule permutes and train_batch_size counts: examples, or packed rows."""
        return len(self.plan) if self.plan is not None else len(self.train)

    def identity(self) -> dict[str, Any] | None:
        """What a checkpoint of a packed or user-data run must match (None for a task run
        without packing, whose checkpoints have always been resumable as they are)."""
        if self.plan is None and self.user is None:
            return None
        lengths = token_lengths(self.train).astype("int64")
        return {
            "units": self.units,
            "lengths_sha256": hashlib.sha256(lengths.tobytes()).hexdigest()[:24],
            "packs": self.plan.fingerprint() if self.plan is not None else None,
        }

    def batches(
        self, pad_id: int, attn_implementation: str, dtype: torch.dtype
    ) -> tuple[ExampleBatches | PackedBatches, ExampleBatches | PackedBatches]:
        """(train, dev) batch sources; dev is packed too under --packing (same loss)."""
        if self.plan is None:
            return ExampleBatches(self.train, pad_id), ExampleBatches(self.dev, pad_id)
        max_length = self.plan.max_length
        train = PackedBatches(
            self.train, max_length, pad_id, attn_implementation, dtype, plan=self.plan
        )
        dev = PackedBatches(self.dev, max_length, pad_id, attn_implementation, dtype)
        return train, dev

    def summary(self) -> str:
        """One line for the run's log: sizes, packing, and what was skipped or cut."""
        text = f"data {self.source}: {len(self.train)} train / {len(self.dev)} dev examples"
        if self.plan is not None:
            text += f", packed into {len(self.plan)} rows ({self.plan.fill:.1%} full)"
        if self.user is not None:
            for split in filter(None, (self.user.train, self.user.dev)):
                r = split.report
                if r["bad_rows_skipped"]:
                    text += f"; {split.name}: bad rows skipped {r['bad_rows_skipped']}"
                if r["truncated"] or r["dropped"]:
                    text += f"; {split.name}: {r['truncated']} truncated, dropped {r['dropped']}"
        return text

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {"source": self.source, "units": self.units}
        if self.user is not None:
            out.update(self.user.report())
        if self.plan is not None:
            out["packing"] = {
                "rows": len(self.plan),
                "examples_per_row": len(self.train) / max(len(self.plan), 1),
                "fill": self.plan.fill,
            }
        return out


def user_data_spec(cfg: TrainConfig) -> DataSpec:
    return DataSpec(
        train=str(cfg.data),
        dev=cfg.dev_data,
        dev_fraction=0.0 if cfg.dev_data else cfg.dev_fraction,
        data_format=cfg.data_format,
        skip_bad_rows=cfg.skip_bad_rows,
        max_length=cfg.max_length,
        overlong=cfg.overlong,
        chat_template=cfg.chat_template,
        seed=cfg.seed,
    )


def load_training_data(
    cfg: TrainConfig, tokenizer: Any, task: Task, local_rank: int
) -> TrainingData:
    """Tokenize (once per node for user data) and plan the packs; see the module docstring."""
    user = None
    if is_user_data(cfg.data):
        cache = Path(cfg.data_cache) if cfg.data_cache else cache_root() / "data"
        progress = local_rank == 0 and os.environ.get("LORA_DIST_NO_PROGRESS") != "1"
        with node_main_first(local_rank):
            user = prepare_user_data(user_data_spec(cfg), tokenizer, cache, progress=progress)
        train, dev, source = user.train.tokens, user.dev.tokens, str(cfg.data)
    else:
        data_dir = Path(cfg.data) if cfg.data else task.sample_dir()
        train = tokenize_split(task, data_dir, "train", tokenizer, cfg.max_length)
        dev = tokenize_split(task, data_dir, "dev", tokenizer, cfg.max_length)
        source = f"{task.name}:{data_dir}"
    plan = plan_packs(token_lengths(train), cfg.max_length) if cfg.packing else None
    return TrainingData(train, dev, user, plan, source)


def generation_eval(
    module: Any,
    tokenizer: Any,
    user: UserData,
    cfg: TrainConfig,
    dp_rank: int,
    dp: int,
    path: Path,
    stop: Callable[[], bool] | None = None,
) -> dict[str, float] | None:
    """Greedy answers to the dev rows, scored by exact match and ROUGE-L (collective); rank 0
    writes `path` (JSONL) and returns the metrics, the other ranks return None. `stop` (a
    collective, asked after every batch) ends it early with generate.GenerationStopped."""
    items = generation_items(user.dev.rows, user.fmt, tokenizer, user.renderer, cfg.eval_limit)
    metrics, records = evaluate_generations(
        module,
        tokenizer,
        items,
        dp_rank,
        dp,
        cfg.eval_max_new_tokens,
        cfg.eval_batch_size,
        all_done=all_done_fn(),
        gather=gather_objects_to_main,
        stop=stop,
    )
    if not records:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl_atomic(path, records)
    return metrics
