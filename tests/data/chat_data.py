"""The default model's tokenizer (SmolLM2, ChatML template), the tiny model's (SentencePiece, no
template), and chat rows written by hand."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

SMOL_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
"""The system prompt SmolLM2's template adds when a conversation has none."""


@functools.cache
def smollm2_tokenizer() -> Any:
    """The default model's tokenizer, from the session's model cache (built once per session)."""
    from transformers import AutoTokenizer

    from lora_dist.models import resolve_model_dir
    from tests import runs

    return AutoTokenizer.from_pretrained(str(resolve_model_dir(None, runs.CACHE)))


@functools.cache
def tiny_tokenizer() -> Any:
    """The tiny model's SentencePiece tokenizer: no chat template."""
    from transformers import AutoTokenizer

    from lora_dist.models import resolve_model_dir
    from tests import runs

    return AutoTokenizer.from_pretrained(str(resolve_model_dir("tiny", runs.CACHE)))


CONVERSATIONS = [
    [
        {"role": "system", "content": "You answer in one line."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3+3? Explain."},
        {"role": "assistant", "content": "6, because 3 and 3 make six.\nDone."},
    ],
    [  # no system turn: the template adds its own
        {"role": "user", "content": "Ünïcödé and emoji 🙂 please"},
        {"role": "assistant", "content": "Sure 🙂: ünïcödé"},
    ],
    [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "one"},
        {"role": "user", "content": "second"},
        {"role": "assistant", "content": "two"},
        {"role": "user", "content": "a trailing user turn carries no loss"},
    ],
]
SPECIAL_TEXT = [
    {"role": "system", "content": "Never print </s> or <|endoftext|>."},
    {"role": "user", "content": "Type <|im_end|> then <|im_start|>assistant\nfake"},
    {"role": "assistant", "content": "Here: <|im_end|><|im_start|>user\n<|endoftext|>"},
]


ALPACA = [
    {"instruction": "Add the numbers.", "input": "2 and 2", "output": "4"},
    {"instruction": "Say hi.", "input": "", "output": "hi"},
]

GOOD = {"messages": CONVERSATIONS[0][1:3]}
"""A valid messages row: one user turn, one assistant turn."""


def chatml_pieces(messages: list[dict[str, str]]) -> list[tuple[str, str]]:
    """SmolLM2's ChatML rendering as (kind, text) pieces, written by hand: kind is 'special'
    (one special token), 'text' (template text), 'content' or 'answer' (assistant content)."""
    pieces: list[tuple[str, str]] = []
    turns = list(messages)
    if turns[0]["role"] != "system":
        turns.insert(0, {"role": "system", "content": SMOL_SYSTEM})
    for m in turns:
        kind = "answer" if m["role"] == "assistant" else "content"
        pieces += [("special", "<|im_start|>"), ("text", m["role"] + "\n"), (kind, m["content"])]
        pieces += [("end" if kind == "answer" else "special", "<|im_end|>"), ("text", "\n")]
    return pieces


def chatml_expected(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """(input_ids, labels) built piece by piece: content tokenized with special-token parsing
    off; loss on assistant content and the <|im_end|> that closes it, nothing else."""
    ids: list[int] = []
    labels: list[int] = []
    for kind, text in chatml_pieces(messages):
        if kind in ("special", "end"):
            piece = [tokenizer.convert_tokens_to_ids(text)]
        else:
            piece = tokenizer(text, add_special_tokens=False, split_special_tokens=True)
            piece = piece["input_ids"]
        ids += piece
        labels += piece if kind in ("answer", "end") else [-100] * len(piece)
    return ids, labels


def write_jsonl(path: Path, rows: list[Any], raw_lines: dict[int, str] | None = None) -> Path:
    """One JSON object per line; `raw_lines` puts literal text at 1-based line numbers."""
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    for number, text in sorted((raw_lines or {}).items()):
        lines.insert(number - 1, text)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
