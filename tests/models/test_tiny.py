"""The tiny test model (`--model tiny`): a real HF directory with a SentencePiece tokenizer."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lora_dist.data import collate, tokenize_split
from lora_dist.models import resolve_model_dir
from lora_dist.models.tiny import CONFIG_PATH
from lora_dist.tasks.wikisql import TASK


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return resolve_model_dir("tiny", tmp_path_factory.mktemp("cache"))


def test_reloads_with_auto_classes(model_dir: Path) -> None:
    shipped = json.loads(CONFIG_PATH.read_text())
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert type(model).__name__ == "LlamaForCausalLM"
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size"):
        assert getattr(model.config, key) == shipped[key], key
    assert not model.config.tie_word_embeddings
    assert model.get_input_embeddings().weight.shape[0] == len(tok) == shipped["vocab_size"]
    assert tok.bos_token_id == model.config.bos_token_id
    assert tok.eos_token_id == model.config.eos_token_id
    assert tok.pad_token_id == model.config.pad_token_id
    assert tok.pad_token_id not in (None, tok.eos_token_id)
    names = {p.name for p in model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names


def test_tokenizer_matches_sentencepiece(model_dir: Path) -> None:
    """The HF tokenizer must encode exactly as the SentencePiece model it was converted from."""
    sp = spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = list(TASK.load_split(TASK.sample_dir(), "dev"))
    texts = [TASK.target(r) for r in rows] + [r["question"] for r in rows]
    texts += ["Unseen wörds, emoji 😀 and\ttabs", 'SELECT "x" FROM table']
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert ids == sp.encode(text), text
        assert tok.decode(ids) == text
    assert tok("a")["input_ids"][0] == tok.bos_token_id == sp.bos_id()


def test_initial_loss_is_near_uniform(model_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ds = tokenize_split(TASK, TASK.sample_dir(), "dev", tok, max_length=256)
    batch = collate([ds[i] for i in range(32)], tok.pad_token_id)
    with torch.no_grad():
        loss = model(**batch).loss.item()
    assert abs(loss - math.log(len(tok))) < 0.15 * math.log(len(tok))
