"""The tiny model (`--model tiny`): a 1M-parameter LLaMA with random weights and a SentencePiece
tokenizer trained on the shipped corpus, for tests and quick smoke runs. It learns formats, not
tasks: its embeddings are random and frozen under LoRA."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import sentencepiece as spm
import tokenizers
import torch
import transformers
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, LlamaTokenizer

from lora_dist.models.cache import Recipe
from lora_dist.models.hf_dir import check_loadable, save_model_dir

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
CONFIG_PATH = ASSETS_DIR / "tiny_model.json"
CORPUS_PATH = ASSETS_DIR / "corpus.txt"
SEED = 0
# Bump when the build recipe changes in a way the hashed inputs below do not capture.
BUILD_VERSION = 2
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2


def tiny_model_config() -> dict:
    """The shipped LlamaConfig dict of the tiny model."""
    return json.loads(CONFIG_PATH.read_text(encoding="utf-8"))


def tiny_model_key() -> str:
    """Hash of everything the built directory depends on; a change gives a fresh directory."""
    h = hashlib.sha256()
    h.update(json.dumps(tiny_model_config(), sort_keys=True).encode())
    h.update(CORPUS_PATH.read_bytes())
    # torch's RNG fixes the initial weights; the others fix the tokenizer and the saved format
    versions = [torch.__version__, transformers.__version__, tokenizers.__version__]
    versions += [spm.__version__, str(SEED), str(BUILD_VERSION)]
    h.update("|".join(versions).encode())
    return h.hexdigest()[:16]


def train_tokenizer(out_dir: Path, vocab_size: int, model_max_length: int) -> None:
    """Train a LLaMA-style SentencePiece BPE on the shipped corpus; save it as a HF tokenizer."""
    spm_dir = out_dir / "sentencepiece"
    spm_dir.mkdir()
    spm.set_random_generator_seed(SEED)
    # LLaMA's settings: no normalisation, a dummy prefix space, digits split, bytes for the rest
    spm.SentencePieceTrainer.train(
        input=str(CORPUS_PATH),
        model_prefix=str(spm_dir / "tokenizer"),
        vocab_size=vocab_size,
        model_type="bpe",
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    tokenizer = LlamaTokenizer.from_pretrained(str(spm_dir), add_bos_token=True)
    # the pad id must be a real token: <unk> is never a training target, so padding is inert
    tokenizer.pad_token = tokenizer.unk_token
    tokenizer.model_max_length = model_max_length
    tokenizer.save_pretrained(str(out_dir))
    shutil.move(str(spm_dir / "tokenizer.model"), str(out_dir / "tokenizer.model"))
    shutil.rmtree(spm_dir)


def build_tiny_model(out_dir: Path) -> None:
    """Write the tokenizer and a seeded, freshly initialised model into `out_dir` (plain CPU)."""
    config = LlamaConfig(**tiny_model_config())
    train_tokenizer(out_dir, config.vocab_size, config.max_position_embeddings)
    tok = AutoTokenizer.from_pretrained(str(out_dir))
    ids = (len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    want = (config.vocab_size, config.bos_token_id, config.eos_token_id, config.pad_token_id)
    if ids != want:
        raise RuntimeError(
            f"tokenizer (size, bos, eos, pad) {ids} disagree with {CONFIG_PATH}: {want}"
        )
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG as it was
        torch.manual_seed(SEED)
        model = LlamaForCausalLM(config)
    save_model_dir(model, None, out_dir, torch.float32)


TINY = Recipe(
    name="tiny-llama",
    key=tiny_model_key,
    build=build_tiny_model,
    check=check_loadable,
    about="the tiny random LLaMA (--model tiny)",
)
