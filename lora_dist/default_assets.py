"""The embedded default model: a tiny LLaMA and its SentencePiece tokenizer, built once, cached."""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
CONFIG_PATH = ASSETS_DIR / "default_model.json"
CORPUS_PATH = ASSETS_DIR / "corpus.txt"
SEED = 0
# Bump when the build recipe changes in a way the hashed inputs below do not capture.
BUILD_VERSION = 1
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2

log = logging.getLogger(__name__)


def default_data_dir() -> Path:
    """The shipped WikiSQL sample (`train`/`dev` in the release's file format)."""
    return ASSETS_DIR / "wikisql"


def default_model_config() -> dict:
    """The shipped LlamaConfig dict of the default model."""
    return json.loads(CONFIG_PATH.read_text(encoding="utf-8"))


def cache_root(cache_dir: Path | None = None) -> Path:
    """`cache_dir`, else $LORA_DIST_CACHE, else ~/.cache/lora_dist."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("LORA_DIST_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "lora_dist"


def default_model_key() -> str:
    """Hash of everything the built directory depends on; a change gives a fresh directory."""
    import sentencepiece
    import tokenizers
    import torch
    import transformers

    h = hashlib.sha256()
    h.update(json.dumps(default_model_config(), sort_keys=True).encode())
    h.update(CORPUS_PATH.read_bytes())
    # torch's RNG fixes the initial weights; the others fix the tokenizer and the saved format
    versions = [torch.__version__, transformers.__version__, tokenizers.__version__]
    versions += [sentencepiece.__version__, str(SEED), str(BUILD_VERSION)]
    h.update("|".join(versions).encode())
    return h.hexdigest()[:16]


def ensure_default_model(cache_dir: Path | None = None) -> Path:
    """Return a Hugging Face model directory (config, safetensors weights, tokenizer), building it
    on first use. Safe to call from many ranks at once: one builds under a file lock, in a temp
    directory renamed into place, and every caller gets only a complete directory."""
    root = cache_root(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    key = default_model_key()
    final = root / f"default-llama-{key}"
    if final.is_dir():
        return final
    with open(root / f".default-llama-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if final.is_dir():  # another process built it while we waited
            return final
        log.info("building the default model in %s", final)
        tmp = Path(tempfile.mkdtemp(prefix=f".default-llama-{key}-", dir=root))
        try:
            build_default_model(tmp)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def train_tokenizer(out_dir: Path, vocab_size: int, model_max_length: int) -> None:
    """Train a LLaMA-style SentencePiece BPE on the shipped corpus; save it as a HF tokenizer."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer

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


def build_default_model(out_dir: Path) -> None:
    """Write the tokenizer and a seeded, freshly initialised model into `out_dir` (plain CPU)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**default_model_config())
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
    model.save_pretrained(str(out_dir))
