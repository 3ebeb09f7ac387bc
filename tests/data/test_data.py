"""Tokenization for training: loss only on target + EOS, truncation keeps the target, padding."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lora_dist.data import IGNORE_INDEX, collate, encode_prompt, tokenize_split
from lora_dist.models import resolve_model_dir
from lora_dist.tasks.wikisql import TASK
from lora_dist.tasks.wikisql import TASK as WIKISQL


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return resolve_model_dir("tiny", tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def tok(model_dir: Path):
    return AutoTokenizer.from_pretrained(model_dir)


def test_labels_cover_exactly_target_and_eos(tok) -> None:
    ds = tokenize_split(TASK, WIKISQL.sample_dir(), "dev", tok, max_length=512)
    rows = list(TASK.load_split(WIKISQL.sample_dir(), "dev"))
    assert len(ds) == len(rows)
    for ex, row in zip(ds, rows, strict=True):
        ids, labels = ex["input_ids"], ex["labels"]
        assert len(ids) == len(labels)
        labelled = [t for t in labels if t != IGNORE_INDEX]
        n_masked = len(ids) - len(labelled)
        assert labels[:n_masked] == [IGNORE_INDEX] * n_masked  # one masked prefix, then targets
        assert labelled == ids[n_masked:]
        assert tok.decode(labelled) == TASK.target(row) + tok.eos_token
        assert ids[:n_masked] == encode_prompt(tok, TASK.prompt(row))
        assert ids[0] == tok.bos_token_id


def test_truncation_drops_prompt_from_the_left(tok, caplog) -> None:
    full = tokenize_split(TASK, WIKISQL.sample_dir(), "dev", tok, max_length=512)
    rows = list(TASK.load_split(WIKISQL.sample_dir(), "dev"))
    max_length = sorted(len(ex["input_ids"]) for ex in full)[len(rows) // 2]  # about half fit
    with caplog.at_level(logging.WARNING, logger="lora_dist.data"):
        short = tokenize_split(TASK, WIKISQL.sample_dir(), "dev", tok, max_length=max_length)
    too_long = sum(len(ex["input_ids"]) > max_length for ex in full)
    assert 0 < too_long < len(rows)
    warnings = [r.getMessage() for r in caplog.records if r.name == "lora_dist.data"]
    assert len(warnings) == 1 and f"{too_long} of {len(rows)}" in warnings[0]
    for long_ex, ex, row in zip(full, short, rows, strict=True):
        assert len(ex["input_ids"]) <= max_length
        labelled = [t for t in ex["labels"] if t != IGNORE_INDEX]
        target_ids = tok(TASK.target(row), add_special_tokens=False)["input_ids"]
        if len(target_ids) + 2 <= max_length:
            assert tok.decode(labelled) == TASK.target(row) + tok.eos_token
            # what is left of the prompt is its tail, still after BOS
            kept = ex["input_ids"][1 : len(ex["input_ids"]) - len(labelled)]
            n_prompt = len(long_ex["input_ids"]) - len(labelled)
            assert kept == long_ex["input_ids"][n_prompt - len(kept) : n_prompt]
        else:  # the target alone does not fit: its head is kept
            assert labelled == (target_ids + [tok.eos_token_id])[: max_length - 1]
    tiny = tokenize_split(TASK, WIKISQL.sample_dir(), "dev", tok, max_length=8)
    assert all(len(ex["input_ids"]) == 8 and ex["input_ids"][0] == tok.bos_token_id for ex in tiny)


def test_tokenization_is_deterministic(tok) -> None:
    a = tokenize_split(TASK, WIKISQL.sample_dir(), "dev", tok, max_length=64)
    b = tokenize_split(TASK, WIKISQL.sample_dir(), "dev", tok, max_length=64)
    assert a["input_ids"] == b["input_ids"] and a["labels"] == b["labels"]


def test_collate_pads_right_and_masks_padding(tok) -> None:
    features = [
        {"input_ids": [1, 5, 6, 7], "labels": [-100, -100, 6, 7]},
        {"input_ids": [1, 9], "labels": [-100, 9]},
    ]
    batch = collate(features, pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 5, 6, 7], [1, 9, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 6, 7], [-100, 9, -100, -100]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_padded_batch_loss_equals_unpadded_losses(model_dir: Path, tok) -> None:
    """Padding must not change the loss: compare with each example run alone, unpadded."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ds = tokenize_split(TASK, WIKISQL.sample_dir(), "dev", tok, max_length=512)
    features = [ds[i] for i in range(6)]
    with torch.no_grad():
        batch_loss = model(**collate(features, tok.pad_token_id)).loss
        total, count = 0.0, 0
        for f in features:
            one = collate([f], tok.pad_token_id)
            n = sum(t != IGNORE_INDEX for t in f["labels"][1:])  # labels shift by one
            total += model(**one).loss.item() * n
            count += n
    assert batch_loss.item() == pytest.approx(total / count, rel=1e-5)
