"""Evaluation for free-form data: perplexity, and generations scored against references.

A chat row that ends on an assistant turn is asked everything before that turn (rendered with
the template's generation prompt, special-token text protected as in training) and that turn is
the reference; a row that ends on a user turn is asked all of it and has no reference. A
prompt/completion row is asked BOS + prompt, and the completion is the reference. Scores,
over the rows that have a reference: exact match (after collapsing whitespace) and ROUGE-L F1
(rouge-score, no stemming), both x100.

`evaluate_generations` shards the rows over data-parallel ranks exactly as task evaluation
does (lora_dist.training.evaluation), so it runs under ZeRO-3; the caller passes the
collectives. Records go to a JSONL file with lora_dist.atomic.write_jsonl_atomic.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import datasets

from lora_dist.data.chat import ChatRenderer
from lora_dist.data.formats import BadRow
from lora_dist.errors import DataError
from lora_dist.generate import greedy_generate, num_batches_for, shard_indices
from lora_dist.tasks.metrics import rouge_l_multi


@dataclass(frozen=True)
class GenerationItem:
    """One prompt to answer, its reference (None when the data has none) and its source row."""

    prompt_ids: list[int]
    prompt: str
    reference: str | None
    row: int


def perplexity(loss: float) -> float:
    """exp(mean token loss); inf rather than an overflow for a diverged run."""
    return math.exp(loss) if loss < 700 else math.inf


def generation_items(
    rows: datasets.Dataset,
    fmt: str,
    tokenizer: Any,
    renderer: ChatRenderer | None,
    limit: int | None = None,
) -> list[GenerationItem]:
    """The prompts and references of checked rows (lora_dist.data.reading.read_rows)."""
    items = []
    n = len(rows) if limit is None else min(limit, len(rows))
    for i in range(n):
        row = rows[i]
        if fmt == "completion":
            kw = {"add_special_tokens": False, "split_special_tokens": True}
            bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
            ids = bos + tokenizer(row["prompt"], **kw)["input_ids"]
            items.append(GenerationItem(ids, row["prompt"], row["completion"], row["row"]))
            continue
        if renderer is None:
            raise ValueError("chat rows need a ChatRenderer")
        messages = row["messages"]
        answered = messages[-1]["role"] == "assistant"
        last = len(messages) - 1 if answered else len(messages)
        reference = messages[-1]["content"] if answered else None
        try:
            ids, text = renderer.prompt(messages[:last])
        except BadRow as bad:
            raise DataError(f"row {row['row']}: {bad}") from None
        items.append(GenerationItem(ids, text, reference, row["row"]))
    return items


def _normalize(text: str) -> str:
    return " ".join(text.split())


def score_generations(predictions: list[str], references: list[str | None]) -> dict[str, float]:
    """exact_match and rougeL (x100) over the pairs that have a reference; n_scored."""
    pairs = [(p, r) for p, r in zip(predictions, references, strict=True) if r is not None]
    if not pairs:
        return {"n_scored": 0}
    exact = sum(_normalize(p) == _normalize(r) for p, r in pairs)
    rouge = rouge_l_multi([p for p, _ in pairs], [[r] for _, r in pairs])
    return {"exact_match": 100.0 * exact / len(pairs), "rougeL": rouge, "n_scored": len(pairs)}


class _PromptTable:
    """greedy_generate's tokenizer: a prompt key maps to token ids computed beforehand."""

    def __init__(self, tokenizer: Any, ids: dict[str, list[int]]) -> None:
        self._tokenizer = tokenizer
        self._ids = ids

    def __call__(self, key: str) -> dict[str, list[int]]:
        return {"input_ids": self._ids[key]}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)


def evaluate_generations(
    model: Any,
    tokenizer: Any,
    items: list[GenerationItem],
    rank: int,
    world_size: int,
    max_new_tokens: int,
    batch_size: int,
    all_done: Callable[[bool], bool] | None = None,
    gather: Callable[[Any], list[Any] | None] | None = None,
    stop: Callable[[], bool] | None = None,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Greedy-decode this rank's shard of `items`; on the rank `gather` returns a list on (all
    of them in one process), (metrics, one record per item in order); ({}, []) elsewhere.

    `rank`/`world_size` are the data-parallel rank and degree; every rank must call this
    together when `all_done` and `gather` are collectives. `stop()` is asked after every batch
    (make it collective too) and ends generation with generate.GenerationStopped.
    """
    if not items:
        raise DataError("nothing to evaluate: the data has no rows")
    mine = shard_indices(len(items), rank, world_size)
    table = _PromptTable(tokenizer, {str(i): items[i].prompt_ids for i in mine})
    texts = greedy_generate(
        model,
        table,
        [str(i) for i in mine],
        max_new_tokens,
        batch_size,
        all_done=all_done,
        num_batches=num_batches_for(len(items), world_size, batch_size),
        stop=stop,
    )
    part = {"items": mine, "texts": texts}
    parts = gather(part) if gather is not None else [part]
    if parts is None:
        return {}, []
    by_item: dict[int, str] = {}
    for p in parts:
        for i, text in zip(p["items"], p["texts"], strict=True):
            by_item.setdefault(i, text)
    if len(by_item) != len(items):
        raise RuntimeError(f"{len(items) - len(by_item)} items got no generation: shards disagree")
    predictions = [by_item[i] for i in range(len(items))]
    metrics = score_generations(predictions, [it.reference for it in items])
    records = [
        {
            "index": i,
            "row": it.row,
            "prompt": it.prompt,
            "prediction": predictions[i],
            "reference": it.reference,
        }
        for i, it in enumerate(items)
    ]
    return metrics, records
