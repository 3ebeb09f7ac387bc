"""The running batch's KV cache and masks: rows join and leave between decoding steps.

Rows are right-aligned: row i's real tokens fill the last columns of the cache and its attention
mask has zeros on the left. A joining group (prefilled together, left-padded) is padded on the
left to the running batch's width and stacked under it; finished rows are dropped; columns that
no remaining row uses are trimmed from the left, so the cache stays as wide as its longest row.
Positions come from each row's own token count, so padding never shifts rotary positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache


def _layers(cache: DynamicCache) -> list:
    return list(cache.layers)


@dataclass
class Batch:
    """The state of the rows being decoded together."""

    cache: DynamicCache
    """Keys and values of every row, (rows, heads, width, head_dim) per layer."""
    mask: torch.Tensor
    """(rows, width): 1 where a row has a real token."""
    positions: torch.Tensor
    """(rows,): the position of each row's next token (its token count so far)."""
    slots: torch.Tensor
    """(rows,): each row's adapter slot."""

    @property
    def rows(self) -> int:
        return int(self.mask.shape[0])

    @property
    def width(self) -> int:
        return int(self.mask.shape[1])

    def widen(self, width: int) -> None:
        """Pad every row on the left to `width` columns."""
        extra = width - self.width
        if extra <= 0:
            return
        self.mask = F.pad(self.mask, (extra, 0))
        for layer in _layers(self.cache):
            layer.keys = F.pad(layer.keys, (0, 0, extra, 0))
            layer.values = F.pad(layer.values, (0, 0, extra, 0))

    def extend(self, other: Batch) -> None:
        """Stack `other`'s rows under this batch's rows."""
        width = max(self.width, other.width)
        self.widen(width)
        other.widen(width)
        self.mask = torch.cat([self.mask, other.mask])
        self.positions = torch.cat([self.positions, other.positions])
        self.slots = torch.cat([self.slots, other.slots])
        for mine, theirs in zip(_layers(self.cache), _layers(other.cache), strict=True):
            mine.keys = torch.cat([mine.keys, theirs.keys])
            mine.values = torch.cat([mine.values, theirs.values])

    def keep(self, rows: list[int]) -> None:
        """Keep only `rows` (in that order), then trim columns no row uses any more."""
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        self.mask = self.mask[index]
        self.positions = self.positions[index]
        self.slots = self.slots[index]
        used = self.mask.any(dim=0).nonzero()
        first = int(used[0]) if used.numel() else self.width
        self.mask = self.mask[:, first:]
        for layer in _layers(self.cache):
            layer.keys = layer.keys[index, :, first:]
            layer.values = layer.values[index, :, first:]

    def step_inputs(self, tokens: torch.Tensor, cache_arg: str = "cache") -> dict:
        """Forward-pass arguments that feed each row its next token (rows,)."""
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        inputs = {
            "input_ids": tokens[:, None],
            "attention_mask": self.mask,
            "position_ids": self.positions[:, None],
            cache_arg: self.cache,
            "use_cache": True,
        }
        self.positions = self.positions + 1
        return inputs


def left_padded(
    prompts: list[list[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input ids, attention mask, position ids) of prompts padded on the left."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)
