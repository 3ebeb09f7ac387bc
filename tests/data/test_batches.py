"""Batches the training loop draws: packed rows of chat data give the loss of the examples one
per row, and rebuild identically from the cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lora_dist.data.batches import ExampleBatches, PackedBatches
from lora_dist.data.userdata import DataSpec, prepare_user_data
from lora_dist.training.schedule import DataOrder
from tests.data.chat_data import CONVERSATIONS, smollm2_tokenizer, write_jsonl
from tests.tiny_models import tiny_llama


@pytest.fixture(scope="module")
def tok():
    return smollm2_tokenizer()


def _spec(train: Path | str, **kw) -> DataSpec:
    return DataSpec(train=str(train), **kw)


def test_packed_batches_equal_example_batches_on_chat_data(tmp_path: Path, tok) -> None:
    rows = [{"messages": c} for c in CONVERSATIONS] * 3
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    data = prepare_user_data(_spec(path), tok, tmp_path / "cache")
    model = tiny_llama(vocab_size=len(tok), max_position_embeddings=512)
    pad = tok.pad_token_id
    examples = ExampleBatches(data.train.tokens, pad)
    packed = PackedBatches(data.train.tokens, 256, pad, "sdpa", torch.float32)
    assert len(examples) == 9 and len(packed) < len(examples)
    one = examples.batch(list(range(len(examples))))
    rows_of_packs = packed.batch(list(range(len(packed))))
    assert one.tokens == rows_of_packs.tokens == int(data.train.lengths().sum())
    assert one.loss_tokens == rows_of_packs.loss_tokens
    with torch.no_grad():
        a = model(**one.inputs).loss.item()
        b = model(**rows_of_packs.inputs).loss.item()
        alone = [model(**examples.batch([i]).inputs).loss.item() for i in range(len(examples))]
    weights = np.array([examples.batch([i]).loss_tokens for i in range(len(examples))])
    assert a == pytest.approx(b, abs=1e-5)
    assert b == pytest.approx(float(np.dot(alone, weights) / weights.sum()), abs=1e-5)
    # A resumed run reopens the cache and rebuilds the same packs: step s draws the same rows.
    again = prepare_user_data(_spec(path), tok, tmp_path / "cache")
    rebuilt = PackedBatches(again.train.tokens, 256, pad, "sdpa", torch.float32)
    assert rebuilt.plan.fingerprint() == packed.plan.fingerprint()
    order = DataOrder(len(packed), 2, seed=3)
    for step in range(3):
        for rank in range(2):
            [idx] = order.rank_micro_batches(step, rank, 2, 1)
            x, y = packed.batch(idx).inputs, rebuilt.batch(idx).inputs
            assert x.keys() == y.keys()
            assert all(
                torch.equal(x[k], y[k]) if torch.is_tensor(x[k]) else x[k] == y[k] for k in x
            )
