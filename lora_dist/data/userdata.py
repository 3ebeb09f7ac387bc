"""Users' own data, end to end: files in, tokenized memory-mapped train and dev splits out.

`prepare_user_data(spec, tokenizer, cache_dir)` reads the train file (and a dev file, or
splits off a seeded `dev_fraction`), checks every row, renders chat rows with the chat
template (lora_dist.data.chat) or prompt/completion rows as plain text, applies the
over-length rule, and returns Arrow-backed datasets with `input_ids`, `labels` (int32) and
`length` columns. Every stage is cached under `cache_dir` by a fingerprint of its inputs
(file stamps, format, tokenizer, template, max_length, rule), so the first process on a node
tokenizes and the others open its files: call it on local rank 0 first, then on the rest.

Over-length rule (`overlong`), applied after tokenization, counted in the report:
- `truncate` (default): chat rows keep their first `max_length` tokens (later turns are cut);
  prompt/completion rows lose prompt tokens from the left first, and only a completion too
  long on its own is cut from the right. A chat row left without any assistant token is
  dropped and counted as `no_loss_after_truncation`.
- `drop`: a row longer than `max_length` is dropped and counted as `over_max_length`.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from lora_dist.data.chat import IGNORE_INDEX, ChatRenderer
from lora_dist.data.formats import BadRow
from lora_dist.data.reading import (
    BAD_PREFIX,
    Rows,
    fingerprint,
    progress_bars,
    read_rows,
    settle_bad_rows,
    skipped_summary,
    status_counts,
)
from lora_dist.errors import ConfigError, DataError

TOKENIZER_VERSION = "1"  # bump when tokenization changes for the same inputs
OVERLONG_RULES = ("truncate", "drop")
TOKEN_FEATURES = datasets.Features(
    {
        "input_ids": datasets.List(datasets.Value("int32")),
        "labels": datasets.List(datasets.Value("int32")),
        "length": datasets.Value("int32"),
        "row": datasets.Value("int64"),
        "status": datasets.Value("string"),
        "why": datasets.Value("string"),
    }
)
KEPT = ("", "truncated")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataSpec:
    """Where the data is and how to turn it into tokens (the trainer's data flags)."""

    train: str
    dev: str | None = None
    dev_fraction: float = 0.0
    data_format: str | None = None
    skip_bad_rows: bool = False
    max_length: int = 2048
    overlong: str = "truncate"
    chat_template: str | None = None
    seed: int = 1234

    def validate(self) -> None:
        if self.overlong not in OVERLONG_RULES:
            raise ConfigError(f"--overlong must be truncate or drop, not {self.overlong!r}")
        if self.max_length < 2:
            raise ConfigError(f"--max_length must be at least 2, got {self.max_length}")
        if self.dev is not None and self.dev_fraction:
            raise ConfigError("give either --dev_data or --dev_fraction, not both")
        if not 0.0 <= self.dev_fraction < 1.0:
            raise ConfigError(f"--dev_fraction must be in [0, 1), got {self.dev_fraction}")


@dataclass
class Split:
    """One tokenized split: its checked rows, its tokens and what happened on the way."""

    name: str
    rows: datasets.Dataset
    """the checked rows (messages, or prompt/completion), for generation-based evaluation"""
    tokens: datasets.Dataset
    """input_ids, labels, length (and row, the source row)"""
    report: dict[str, Any] = field(default_factory=dict)

    def lengths(self) -> np.ndarray:
        return column(self.tokens, "length")


@dataclass
class UserData:
    fmt: str
    train: Split
    dev: Split | None
    renderer: ChatRenderer | None
    """None for prompt/completion data"""

    def report(self) -> dict[str, Any]:
        splits = [self.train] + ([self.dev] if self.dev is not None else [])
        return {"format": self.fmt, **{s.name: s.report for s in splits}}


def column(ds: datasets.Dataset, name: str) -> np.ndarray:
    """A whole numeric column as one array (one vectorized read, not a row at a time)."""
    return np.asarray(ds.with_format("numpy", columns=[name])[:][name])


def tokenizer_fingerprint(tokenizer: Any) -> str:
    h = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode())
    h.update(repr(sorted(tokenizer.special_tokens_map.items())).encode())
    return h.hexdigest()[:24]


def encode_completions(
    tokenizer: Any, prompts: list[str], completions: list[str]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """BOS + prompt + completion + EOS; loss on completion + EOS. Special-token text in either
    stays text."""
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token; generation could never stop")
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    kw = {"add_special_tokens": False, "split_special_tokens": True}
    p_ids = tokenizer(prompts, **kw)["input_ids"] if prompts else []
    c_ids = tokenizer(completions, **kw)["input_ids"] if completions else []
    out = []
    for p, c in zip(p_ids, c_ids, strict=True):
        ids = np.asarray(bos + p + c + [tokenizer.eos_token_id], dtype=np.int64)
        labels = ids.copy()
        labels[: len(bos) + len(p)] = IGNORE_INDEX
        out.append((ids, labels))
    return out


def apply_overlong(
    ids: np.ndarray,
    labels: np.ndarray,
    max_length: int,
    rule: str,
    prompt: tuple[int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray, str]:
    """(ids, labels, status) under the over-length rule; status '' / 'truncated' /
    'dropped:REASON'. `prompt` = (start, end) of a prompt/completion row's prompt tokens (after
    BOS): under `truncate` those are cut from the left first."""
    if len(ids) <= max_length:
        return ids, labels, ""
    if rule == "drop":
        return ids[:0], labels[:0], "dropped:over_max_length"
    if prompt is not None:
        start, end = prompt
        cut = min(len(ids) - max_length, end - start)
        keep = np.r_[0:start, start + cut : len(ids)]
        ids, labels = ids[keep], labels[keep]
    ids, labels = ids[:max_length], labels[:max_length]
    if not (labels[1:] != IGNORE_INDEX).any():
        return ids[:0], labels[:0], "dropped:no_loss_after_truncation"
    return ids, labels, "truncated"


def _encode_batch(
    batch: dict[str, list],
    fmt: str,
    encoder: Any,
    max_length: int,
    overlong: str,
) -> dict[str, list]:
    if fmt == "completion":
        results = encode_completions(encoder, batch["prompt"], batch["completion"])
        n_bos = 1 if encoder.bos_token_id is not None else 0
        prompts = [(n_bos, int((labels == IGNORE_INDEX).sum())) for _, labels in results]
    else:
        results = encoder.encode(batch["messages"])
        prompts = [None] * len(results)
    out: dict[str, list] = {k: [] for k in TOKEN_FEATURES}
    for res, prompt, row in zip(results, prompts, batch["row"], strict=True):
        if isinstance(res, BadRow):
            ids, labels = np.zeros(0, np.int64), np.zeros(0, np.int64)
            status, why = BAD_PREFIX + res.kind, res.detail
        else:
            ids, labels, status = apply_overlong(*res, max_length, overlong, prompt)
            why = ""
        out["input_ids"].append(ids.astype(np.int32))
        out["labels"].append(labels.astype(np.int32))
        out["length"].append(len(ids))
        out["row"].append(row)
        out["status"].append(status)
        out["why"].append(why)
    return out


def tokenize_rows(
    name: str,
    rows: datasets.Dataset,
    rows_fp: str,
    source: str,
    fmt: str,
    encoder: Any,
    spec: DataSpec,
    cache_dir: Path,
    tok_fp: str,
    num_proc: int | None = None,
) -> tuple[datasets.Dataset, dict[str, Any]]:
    """Tokenize checked rows into TOKEN_FEATURES (cached); returns (kept rows, report)."""
    template = encoder.template if isinstance(encoder, ChatRenderer) else ""
    fp = fingerprint(
        TOKENIZER_VERSION, rows_fp, fmt, tok_fp, template, spec.max_length, spec.overlong
    )
    tokens = rows.map(
        _encode_batch,
        batched=True,
        batch_size=256,
        remove_columns=rows.column_names,
        features=TOKEN_FEATURES,
        fn_kwargs={
            "fmt": fmt,
            "encoder": encoder,
            "max_length": spec.max_length,
            "overlong": spec.overlong,
        },
        cache_file_name=str(cache_dir / f"tokens-{fp}.arrow"),
        new_fingerprint=f"tokens-{fp}",
        num_proc=num_proc,
        desc=f"tokenizing {name}",
    )
    counts = status_counts(tokens)
    kept, bad, examples = settle_bad_rows(
        tokens, source, spec.skip_bad_rows, cache_dir, fp, keep=KEPT
    )
    if len(kept) == 0:
        raise DataError(f"{source}: no {name} example is left after tokenization: {counts}")
    dropped = {s.split(":", 1)[1]: n for s, n in counts.items() if s.startswith("dropped:")}
    lengths = column(kept, "length")
    report = {
        "examples": len(kept),
        "truncated": counts.get("truncated", 0),
        "dropped": dropped,
        "template_refused": bad,
        "template_refused_examples": examples,
        "tokens": int(lengths.sum()),
        "max_length": spec.max_length,
        "overlong": spec.overlong,
    }
    return kept.remove_columns(["status", "why"]), report


def _split_off_dev(rows: Rows, fraction: float, seed: int) -> tuple[Rows, Rows]:
    n = len(rows.dataset)
    k = int(round(n * fraction))
    if k < 1 or k >= n:
        raise ConfigError(
            f"--dev_fraction {fraction} of {n} rows leaves {k} dev rows; it must leave at least "
            "one row on each side"
        )
    perm = np.random.default_rng(seed).permutation(n)
    parts = []
    for name, idx in (("train", np.sort(perm[k:])), ("dev", np.sort(perm[:k]))):
        fp = fingerprint(rows.fingerprint, name, fraction, seed)
        parts.append(Rows(rows.dataset.select(idx), rows.fmt, rows.source, {}, [], fp))
    parts[0].skipped, parts[0].examples = rows.skipped, rows.examples
    return parts[0], parts[1]


def _read_report(rows: Rows) -> dict[str, Any]:
    return {
        "source": rows.source,
        "rows": len(rows.dataset),
        "bad_rows_skipped": rows.skipped,
        "bad_row_examples": rows.examples,
    }


def prepare_user_data(
    spec: DataSpec,
    tokenizer: Any,
    cache_dir: Path,
    progress: bool = False,
    num_proc: int | None = None,
) -> UserData:
    """Read, check, split, render and tokenize; see the module docstring. Raises DataError,
    ModelError (no usable chat template) or ConfigError."""
    spec.validate()
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with progress_bars(progress):
        train_rows = read_rows(
            spec.train, cache_dir, spec.data_format, spec.skip_bad_rows, progress=progress
        )
        fmt = train_rows.fmt
        dev_rows = None
        if spec.dev is not None:
            dev_rows = read_rows(spec.dev, cache_dir, fmt, spec.skip_bad_rows, progress=progress)
        elif spec.dev_fraction:
            train_rows, dev_rows = _split_off_dev(train_rows, spec.dev_fraction, spec.seed)
        encoder = tokenizer if fmt == "completion" else ChatRenderer(tokenizer, spec.chat_template)
        tok_fp = tokenizer_fingerprint(tokenizer)
        splits = []
        for name, rows in (("train", train_rows), ("dev", dev_rows)):
            if rows is None:
                splits.append(None)
                continue
            tokens, report = tokenize_rows(
                name,
                rows.dataset,
                rows.fingerprint,
                rows.source,
                fmt,
                encoder,
                spec,
                cache_dir,
                tok_fp,
                num_proc,
            )
            splits.append(Split(name, rows.dataset, tokens, {**_read_report(rows), **report}))
    for split in filter(None, splits):
        r = split.report
        if r["bad_rows_skipped"]:
            log.warning("%s: %s", r["source"], skipped_summary(r["bad_rows_skipped"]))
        if r["truncated"] or r["dropped"]:
            log.warning(
                "%s (%s): %d examples over max_length=%d truncated, dropped %s",
                r["source"],
                split.name,
                r["truncated"],
                spec.max_length,
                r["dropped"] or "none",
            )
    renderer = encoder if isinstance(encoder, ChatRenderer) else None
    return UserData(fmt, splits[0], splits[1], renderer)
