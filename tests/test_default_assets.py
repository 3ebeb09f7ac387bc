"""The embedded default model: it reloads with plain transformers, and builds once across ranks."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lora_dist.data import collate, tokenize_split
from lora_dist.default_assets import (
    CONFIG_PATH,
    cache_root,
    default_data_dir,
    ensure_default_model,
)
from lora_dist.tasks.wikisql import TASK

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_default_model(tmp_path_factory.mktemp("cache"))


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
    rows = list(TASK.load_split(default_data_dir(), "dev"))
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
    ds = tokenize_split(TASK, default_data_dir(), "dev", tok, max_length=256)
    batch = collate([ds[i] for i in range(32)], tok.pad_token_id)
    with torch.no_grad():
        loss = model(**batch).loss.item()
    assert abs(loss - math.log(len(tok))) < 0.15 * math.log(len(tok))


def test_second_call_reuses_the_directory(model_dir: Path, caplog) -> None:
    before = (model_dir / "model.safetensors").stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="lora_dist.default_assets"):
        again = ensure_default_model(model_dir.parent)
    assert again == model_dir
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == before
    assert not [r for r in caplog.records if "building" in r.getMessage()]


def test_cache_root_precedence(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LORA_DIST_CACHE", str(tmp_path / "env"))
    assert cache_root(tmp_path / "arg") == tmp_path / "arg"
    assert cache_root() == tmp_path / "env"
    monkeypatch.delenv("LORA_DIST_CACHE")
    assert cache_root() == Path.home() / ".cache" / "lora_dist"


def test_concurrent_callers_get_one_complete_build(tmp_path: Path) -> None:
    """Two processes (as two ranks would) race on an empty cache: one builds, both agree."""
    code = (
        "import logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stdout);"
        "from lora_dist.default_assets import ensure_default_model;"
        f"print('DIR', ensure_default_model({str(tmp_path)!r}))"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    dirs = {line for out in outs for line in out.splitlines() if line.startswith("DIR")}
    assert len(dirs) == 1
    assert sum(out.count("building the default model") for out in outs) == 1
    built = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    assert len(built) == 1 and (built[0] / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.is_dir() and p.name.startswith(".")]
