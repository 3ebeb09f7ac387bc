"""Greedy decoding for evaluation: batched, left-padded, KV-cached, and safe under ZeRO-3.

Under DeepSpeed ZeRO-3 every forward pass gathers parameters collectively, so every rank must
run the same number of forward passes. Two things make that hold:

1. Every rank runs the same number of batches. Split the items with `shard_indices` and pass
   `num_batches=num_batches_for(n_items, world_size, batch_size)`; a rank with fewer items runs
   dummy batches whose output is discarded.
2. Inside a batch, a rank whose sequences have all hit EOS keeps stepping (feeding pad tokens)
   until `all_done(local_done)` is True. The caller supplies `all_done`, typically an all-reduce
   (MIN or logical AND) of the flag over ranks. This module never imports `torch.distributed`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import torch


class GenerationStopped(Exception):
    """`stop()` ended generation early (a preemption signal) after `done` of `total` batches."""

    def __init__(self, done: int, total: int) -> None:
        super().__init__(f"generation stopped after {done} of {total} batches")
        self.done, self.total = done, total


def shard_indices(n_items: int, rank: int, world_size: int) -> list[int]:
    """Contiguous, balanced slice of range(n_items) for `rank`; concatenating ranks 0..W-1 in
    order gives back range(n_items), each index exactly once."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
    if n_items < 0:
        raise ValueError(f"n_items must be >= 0, got {n_items}")
    base, extra = divmod(n_items, world_size)
    start = rank * base + min(rank, extra)
    return list(range(start, start + base + (1 if rank < extra else 0)))


def num_batches_for(n_items: int, world_size: int, batch_size: int) -> int:
    """Batches the busiest rank needs under `shard_indices`; pass it to every rank as
    `num_batches` so all ranks run the same number of forward passes."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return math.ceil(math.ceil(n_items / world_size) / batch_size)


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for source in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif source is not None:
            ids.update(int(i) for i in source)
    return ids


def _pad_id(tokenizer: Any, eos_ids: set[int]) -> int:
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    return min(eos_ids) if eos_ids else 0


def cache_argument(model: Any) -> str:
    """The forward argument that takes the KV cache: 'cache' from transformers 5.2x on, where
    'past_key_values' is deprecated (removal announced for 5.40)."""
    module = getattr(model, "module", model)  # a DeepSpeed engine wraps the model
    params = inspect.signature(module.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def output_cache(out: Any) -> Any:
    """The KV cache a forward pass returned, under either name."""
    cache = out.get("cache") if hasattr(out, "get") else None
    return cache if cache is not None else out.past_key_values


def _left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        if seq:
            ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            mask[row, width - len(seq) :] = 1
    return ids, mask


@torch.no_grad()
def _generate_batch(
    model: Any,
    token_ids: list[list[int]],
    live: list[bool],
    max_new_tokens: int,
    eos_ids: set[int],
    pad_id: int,
    all_done: Callable[[bool], bool] | None,
) -> list[list[int]]:
    """Greedy continuation token ids for one batch; rows with live=False start out finished."""
    device = next(model.parameters()).device
    ids, mask = _left_pad(token_ids, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    # Left padding shifts real tokens right, so positions must come from the mask, not the
    # column index; otherwise a padded prompt sees different rotary positions than alone.
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    done = torch.tensor([not alive for alive in live], device=device)
    eos = torch.tensor(sorted(eos_ids), dtype=torch.long, device=device)
    out_tokens: list[torch.Tensor] = []
    cache = None
    cache_arg = cache_argument(model)
    step_ids, step_pos = ids, positions
    for _ in range(max_new_tokens):
        out = model(
            input_ids=step_ids,
            attention_mask=mask,
            position_ids=step_pos,
            use_cache=True,
            **{cache_arg: cache},
        )
        cache = output_cache(out)
        next_tok = out.logits[:, -1, :].argmax(dim=-1)
        next_tok = torch.where(done, torch.full_like(next_tok, pad_id), next_tok)
        out_tokens.append(torch.where(done, torch.full_like(next_tok, -1), next_tok))
        done = done | torch.isin(next_tok, eos)
        local_done = bool(done.all())
        if all_done(local_done) if all_done is not None else local_done:
            break
        step_ids = next_tok[:, None]
        step_pos = step_pos[:, -1:] + 1
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
    if not out_tokens:
        return [[] for _ in token_ids]
    gen = torch.stack(out_tokens, dim=1).tolist()
    result = []
    for row in gen:
        kept = []
        for tok in row:
            if tok == -1 or tok in eos_ids:
                break
            kept.append(tok)
        result.append(kept)
    return result


def greedy_generate(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int,
    all_done: Callable[[bool], bool] | None = None,
    num_batches: int | None = None,
    on_batch: Callable[[int, int], None] | None = None,
    stop: Callable[[], bool] | None = None,
) -> list[str]:
    """Argmax-decode a continuation of each prompt with any Hugging Face causal LM.

    Prompts are tokenized with the tokenizer's defaults (special tokens included), grouped into
    batches of `batch_size`, left-padded, and decoded with the KV cache. A sequence stops at EOS
    (the tokenizer's or the model's generation config's); a batch stops when every sequence has
    stopped, or after `max_new_tokens`. Returns the continuations only, decoded without special
    tokens and stripped, in prompt order.

    `all_done(local_done) -> bool` makes the stop decision collective (see the module docstring);
    `num_batches`, when given, pads the work with discarded dummy batches up to that count.
    `on_batch(done, total)` is told after every batch, for a progress display. `stop()` is
    asked after every batch and raises GenerationStopped when it says so; make it collective
    too (every rank must stop after the same batch).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    n_real = math.ceil(len(prompts) / batch_size)
    if num_batches is not None and num_batches < n_real:
        raise ValueError(
            f"num_batches={num_batches} is fewer than the {n_real} batches {len(prompts)} prompts "
            f"need at batch_size={batch_size}; compute it with num_batches_for()"
        )
    eos_ids = _eos_ids(model, tokenizer)
    pad_id = _pad_id(tokenizer, eos_ids)
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    # A dummy row is one pad token; it is marked finished from the start and its output dropped.
    dummy = [pad_id]
    was_training = model.training
    model.eval()
    texts: list[str] = []
    total = num_batches if num_batches is not None else n_real
    try:
        for b in range(total):
            chunk = encoded[b * batch_size : (b + 1) * batch_size]
            live = [True] * len(chunk)
            if not chunk:
                chunk, live = [dummy], [False]
            ids = _generate_batch(model, chunk, live, max_new_tokens, eos_ids, pad_id, all_done)
            texts.extend(
                tokenizer.decode(t, skip_special_tokens=True).strip()
                for t, alive in zip(ids, live, strict=True)
                if alive
            )
            if on_batch is not None:
                on_batch(b + 1, total)
            if stop is not None and b + 1 < total and stop():
                raise GenerationStopped(b + 1, total)
    finally:
        model.train(was_training)
    return texts
