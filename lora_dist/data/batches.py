"""What the training loop draws batches from: examples one per row, or packed rows.

Both kinds have `len()` (the units `training.schedule.DataOrder` permutes: examples, or
packs) and `batch(indices, device)`, which returns the model's keyword arguments and the token
counts the loop logs and weights by. The tokenized dataset stays memory-mapped Arrow; a batch reads
only its own rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
import torch

from lora_dist.data import collate
from lora_dist.data.chat import IGNORE_INDEX
from lora_dist.data.packing import (
    PackPlan,
    collate_packed,
    packed_model_inputs,
    packing_attention,
    plan_packs,
)


@dataclass
class Batch:
    """One micro-batch: model kwargs and how many tokens it holds."""

    inputs: dict[str, Any]
    tokens: int
    """real (non-pad) tokens"""
    loss_tokens: int
    """tokens the loss averages over (labels after the shift, not IGNORE_INDEX)"""


def _loss_tokens(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def token_lengths(tokens: datasets.Dataset) -> np.ndarray:
    """Every example's length: user data's `length` column, else counted from input_ids."""
    if "length" in tokens.column_names:
        return np.asarray(tokens.with_format("numpy", columns=["length"])[:]["length"])
    return np.fromiter((len(x) for x in tokens["input_ids"]), dtype=np.int64, count=len(tokens))


def _rows(tokens: datasets.Dataset) -> datasets.Dataset:
    return tokens.with_format("numpy", columns=["input_ids", "labels"])


class ExampleBatches:
    """One example per row, right-padded to the longest in the micro-batch."""

    def __init__(self, tokens: datasets.Dataset, pad_id: int) -> None:
        self.rows = _rows(tokens)
        self.pad_id = pad_id

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, indices: list[int], device: torch.device | str = "cpu") -> Batch:
        batch = collate([self.rows[int(i)] for i in indices], self.pad_id)
        tokens = int(batch["attention_mask"].sum())
        inputs = {k: v.to(device) for k, v in batch.items()}
        return Batch(inputs, tokens, _loss_tokens(batch["labels"]))


class PackedBatches:
    """Packed rows (lora_dist.data.packing): `indices` name packs, not examples."""

    def __init__(
        self,
        tokens: datasets.Dataset,
        max_length: int,
        pad_id: int,
        attn_implementation: str,
        dtype: torch.dtype,
        plan: PackPlan | None = None,
    ) -> None:
        self.rows = _rows(tokens)
        if plan is None:
            plan = plan_packs(token_lengths(tokens), max_length)
        self.plan = plan
        self.pad_id = pad_id
        self.attention = packing_attention(attn_implementation)
        self.dtype = dtype

    def __len__(self) -> int:
        return len(self.plan)

    def batch(self, indices: list[int], device: torch.device | str = "cpu") -> Batch:
        rows = [[self.rows[int(i)] for i in self.plan.pack(int(p))] for p in indices]
        batch = collate_packed(rows, self.pad_id)
        tokens = sum(len(ex["input_ids"]) for row in rows for ex in row)
        on_device = {k: v.to(device) for k, v in batch.items()}
        inputs = packed_model_inputs(on_device, self.attention, self.dtype)
        return Batch(inputs, tokens, _loss_tokens(batch["labels"]))
