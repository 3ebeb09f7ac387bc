"""Tokenization for training: prompt + target become input ids, with loss only on the target.

This module tokenizes the paper's tasks. Users' own files (chat and instruction formats, chat
templates, bad rows, packing, free-form evaluation) live beside it: formats, reading, chat,
userdata, packing, batches and freeform; docs/user-data.md describes them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import datasets
import torch

from lora_dist.errors import ConfigError, ModelError
from lora_dist.tasks.base import Task

IGNORE_INDEX = -100
"""Label value that `torch.nn.CrossEntropyLoss` (and HF causal LMs) skip."""

log = logging.getLogger(__name__)


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """BOS (if the tokenizer has one) + prompt tokens: what generation is conditioned on."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + tokenizer(prompt, add_special_tokens=False)["input_ids"]


def build_example(
    prompt_ids: list[int], target_ids: list[int], bos: list[int], eos: list[int], max_length: int
) -> tuple[dict[str, list[int]], bool]:
    """Join BOS + prompt + target + EOS; labels mask all but target + EOS. Returns (example,
    truncated). Over `max_length` the prompt loses tokens from the left first; only a target too
    long on its own is cut, from the right."""
    room = max_length - len(bos) - len(target_ids) - len(eos)
    truncated = len(prompt_ids) > room
    prompt_ids = prompt_ids[max(len(prompt_ids) - room, 0) :] if room > 0 else []
    answer = (target_ids + eos)[: max_length - len(bos)]
    input_ids = bos + prompt_ids + answer
    labels = [IGNORE_INDEX] * (len(bos) + len(prompt_ids)) + answer
    return {"input_ids": input_ids, "labels": labels}, truncated


def tokenize_split(
    task: Task, data_dir: Path, split: str, tokenizer: Any, max_length: int
) -> datasets.Dataset:
    """Load `split` of `task` and tokenize it into `input_ids` and `labels` columns."""
    if max_length < 2:
        raise ConfigError(f"max_length must be at least 2, got {max_length}")
    rows = task.load_split(Path(data_dir), split)
    prompts = [task.prompt(r) for r in rows]
    targets = [task.target(r) for r in rows]
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"] if prompts else []
    target_ids = tokenizer(targets, add_special_tokens=False)["input_ids"] if targets else []
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    if tokenizer.eos_token_id is None:
        raise ModelError("the tokenizer has no EOS token; generation could never stop")
    eos = [tokenizer.eos_token_id]
    columns: dict[str, list[list[int]]] = {"input_ids": [], "labels": []}
    n_truncated = 0
    for p, t in zip(prompt_ids, target_ids, strict=True):
        example, truncated = build_example(p, t, bos, eos, max_length)
        n_truncated += truncated
        columns["input_ids"].append(example["input_ids"])
        columns["labels"].append(example["labels"])
    if n_truncated:
        log.warning(
            "%s/%s: %d of %d examples exceed max_length=%d and were truncated (prompt first)",
            task.name,
            split,
            n_truncated,
            len(prompts),
            max_length,
        )
    features = datasets.Features(
        {
            "input_ids": datasets.List(datasets.Value("int64")),
            "labels": datasets.List(datasets.Value("int64")),
        }
    )
    return datasets.Dataset.from_dict(columns, features=features)


def collate(features: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its longest example; padding gets attention 0 and label -100."""
    width = max(len(f["input_ids"]) for f in features)
    input_ids = torch.full((len(features), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(features), width), dtype=torch.long)
    labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        input_ids[i, :n] = torch.as_tensor(f["input_ids"], dtype=torch.long)
        attention_mask[i, :n] = 1
        labels[i, :n] = torch.as_tensor(f["labels"], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
