"""Sequence packing: several examples share one row, with nothing leaking between them.

A packed row holds whole examples back to back (an example is never split across rows).
Inside a row:
- positions restart at 0 for every example, as if it were alone;
- no token attends across an example boundary. For SDPA and eager attention the model gets an
  explicit block-diagonal causal mask (4D, additive, in the model's dtype). For flash
  attention it gets the varlen form instead: `position_ids` plus `cu_seq_lens_q/k` and
  `max_length_q/k`, which transformers passes to the varlen kernel;
- labels stay per example: the first label of every example is IGNORE_INDEX, so the shifted
  loss never asks the last token of one example to predict the first of the next.
Padding at the end of a row is its own segment (labels IGNORE_INDEX), so no attention row is
ever fully masked and nothing NaN can reach a gradient.

Why not transformers' own packed-sequence detection (position_ids without an attention mask,
masking_utils.find_packed_sequence_indices)? In transformers 5.24 it only runs when no cache
exists, and LlamaModel creates a DynamicCache whenever `use_cache` is true, which is the
config default even in training: the mask then silently stays plain causal across examples.
The explicit mask does not depend on that flag (the inputs still pass use_cache=False).

The HF loss of a packed micro-batch is the mean over its loss tokens, i.e. the token-weighted
mean of the packed examples' own losses; tests/test_packing.py checks this and the LoRA
gradients against the examples run one by one.

`plan_packs` is best-fit decreasing over the example lengths: deterministic (ties broken by
example index), computed once from the lengths alone, so a resumed run rebuilds the same packs
and `training.schedule.DataOrder` over packs gives the same batches at every step.
"""

from __future__ import annotations

import bisect
import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lora_dist.data.chat import IGNORE_INDEX
from lora_dist.errors import ConfigError

MASK_ATTENTION = ("sdpa", "eager")


@dataclass(frozen=True)
class PackPlan:
    """Which examples go in which packed row: pack p holds members[bounds[p]:bounds[p+1]]."""

    members: np.ndarray
    bounds: np.ndarray
    max_length: int
    tokens: int
    """real (non-pad) tokens over all packs"""

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def pack(self, p: int) -> np.ndarray:
        return self.members[self.bounds[p] : self.bounds[p + 1]]

    @property
    def fill(self) -> float:
        """Share of the packed rows' max_length slots that hold real tokens."""
        return self.tokens / max(len(self) * self.max_length, 1)

    def fingerprint(self) -> str:
        """Changes whenever any pack changes: store it with a checkpoint to refuse a resume
        onto other packs."""
        h = hashlib.sha256(str(self.max_length).encode())
        h.update(self.members.astype(np.int64).tobytes())
        h.update(self.bounds.astype(np.int64).tobytes())
        return h.hexdigest()[:24]


def plan_packs(lengths: np.ndarray, max_length: int) -> PackPlan:
    """Best-fit decreasing: longest example first, each into the fullest row it still fits."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and (lengths.max() > max_length or lengths.min() < 1):
        raise ValueError(f"example lengths must be in [1, {max_length}] to pack")
    order = np.lexsort((np.arange(len(lengths)), -lengths))
    caps: list[int] = []  # distinct free spaces that some open row has, sorted
    rows_with: dict[int, list[int]] = {}  # free space -> rows with exactly that much
    packs: list[list[int]] = []
    for idx in order.tolist():
        n = int(lengths[idx])
        j = bisect.bisect_left(caps, n)
        if j < len(caps):
            free = caps[j]
            p = rows_with[free].pop()
            if not rows_with[free]:
                del rows_with[free]
                caps.pop(j)
        else:
            free, p = max_length, len(packs)
            packs.append([])
        packs[p].append(idx)
        left = free - n
        if left > 0:
            if left not in rows_with:
                rows_with[left] = []
                bisect.insort(caps, left)
            rows_with[left].append(p)
    bounds = np.zeros(len(packs) + 1, dtype=np.int64)
    bounds[1:] = np.cumsum([len(p) for p in packs])
    members = np.fromiter((i for p in packs for i in p), dtype=np.int64, count=int(bounds[-1]))
    return PackPlan(members, bounds, max_length, int(lengths.sum()))


def collate_packed(
    rows: list[list[dict[str, Any]]], pad_id: int, width: int | None = None
) -> dict[str, torch.Tensor]:
    """Packed rows of examples ({input_ids, labels}) -> input_ids, labels, position_ids and
    segment_ids (B, W); W = the fullest row unless `width` is given. Padding is the last
    segment of its row."""
    used = [sum(len(ex["input_ids"]) for ex in row) for row in rows]
    width = width or max(used)
    if max(used) > width:
        raise ValueError(f"a packed row holds {max(used)} tokens, more than width {width}")
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    segment_ids = torch.zeros(shape, dtype=torch.long)
    for b, row in enumerate(rows):
        at = 0
        for k, ex in enumerate(row):
            n = len(ex["input_ids"])
            input_ids[b, at : at + n] = torch.as_tensor(ex["input_ids"], dtype=torch.long)
            labels[b, at : at + n] = torch.as_tensor(ex["labels"], dtype=torch.long)
            labels[b, at] = IGNORE_INDEX  # never predicted from the previous example
            position_ids[b, at : at + n] = torch.arange(n)
            segment_ids[b, at : at + n] = k
            at += n
        position_ids[b, at:] = torch.arange(width - at)
        segment_ids[b, at:] = len(row)
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "segment_ids": segment_ids,
    }


def block_causal_mask(segment_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, W, W) additive mask: 0 where query i may see key j (same segment, j <= i), the
    dtype's minimum elsewhere."""
    width = segment_ids.shape[-1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = torch.ones(width, width, dtype=torch.bool, device=segment_ids.device).tril()
    mask = torch.zeros(same.shape, dtype=dtype, device=segment_ids.device)
    mask.masked_fill_(~(same & causal), torch.finfo(dtype).min)
    return mask[:, None]


def cu_seq_lens(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Cumulative sequence starts over the flattened (B*W) tokens, int32, and the longest
    sequence: what flash attention's varlen kernel takes."""
    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0).reshape(-1)
    total = torch.tensor([flat.numel()], device=flat.device)
    cu = torch.cat([starts, total]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def packing_attention(attn_implementation: str) -> str:
    """'mask' (explicit block-diagonal mask) or 'varlen' (cu_seq_lens) for a model's
    `config._attn_implementation`."""
    if attn_implementation in MASK_ATTENTION:
        return "mask"
    if "flash" in attn_implementation:
        return "varlen"
    raise ConfigError(
        f"--packing supports sdpa, eager and flash attention, not {attn_implementation!r}"
    )


def packed_model_inputs(
    batch: dict[str, torch.Tensor], attention: str, dtype: torch.dtype
) -> dict[str, Any]:
    """Model kwargs for a collate_packed batch already on the model's device; `attention` is
    packing_attention()'s answer, `dtype` the model's (the mask is added to its scores)."""
    inputs: dict[str, Any] = {
        "input_ids": batch["input_ids"],
        "labels": batch["labels"],
        "position_ids": batch["position_ids"],
        "use_cache": False,
    }
    if attention == "mask":
        inputs["attention_mask"] = block_causal_mask(batch["segment_ids"], dtype)
    elif attention == "varlen":
        cu, longest = cu_seq_lens(batch["position_ids"])
        inputs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest)
        inputs["max_length_k"] = longest
    else:
        raise ValueError(f"attention must be 'mask' or 'varlen', not {attention!r}")
    return inputs
